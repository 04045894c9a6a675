"""Train-step figures: compile time, step time, throughput, FLOP/s and MFU. Prints JSON.

  python benchmarks/train_step.py                       # tiny and base, float32, batch 8, CPU
  python benchmarks/train_step.py --configs base --batch 8 --dtype bfloat16 --steps 5

MFU is the model's analytic matmul FLOPs per step (``perf.train_flops_per_example``; XLA's own
count is printed too, but it counts a scanned layer once) over the step time and the device
peak: the vendor figure on TPU/GPU, and on CPU the measured FLOP/s of a large jitted matmul
(this machine's practical peak).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import time

import jax
import numpy as np

from mwmae.data.sources import synthetic_source
from mwmae.train import perf
from mwmae.train.engine import Engine
from mwmae.train.pretraining import Pretraining

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": "tiny.py", "base": "mwmae_base_200_4x16.py", "mae_base": "mae_base_200_4x16.py"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / CONFIGS[name])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def bench(name: str, batch: int, dtype: str, steps: int, attention: str, unroll: int) -> dict:
    config = load(name)
    config.model.scan_unroll = unroll
    config.batch_size = batch
    config.model.dtype = dtype
    config.model.attention_impl = attention
    config.num_train_steps = 10_000
    t = Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:1])
    state = t.initial_state()
    t0 = time.perf_counter()
    compiled = t.compile(state)
    compile_s = time.perf_counter() - t0
    source = synthetic_source(config.batch_size, config.seed, *config.model.img_size)
    batches = [t.global_batch(next(source)) for _ in range(2)]
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, m = compiled(state, batches[i % 2])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])  # the first run warms caches
    flops = perf.train_flops_per_example(t.model_config) * batch
    peak = perf.device_peak_flops(dtype=dtype)
    return {
        "config": name, "batch": batch, "dtype": dtype,
        "attention_impl": t.model_config.attention_impl, "scan_unroll": unroll,
        "device": jax.devices()[0].device_kind, "compile_s": round(compile_s, 2),
        "compiles": 1,  # the loop calls this AOT executable: no tracing or compiling after it
        "step_s_median": round(step_s, 4), "step_s_min": round(min(times[1:]), 4),
        "examples_per_s": round(batch / step_s, 2),
        "gflop_per_step": round(flops / 1e9, 2), "achieved_gflops": round(flops / step_s / 1e9, 1),
        "xla_cost_analysis_gflop": round(perf.compiled_flops(compiled) / 1e9, 2),
        "peak_gflops": round(peak / 1e9, 1), "mfu": round(flops / step_s / peak, 3),
        "loss": float(np.asarray(m["loss"])),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="tiny,base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--attention", default="auto")
    p.add_argument("--scan_unroll", default="1,0",
                   help="comma list; 0 = fully unrolled (one copy of each layer)")
    a = p.parse_args()
    for name in a.configs.split(","):
        for unroll in (int(u) for u in a.scan_unroll.split(",")):
            depth = max(load(name).model.depth, load(name).model.decoder_depth)
            print(json.dumps(bench(name, a.batch, a.dtype, a.steps, a.attention,
                                   unroll or depth)), flush=True)


if __name__ == "__main__":
    main()
