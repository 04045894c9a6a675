"""Whole programs for NVIDIA H100s, compiled on this CPU host: XLA's GPU pipeline, Triton and
ptxas run for the H100 description the package ships (``mwmae/train/targets/h100_sxm.txtpb``);
nothing runs on a GPU. Checked: the config's mesh on 1 and 8 GPUs, the attention each target
resolves to, the Pallas Triton kernels in the optimised program, memory against the GPU's, and
the program's matmul FLOPs against the analytic count of ``mwmae.train.perf``.

Run with the ``cuda`` extra's environment (the default one has no CUDA wheels):
  scripts/test_gpu.sh           (installs .venv-gpu; -m slow for the base config)
"""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNELS = {"multi_window_attention_fwd", "multi_window_attention_bwd_dkdv",
           "multi_window_attention_bwd_dq"}
# Every matmul of the program is a dot, a cuBLAS call or a convolution that the count reads,
# so it matches the analytic count closely (0.2% on the tiny model: the analytic count rounds
# the patch embedding's padding); a missed or double-counted layer is off by far more.
FLOPS_TOLERANCE = 0.02


def compile_check(*args: str, timeout: int = 900) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mwmae.train.compile_check", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def check_program(report: dict, kernel: bool) -> None:
    """Kernels, memory and FLOPs of one compiled H100 program."""
    assert report["device_kind"].startswith("NVIDIA H100")
    assert report["fits"] and 0 < report["memory_fraction"] < 1
    assert report["device_memory_mib"] > 75 * 1024  # the description's 80 GB
    analytic = report["analytic_flops_per_example"]
    counted = report["hlo_matmul_flops_per_example"]
    assert report["hlo_bytes_accessed_per_example"] > 0
    if kernel:
        assert set(report["pallas_kernels"]) == KERNELS if report["target"] == "train" else {
            "multi_window_attention_fwd"}
        assert report["libraries"]["triton"] >= len(report["pallas_kernels"])
        # The kernels are opaque calls: the count misses exactly their (analytic) attention.
        counted += report["analytic_attention_flops_per_example"]
        assert report["opaque_custom_calls"] >= report["libraries"]["triton"]
    else:
        assert report["pallas_kernels"] == {}
        assert "__gpu$xla.gpu.triton" not in report["custom_calls"]
    assert abs(counted / analytic - 1) < FLOPS_TOLERANCE, (counted, analytic)


@pytest.mark.parametrize("num_gpus,impl,resolved", [
    (1, "xla", "xla"),
    (1, "pallas_gpu", "pallas_gpu"),
    (8, "xla", "xla"),
    # The default: the target devices' platform ("gpu") picks the Triton kernel, not this host.
    (8, "auto", "pallas_gpu"),
], ids=["1gpu-xla", "1gpu-pallas_gpu", "8gpu-xla", "8gpu-auto"])
def test_tiny_train_step_compiles_for_h100(num_gpus, impl, resolved):
    report = compile_check("--config", "configs/tiny.py", "--gpu", "h100",
                           "--num_gpus", str(num_gpus), "--config.batch_size=16",
                           f"--config.model.attention_impl={impl}")
    assert report["devices"] == num_gpus and report["gpu"] == "h100"
    assert report["mesh"] == {"data": num_gpus, "fsdp": 1, "tensor": 1}
    assert report["attention_impl"] == impl and report["attention"] == resolved
    assert report["attention_plan"] == {"encoder": resolved, "decoder": resolved}
    check_program(report, kernel=resolved == "pallas_gpu")
    if num_gpus > 1:
        # Data parallel: the gradients are summed over the data axis.
        ops = {c["op"] for c in report["collectives"]}
        assert "all-reduce" in ops


def test_bfloat16_auto_sends_every_layer_to_cudnn():
    """In bfloat16 "auto" calls cuDNN's fused attention in every layer (a maintained library,
    no layout change around it), the decoder's windows given to it as a dense bias and mask:
    no Pallas kernel, so nothing lowers through Pallas' Triton backend."""
    report = compile_check("--config", "configs/tiny.py", "--gpu", "h100",
                           "--config.batch_size=16", "--config.model.dtype=bfloat16")
    assert report["attention_plan"] == {"encoder": "cudnn", "decoder": "cudnn"}
    calls = report["custom_calls"]
    assert calls["__cudnn$fmhaSoftmax"] >= 1 and calls["__cudnn$fmhaSoftmaxBackward"] >= 1
    # The windowed decoder's call carries the bias, and its gradient comes back.
    assert calls["__cudnn$fmhaScaleBiasSoftmax"] >= 1
    assert calls["__cudnn$fmhaScaleBiasSoftmaxBackward"] >= 1
    assert report["pallas_kernels"] == {} and "__gpu$xla.gpu.triton" not in calls
    assert report["fits"]


def test_hear_embedding_forward_compiles_for_h100_with_the_kernel():
    report = compile_check("--config", "configs/tiny.py", "--gpu", "h100", "--target", "embed",
                           "--embed_batch", "16")
    assert report["attention"] == "pallas_gpu"
    assert report["devices"] == 1 and report["batch_size"] == 16
    check_program(report, kernel=True)


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus,impl", [(1, "xla"), (1, "pallas_gpu"), (1, "auto"),
                                           (8, "xla"), (8, "pallas_gpu"), (8, "auto")])
def test_base_config_train_step_compiles_for_h100s(num_gpus, impl):
    """The paper's model, batch 512 per GPU, layers unrolled so that the report carries the
    per-part traffic account; on one H100 and on the 8 of one host (the mesh the config
    builds)."""
    report = compile_check("--config", "configs/mwmae_base_200_4x16.py", "--gpu", "h100",
                           "--num_gpus", str(num_gpus), f"--config.batch_size={512 * num_gpus}",
                           f"--config.model.attention_impl={impl}",
                           "--config.model.scan_unroll=12", timeout=3000)
    assert report["devices"] == num_gpus and report["dtype"] == "bfloat16"
    plan = report["attention_plan"]
    if impl == "auto":  # bfloat16 on an NVIDIA GPU: cuDNN everywhere
        assert plan == {"encoder": "cudnn", "decoder": "cudnn"}
        assert report["pallas_kernels"] == {} and report["libraries"]["cudnn"] >= 32
    else:
        assert plan == {"encoder": impl, "decoder": impl}
        check_program(report, kernel=impl == "pallas_gpu")
    traffic = report["traffic_by_part"]
    assert {"encoder MLP", "decoder attention", "optimizer update"} <= set(traffic["parts"])
    assert abs(sum(traffic["parts"].values()) - traffic["mb_per_example"]) < 0.5
    print(f"base step, 512 per GPU on {num_gpus} H100, {impl}: "
          f"{report['peak_estimate_mib'] / 1024:.1f} GiB per GPU, "
          f"{report['hlo_matmul_flops_per_example'] / 1e9:.1f} GFLOP and "
          f"{traffic['mb_per_example']:.1f} MB per example (every kernel's operands and "
          f"results)")
