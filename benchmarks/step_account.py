"""Where the base train step's memory traffic goes, read from what the H100 compiler emits.

  scripts/install.sh .venv-gpu test,cuda            # the CUDA wheels; no GPU needed
  .venv-gpu/bin/python benchmarks/step_account.py --out benchmarks/results/step-account-h100

Compiles the pretraining step of a config (default the paper's base model) for one H100 with
no GPU present (``mwmae.aot.gpu_devices``), its layers unrolled so that every layer appears in
the program, once per attention implementation (default ``pallas_gpu``, the project's Triton
kernel, and ``auto``, what the trainer picks on a GPU). For each it prints one JSON line:

* ``xla_cost``: XLA's own cost analysis of the optimised program (FLOPs and bytes accessed per
  example). It counts a custom call as moving nothing, so cuBLAS, cuDNN and Pallas calls are
  invisible to it;
* ``traffic``: :func:`mwmae.hlo_cost.traffic_by_part`: operands plus results of every kernel,
  custom calls included, per example, part by part (encoder and decoder attention, projections,
  MLPs, norms; masking, loss, optimizer update), split by pass, with what custom calls and pure
  layout work (transposes, copies, pads, slices) account for; the figure to judge changes by;
* ``roofline_us``: what that traffic and the matmul FLOPs cost per example at the peak memory
  bandwidth and dense bf16 rate of an H100 SXM and an H200 (a bound, not a time).

A deviceless compile has no GEMM autotuning (see the GPU guide): the structure, memory and
traffic are the compiler's, the tilings are not, so these are not timings.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"  # compile-only GPU devices; see mwmae.aot.gpu_devices

import jax  # noqa: E402

from mwmae import aot, hlo_cost  # noqa: E402
from mwmae.train.engine import Engine  # noqa: E402
from mwmae.train.family import pretrain_config  # noqa: E402
from mwmae.train.pretraining import Pretraining  # noqa: E402

# Vendor peaks: HBM bandwidth (bytes/s) and dense bf16 FLOP/s.
PEAKS = {"H100 SXM": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}


def xla_cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of the optimised module (the deviceless executable itself reports
    none; the analysis of its HLO module is the same pass)."""
    from jax._src.lib import xla_client

    module = compiled.runtime_executable().hlo_modules()[0]
    cost = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def account(family: str, attention: str, batch: int, gpu: str, devices) -> dict:
    config = pretrain_config(family)
    config.batch_size = batch
    config.model.attention_impl = attention
    config.model.scan_unroll = max(config.model.get("depth", 12),
                                   config.model.get("decoder_depth", 4), 12)
    engine = Engine(Pretraining(config), "/tmp/unused", devices=devices)
    start = time.perf_counter()
    compiled = engine.lower().compile()
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    traffic = hlo_cost.traffic_by_part(text, batch)
    cost = xla_cost(compiled)
    roofline = {
        name: {"memory": round(traffic["mb_per_example"] * 1e6 / bw * 1e6, 1),
               "matmul": round(traffic["matmul_gflop_per_example"] * 1e9 / flops * 1e6, 1)}
        for name, (bw, flops) in PEAKS.items()}
    return {
        "config": family, "gpu": gpu, "batch": batch, "attention_impl": attention,
        "attention_plan": {d.layer.name: d.implementation for d in engine.attention.decisions},
        "compile_seconds": round(seconds, 1),
        "libraries": aot.gpu_kernels(text)["libraries"],
        "memory": aot.memory_report(compiled),
        "xla_cost": {"gflop_per_example": round(cost["flops"] / batch / 1e9, 3),
                     "mb_per_example": round(cost["bytes_accessed"] / batch / 1e6, 3)},
        "traffic": traffic,
        "roofline_us": roofline,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="mwmae-B-4x16", help="a family config name")
    p.add_argument("--attention", default="pallas_gpu,auto", help="comma list")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--gpu", default="h100", help="a GPU target (mwmae.aot.gpu_target_config)")
    p.add_argument("--out", type=pathlib.Path, help="also write account.jsonl here")
    a = p.parse_args()
    devices = aot.gpu_devices(a.gpu, 1)
    rows = []
    for attention in a.attention.split(","):
        row = account(a.family, attention, a.batch, a.gpu, devices)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        meta = {"jax": jax.__version__, "python": sys.version.split()[0],
                "date": time.strftime("%Y-%m-%d")}
        with open(a.out / "account.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps({**row, **meta}) + "\n")


if __name__ == "__main__":
    main()
