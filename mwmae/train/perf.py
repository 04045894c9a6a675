"""Throughput accounting: FLOPs of a compiled step, device peaks, model FLOPs utilisation."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip (per device as JAX counts them), from the vendors' sheets.
PEAK_FLOPS: dict[str, float] = {
    "TPU v3": 123e12 / 2,   # JAX sees each v3 core as a device
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100": 312e12,
}


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a large jitted matmul on the default device: the practical peak of a CPU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_peak_flops(device: jax.Device | None = None, dtype: str = "float32") -> float:
    """Peak FLOP/s of one device: the vendor table on accelerators, a probe on CPU."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_peak(dtype)
    kind = device.device_kind
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(name):
            return PEAK_FLOPS[name]
    return float("nan")


def compiled_flops(compiled) -> float:
    """XLA's FLOP count of a compiled computation (the whole global step, all devices)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))
