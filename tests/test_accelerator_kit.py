"""The accelerator kit (benchmarks/accelerator_check.sh): every stage at toy size on CPU, so that
the command a lent GPU host runs first cannot rot between the rare times one is lent."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "accelerator_check.sh"
STAGES = ("environment", "target", "autotune", "kernel_tests", "preflight", "sweep", "profile",
          "input", "hear_embed", "autocast")


def test_an_unknown_stage_is_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([str(KIT), str(tmp_path / "out"), sys.executable, "--cpu-smoke"],
                          capture_output=True, text=True, env={"STAGES": "sweep warp",
                                                               "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "unknown stages ['warp']" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_every_stage_runs_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "kit"
    proc = subprocess.run([str(KIT), str(out), sys.executable, "--cpu-smoke"],
                          capture_output=True, text=True, timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], summary)
    assert list(summary["stages"]) == list(STAGES)
    assert all(s["exit"] == 0 for s in summary["stages"].values()), summary
    read = lambda name: json.loads((out / name).read_text())
    assert read("environment.json")["smoke"] is True
    # No GPU: the target stage says why there is no description, rather than failing.
    assert read("target.json")["available"] is False
    assert read("autotune.json")["step"]["examples_per_s"] > 0
    assert "passed" in (out / "kernel_tests.txt").read_text()
    assert read("preflight.json")["verdict"] in ("ok", "warn")
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert {r["variant"]["flags"] for r in rows} == {"default", "no_triton_gemm"}
    assert {r["variant"]["attention"] for r in rows} == {"auto", "xla"}
    assert all(r["examples_per_s"] > 0 for r in rows), rows
    best = read("best.json")
    assert best["examples_per_s"] == max(r["examples_per_s"] for r in rows)
    profile = read("profile_top.json")
    assert profile["variant"] == best["variant"] and len(profile["top_ms"]) > 3
    inputs = read("input.json")
    assert inputs["examples_per_s"] > 0
    assert inputs["input_over_step"] == round(inputs["examples_per_s"] / best["examples_per_s"],
                                              2)
    embed = [json.loads(line) for line in (out / "hear_embed.json").read_text().splitlines()
             if line.startswith("{\"")]
    assert {r.get("backend") for r in embed} >= {"jax", "torch"}
    autocast = read("autocast.json")["against_float32"]
    # Within the CPU tolerances tests/test_torch_encoder.py holds the encoder to.
    assert 0 < autocast["bfloat16"]["max_abs"] <= 0.1 and autocast["bfloat16"]["mean_abs"] <= 0.012
    assert 0 < autocast["float16"]["max_abs"] <= 0.02 and autocast["float16"]["mean_abs"] <= 0.002
