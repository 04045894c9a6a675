"""Whole programs for a TPU slice, compiled on this CPU host: the train step on a v5p mesh with
the default ("auto") attention, and the HEAR embedding forward on one TPU device."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def compile_check(*args: str, timeout: int = 1200) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mwmae.train.compile_check", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def test_train_step_compiles_for_v5p_with_the_kernel():
    report = compile_check("--config", "configs/tiny.py", "--topology", "v5p:2x2x1",
                           "--config.batch_size=16")
    assert report["attention_impl"] == "auto"
    assert report["attention"] == "pallas_tpu"
    # No preflight record here: every layer by the default rule.
    assert report["attention_plan"] == {"encoder": "pallas_tpu", "decoder": "pallas_tpu"}
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    # Encoder and decoder stacks, forward and backward: at least four Mosaic calls.
    assert report["mosaic_kernels"] >= 4
    assert 0 < report["peak_estimate_mib"] < 16 * 1024


def test_train_step_fsdp_tp_mesh_compiles_with_the_kernel():
    """Heads over the tensor axis: tiny's decoder windows (5, 25, 0, 0) differ between the two
    tensor shards (lax.switch over per-shard kernels)."""
    report = compile_check("--config", "configs/tiny.py", "--topology", "v6e:2x2",
                           "--config.mesh.preset=fsdp_tp", "--config.batch_size=8")
    assert report["attention"] == "pallas_tpu"
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert report["mosaic_kernels"] >= 4


def test_hear_embedding_forward_compiles_with_the_kernel():
    report = compile_check("--config", "configs/tiny.py", "--topology", "v5e:2x2",
                           "--target", "embed", "--embed_batch", "16")
    assert report["attention"] == "pallas_tpu"
    assert report["mosaic_kernels"] >= 1
    assert report["devices"] == 1 and report["batch_size"] == 16


@pytest.mark.slow
def test_base_config_train_step_compiles_for_v5p_8():
    """The paper's model at its global batch 1024 on a v5p-8 slice with the default attention."""
    report = compile_check("--config", "configs/mwmae_base_200_4x16.py", "--topology",
                           "v5p:2x2x1", timeout=3000)
    assert report["batch_size"] == 1024 and report["dtype"] == "bfloat16"
    assert report["attention"] == "pallas_tpu" and report["mosaic_kernels"] >= 4
    assert report["peak_estimate_mib"] < 95 * 1024  # v5p: 95 GiB of HBM per chip
