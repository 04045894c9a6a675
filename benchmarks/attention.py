"""Time multi-window attention: the XLA reference against each fused kernel available here.

Shapes are the paper's: the decoder layer (L=250 tokens, 8 heads of 48, windows
[2, 5, 10, 25, 50, 125, 0, 0]) at batch 64 and 256, and encoder layers (12 heads of 64, all global)
on the 50 visible tokens of pretraining and on all 250 tokens. For every case and implementation
it times the forward and the forward+backward (gradients of q, k, v and the bias tables) and
prints one JSON document with the time, achieved FLOP/s and bytes/s and the ratio to the
reference. FLOPs count only the work the windows need (4*L*w*D per head and pass, 3x that for
forward+backward); bytes count the minimum HBM traffic (q, k, v, o forward; plus dO in and
dq, dk, dv out backward).

On CPU the kernels run in the Pallas interpreter, which is slow by design: use
``--batch-divisor 32 --repeats 2`` (about a minute here) to shrink every batch.

    python benchmarks/attention.py                       # accelerator, full sizes
    python benchmarks/attention.py --batch-divisor 32    # CPU, interpreted kernels
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mwmae.kernels import multi_window_attention

DECODER_WINDOWS = (2, 5, 10, 25, 50, 125, 0, 0)
CASES = [
    dict(name="decoder_b64", batch=64, length=250, heads=8, head_dim=48, windows=DECODER_WINDOWS),
    dict(name="decoder_b256", batch=256, length=250, heads=8, head_dim=48,
         windows=DECODER_WINDOWS),
    dict(name="encoder_visible_b64", batch=64, length=50, heads=12, head_dim=64,
         windows=(0,) * 12),
    dict(name="encoder_full_b64", batch=64, length=250, heads=12, head_dim=64,
         windows=(0,) * 12),
]


def default_implementations() -> list[str]:
    backend = jax.default_backend()
    if backend == "tpu":
        return ["xla", "pallas_tpu"]
    if backend in ("gpu", "cuda", "rocm"):
        return ["xla", "pallas_gpu"]
    return ["xla", "pallas_interpret", "pallas_gpu_interpret"]


def model_flops(case: dict) -> float:
    per_head = [4 * case["length"] * (w or case["length"]) * case["head_dim"]
                for w in case["windows"]]
    return float(case["batch"] * sum(per_head))


def time_call(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(case: dict, impl: str, dtype, repeats: int, shift: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    shape = (case["batch"], case["heads"], case["length"], case["head_dim"])
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    windows = case["windows"]
    tables = jnp.asarray(rng.normal(size=(case["heads"], max(2 * max(windows) - 1, 1))),
                         jnp.float32)
    cot = jnp.asarray(rng.normal(size=shape), dtype)

    def forward(q, k, v, t):
        return multi_window_attention(q, k, v, windows, t, shift, implementation=impl)

    def loss(q, k, v, t):
        return jnp.sum((forward(q, k, v, t) * cot).astype(jnp.float32))

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    tensor_bytes = q.size * q.dtype.itemsize
    flops = model_flops(case)
    records = []
    passes = (("forward", fwd, 1, 4), ("forward_backward", fwd_bwd, 3, 11))
    for name, fn, flop_mult, tensors in passes:
        seconds = time_call(fn, (q, k, v, tables), repeats)
        records.append(dict(case=case["name"], implementation=impl, pass_=name,
                            batch=case["batch"], length=case["length"], heads=case["heads"],
                            head_dim=case["head_dim"], dtype=jnp.dtype(dtype).name,
                            ms=seconds * 1e3, tflop_per_s=flop_mult * flops / seconds / 1e12,
                            gb_per_s=tensors * tensor_bytes / seconds / 1e9))
    return records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementations", nargs="+", default=None,
                        help="default: the reference plus every kernel usable on this backend")
    parser.add_argument("--cases", nargs="+", default=[c["name"] for c in CASES],
                        choices=[c["name"] for c in CASES])
    parser.add_argument("--batch-divisor", type=int, default=1,
                        help="divide every batch size by this (CPU / interpreter runs)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default: bfloat16 on accelerators, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shift", action="store_true", help="shifted windows")
    args = parser.parse_args(argv)

    impls = args.implementations or default_implementations()
    if "xla" not in impls:
        impls = ["xla", *impls]
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    results = []
    for case in CASES:
        if case["name"] not in args.cases:
            continue
        case = dict(case, batch=max(1, case["batch"] // args.batch_divisor))
        by_impl = {impl: run_case(case, impl, dtype, args.repeats, args.shift) for impl in impls}
        for records in by_impl.values():
            for rec, ref in zip(records, by_impl["xla"]):
                rec["speedup_vs_xla"] = ref["ms"] / rec["ms"]
                rec["pass"] = rec.pop("pass_")
                results.append(rec)
    doc = dict(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
               jax=jax.__version__, batch_divisor=args.batch_divisor, results=results)
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return doc


if __name__ == "__main__":
    main()
