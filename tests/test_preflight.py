"""The preflight: every check end to end on this CPU host, a wrong kernel failing it by name,
and the trainer taking (and guarding) what a preflight measured on a device."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from multihost_helpers import launch, wait_all, write_id_shards
from train_helpers import load_config

from mwmae.kernels import numerics, pallas_tpu
from mwmae.kernels.plan import Layer
from mwmae.preflight import attention, run
from mwmae.train import attention_plan
from mwmae.train.engine import Engine
from mwmae.train.pretraining import Pretraining

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("devices", "attention", "step", "input", "storage", "verdict")


class FakeDevice:
    """What the plan reads of a device: its platform and kind."""

    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


@pytest.fixture
def wrong_windowed_kernel(monkeypatch):
    """The TPU kernel (run here by the Pallas interpreter) off by 1e-2 on windowed heads."""
    right = pallas_tpu.attention_tpu

    def wrong(q, k, v, tables, heads, interpret):
        out = right(q, k, v, tables, heads, interpret)
        return out + 1e-2 if any(heads.window_sizes) else out
    monkeypatch.setattr(pallas_tpu, "attention_tpu", wrong)


def tiny(batch_size: int = 8):
    config = load_config("tiny")
    config.batch_size = batch_size
    return config


def preflight_cli(*args, cwd=REPO, env=None):
    return subprocess.run([sys.executable, "-m", "mwmae.preflight", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "XLA_FLAGS": "", **(env or {})})


@pytest.mark.slow  # an integration run over 30 s: it runs in CI's slow group
def test_cli_on_tiny_reports_every_check(tmp_path):
    out = tmp_path / "P.json"
    cache = tmp_path / "cache"
    temp = tmp_path / "temp"  # where the storage check runs without a workdir
    temp.mkdir()
    proc = preflight_cli("--config", "configs/tiny.py", "--out", str(out),
                         env={"MWMAE_CACHE_DIR": str(cache), "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not [p.name for p in temp.iterdir() if p.name.startswith("mwmae-preflight-")]
    report = json.loads(out.read_text())
    assert set(SECTIONS) <= set(report)
    assert report["verdict"] in ("ok", "warn")
    for name in SECTIONS[:-1]:
        assert report[name]["verdict"] in ("ok", "warn"), report[name]
        assert any(ln.startswith(f"{name:<9} ") for ln in proc.stdout.splitlines()), name
    assert proc.stdout.strip().splitlines()[-1] == f"preflight verdict: {report['verdict']}"
    # The XLA reference ran for real, both kernels in the interpreter for numerics.
    layers = {r["layer"]["name"]: r for r in report["attention"]["layers"]}
    assert set(layers) == {"encoder", "decoder"}
    assert layers["decoder"]["layer"]["window_sizes"] == [5, 25, 0, 0]
    assert layers["encoder"]["layer"]["length"] == 50  # the kept 20% of 250 patches
    for record in layers.values():
        assert record["choice"] == "xla"
        assert {"xla", "pallas_interpret", "pallas_gpu_interpret"} <= set(record["numerics"])
        assert all(n["ok"] for n in record["numerics"].values())
    step = report["step"]
    assert step["step_seconds"] > 0 and 0 < step["mfu"] < 1.5
    assert step["memory"]["peak_estimate_mib"] > 0
    # The whole run at the measured rate (tiny: 40 steps on one device).
    assert step["total_steps"] == 40
    assert step["run_hours"] == pytest.approx(40 * step["step_seconds"] / 3600)
    assert step["device_hours"] == pytest.approx(step["run_hours"] * report["devices"]["count"])
    assert report["input"]["clips_per_second"] > 0 and report["input"]["ratio"] > 0
    assert report["storage"]["write_mb_per_s"] > 0
    assert report["storage"]["checkpoint_total_seconds"] >= \
        report["storage"]["checkpoint_blocking_seconds"] > 0
    assert 0 < report["storage"]["checkpoint_wall_share"] < 1
    # The choices are remembered for the trainer.
    cached = json.loads((cache / attention_plan.CACHE_FILE).read_text())
    assert len(cached["attention"]["layers"]) == 2


def test_cli_usage_errors_exit_2(tmp_path):
    proc = preflight_cli("--out", str(tmp_path / "P.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: missing --config")
    proc = preflight_cli("--config", "configs/tiny_typo.py:base")
    assert proc.returncode == 2
    assert "no such config file" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    proc = preflight_cli("--config", "configs/tiny.py", "--config.batch_sise=4")
    assert proc.returncode == 2
    assert "unknown config key 'batch_sise'" in proc.stderr.strip().splitlines()[-1]
    proc = preflight_cli("--config", "configs/tiny.py", "--config.batch_size=0")
    assert proc.returncode == 2 and "batch_size" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "P.json").exists()


def test_a_kernel_wrong_by_1e_2_fails_the_preflight_naming_its_layer(
        tmp_path, wrong_windowed_kernel):
    config = tiny()
    lines = []
    report = run.run(config, str(tmp_path / "wd"), str(tmp_path / "P.json"),
                     print_fn=lines.append)
    assert report["verdict"] == "fail"
    assert report["attention"]["verdict"] == "fail"
    failing = [ln for ln in report["attention"]["lines"] if ln.startswith("fail")]
    assert failing and all("layer decoder: pallas_interpret forward error" in ln
                           for ln in failing), failing
    assert not any("encoder" in ln for ln in failing)
    decoder = next(r for r in report["attention"]["layers"] if r["layer"]["name"] == "decoder")
    assert not decoder["numerics"]["pallas_interpret"]["ok"]
    assert decoder["numerics"]["pallas_interpret"]["worst"][0] == "forward"
    assert decoder["choice"] == "xla"  # the reference still passed
    # The report reached both the --out file and the workdir.
    assert json.loads((tmp_path / "wd" / "preflight.json").read_text())["verdict"] == "fail"
    assert lines[-1].startswith("preflight verdict: fail (attention: layer decoder: "
                                "pallas_interpret forward error")


def test_speed_decides_only_between_passing_implementations():
    assert attention.choose({"xla": 10.0, "pallas_tpu": 5.0})[0] == "pallas_tpu"
    assert attention.choose({"xla": 10.0, "pallas_tpu": 9.9})[0] == "xla"  # within the margin
    assert attention.choose({"xla": 10.0, "pallas_tpu": 12.0})[0] == "xla"
    assert attention.choose({"pallas_tpu": 12.0})[0] == "pallas_tpu"
    assert attention.choose({})[0] is None


def test_numerics_tolerance_catches_an_error_of_1e_2(wrong_windowed_kernel):
    layer = Layer("decoder", 1, 4, 50, 16, (5, 25, 0, 0), False, "float32")
    bad = numerics.check("pallas_interpret", layer, "cpu")
    assert not bad.ok and bad.worst[0] == "forward" and bad.worst[1] > 1e-3
    good = numerics.check("xla", layer.with_batch(2), "cpu")
    assert good.ok and good.worst[1] == 0.0


# ---------------------------------------------------------------- the trainer's side

def _record(layer: Layer, kind: str, choice: str, jax_version: str = jax.__version__) -> dict:
    return {"layer": layer.to_dict(), "device_kind": kind, "platform": "gpu",
            "jax": jax_version, "choice": choice, "measured": "2026-12-04T00:00:00+00:00"}


@pytest.fixture
def fake_gpu(monkeypatch):
    """The trainer believes it compiles for a GPU; the guard runs on this host's CPU."""
    device = FakeDevice("gpu", "Fake GPU 9000")
    monkeypatch.setattr(Engine, "attention_target",
                        lambda self: (device, jax.local_devices()[0]))
    return device


def _workdir_with_records(tmp_path, config, kind, choices):
    wd = tmp_path / "wd"
    wd.mkdir()
    layers = Engine(Pretraining(config), tmp_path / "probe",
                    devices=jax.devices()[:1]).attention_layers()
    records = [_record(layer, kind, choices[layer.name]) for layer in layers]
    (wd / "preflight.json").write_text(json.dumps({"attention": {"layers": records}}))
    return wd


def test_auto_takes_the_recorded_choice(tmp_path, fake_gpu, monkeypatch):
    config = tiny()
    wd = _workdir_with_records(tmp_path, config, fake_gpu.device_kind,
                               {"encoder": "xla", "decoder": "pallas_interpret"})
    t = Engine(Pretraining(config), wd, devices=jax.devices()[:1])
    assert t.attention.implementation_of("decoder") == "pallas_interpret"
    assert t.attention.implementation_of("encoder") == "xla"
    decoder = next(d for d in t.attention.decisions if d.layer.name == "decoder")
    assert "measured by the preflight" in decoder.reason and "preflight.json" in decoder.reason
    assert decoder.guard is not None and decoder.guard.ok  # guarded, and it agreed
    # The step is traced with the kernel on the decoder's layers, and only there.
    calls = []
    right = pallas_tpu.attention_tpu
    monkeypatch.setattr(pallas_tpu, "attention_tpu",
                        lambda *a: calls.append(a[4].window_sizes) or right(*a))
    t.lower()
    assert calls and set(calls) == {(5, 25, 0, 0)}


def test_a_record_of_another_jax_or_device_is_not_taken(tmp_path, fake_gpu):
    config = tiny()
    layer = Engine(Pretraining(config), tmp_path / "probe",
                    devices=jax.devices()[:1]).attention_layers()[1]
    records = [_record(layer, fake_gpu.device_kind, "pallas_interpret", "0.0.1"),
               _record(layer, "Other GPU", "pallas_interpret")]
    assert attention_plan.find_record(records, fake_gpu.device_kind, jax.__version__,
                                      layer) is None
    assert attention_plan.find_record(records, "Other GPU", jax.__version__,
                                      layer)["choice"] == "pallas_interpret"
    assert attention_plan.find_record(records, "Other GPU", jax.__version__,
                                      layer.with_batch(4)) is None


def test_the_guard_falls_back_to_xla_when_the_kernel_disagrees(
        tmp_path, fake_gpu, wrong_windowed_kernel, caplog):
    config = tiny()
    wd = _workdir_with_records(tmp_path, config, fake_gpu.device_kind,
                               {"encoder": "pallas_interpret", "decoder": "pallas_interpret"})
    with caplog.at_level(logging.WARNING):
        t = Engine(Pretraining(config), wd, devices=jax.devices()[:1])
    assert t.attention.implementation_of("decoder") == "xla"
    assert t.attention.implementation_of("encoder") == "pallas_interpret"  # it agreed
    decoder = next(d for d in t.attention.decisions if d.layer.name == "decoder")
    assert decoder.reason.startswith("guard: pallas_interpret on decoder")
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "attention guard" in warning and "decoder" in warning and "forward error" in warning
    # "error" stops the run instead; "off" trusts the kernel.
    config.model.attention_guard = "error"
    with pytest.raises(attention_plan.AttentionGuardError, match="decoder"):
        Engine(Pretraining(config), wd, devices=jax.devices()[:1])
    config.model.attention_guard = "off"
    t = Engine(Pretraining(config), wd, devices=jax.devices()[:1])
    assert t.attention.implementation_of("decoder") == "pallas_interpret"


def test_without_a_record_the_default_rule_applies_and_a_kernel_that_cannot_run_is_dropped(
        tmp_path, fake_gpu):
    t = Engine(Pretraining(tiny()), tmp_path / "wd",
                devices=jax.devices()[:1])
    for d in t.attention.decisions:
        # The GPU rule picks the Triton kernel, which cannot run on this CPU: the guard drops it.
        assert d.implementation == "xla" and "pallas_gpu" in d.reason and "failed to run" in \
            d.reason, d.reason


def test_on_cpu_auto_stays_xla_and_says_why(tmp_path):
    t = Engine(Pretraining(load_config("tiny")), tmp_path / "wd", devices=jax.devices()[:1])
    assert [d.implementation for d in t.attention.decisions] == ["xla", "xla"]
    assert all("no preflight record" in line for line in t.attention.lines())


def test_remember_replaces_a_record_of_the_same_key(tmp_path):
    layer = Layer("decoder", 2, 4, 250, 16, (5, 25, 0, 0), False, "float32")
    path = tmp_path / "c.json"
    attention_plan.remember([_record(layer, "K", "xla")], path)
    attention_plan.remember([_record(layer, "K", "pallas_gpu"),
                             _record(layer.with_batch(4), "K", "xla")], path)
    records = attention_plan.read_records([path])
    assert len(records) == 2
    assert attention_plan.find_record(records, "K", jax.__version__, layer)["choice"] == \
        "pallas_gpu"


@pytest.mark.slow
def test_cli_on_demo_with_its_shards(tmp_path):
    """The demo config on shards, 2 devices: its input check reads the real pipeline."""
    manifest = write_id_shards(tmp_path / "shards", clips=96, per_shard=24)
    wd = tmp_path / "wd"
    proc = preflight_cli("--config", "configs/demo.py", "--workdir", str(wd),
                         f"--config.data.train_shards={manifest}",
                         env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((wd / "preflight.json").read_text())
    assert set(SECTIONS) <= set(report)
    assert report["devices"]["count"] == 2 and report["devices"]["mesh"]["data"] == 2
    assert report["input"]["source"] == "shards" and report["input"]["clips_per_second"] > 0
    assert not (wd / "preflight-scratch").exists()
    assert np.isfinite(report["step"]["loss"])


@pytest.mark.slow
def test_two_hosts_run_it_together_and_process_0_reports(tmp_path):
    wd = tmp_path / "wd"
    procs = launch(wd, [], num_processes=2, devices_per_process=2, module="mwmae.preflight")
    codes = wait_all(procs, timeout=900)
    logs = [(tmp_path / f"wd-host{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs
    report = json.loads((wd / "preflight.json").read_text())
    assert report["devices"]["processes"] == 2 and report["devices"]["count"] == 4
    assert report["devices"]["hosts_agree"] is True
    assert len(report["input"]["clips_per_second_per_host"]) == 2
    assert "preflight verdict:" in logs[0] and "devices   ok" in logs[0]
    assert "devices   ok" not in logs[1]  # process 1 prints only what is not ok there


def test_storage_on_a_gs_workdir_through_the_emulator():
    import gcs_emulator
    from etils import epath

    from mwmae.preflight import storage
    from mwmae.workdir import Workdir

    with gcs_emulator.emulated_gcs(("pf-bucket",)):
        wd = Workdir("gs://pf-bucket/run")
        t = Engine(Pretraining(tiny()), str(wd), devices=jax.devices()[:1])
        section = storage.check_storage(t, wd.preflight_scratch, t.initial_state(), 0.1)
        assert section.verdict in ("ok", "warn"), section.lines
        f = section.figures
        assert f["path"] == "gs://pf-bucket/run"
        assert f["write_mb_per_s"] > 0 and f["read_mb_per_s"] > 0
        assert f["checkpoint_total_seconds"] >= f["checkpoint_blocking_seconds"] > 0
        assert f["checkpoint_interval_seconds"] == pytest.approx(20 * 0.1)
        assert not epath.Path("gs://pf-bucket/run/preflight-scratch").exists()


def test_storage_names_a_workdir_it_cannot_write(tmp_path):
    from etils import epath

    from mwmae.preflight import storage

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    t = Engine(Pretraining(tiny()), str(tmp_path / "wd"), devices=jax.devices()[:1])
    section = storage.check_storage(t, epath.Path(blocked) / "preflight-scratch", None, None)
    assert section.verdict == "fail"
    assert any(str(blocked) in text for v, text in section.lines if v == "fail")
