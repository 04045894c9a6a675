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


def _attention_flops(length: int, head_dim: int, window_sizes) -> float:
    """q @ k^T and p @ v of every head: 4 * L * (keys per query) * head_dim."""
    return sum(4.0 * length * (w if w else length) * head_dim for w in window_sizes)


def train_flops_per_example(c) -> float:
    """Analytic matmul FLOPs of one training example (forward + backward = 3 x forward).

    Counted by hand because XLA's cost analysis counts a scanned layer's body once, not once per
    layer. Elementwise work (norms, GELU, softmax) is left out, as MFU conventionally does.
    """
    n_enc = c.len_keep + c.num_extra_tokens
    n_dec = c.num_patches + c.num_extra_tokens
    d, dd = c.embed_dim, c.decoder_embed_dim
    mlp = 2 * c.mlp_ratio
    fwd = 2.0 * c.num_patches * c.patch_dim * d                      # patch embedding
    fwd += c.depth * (2.0 * n_enc * d * d * (4 + mlp)
                      + _attention_flops(n_enc, d // c.num_heads, c.window_sizes))
    fwd += 2.0 * n_enc * d * dd                                       # decoder_embed
    fwd += c.decoder_depth * (2.0 * n_dec * dd * dd * (4 + mlp) + _attention_flops(
        n_dec, dd // c.decoder_num_heads, c.decoder_window_sizes))
    fwd += 2.0 * n_dec * dd * c.patch_dim                             # decoder_pred
    return 3.0 * fwd


def train_attention_flops_per_example(c) -> float:
    """The share of :func:`train_flops_per_example` inside attention (q @ k^T and p @ v, forward
    and backward): what a fused attention kernel computes, and what a count of the program's
    matmuls misses when the kernel is an opaque call."""
    n_enc = c.len_keep + c.num_extra_tokens
    n_dec = c.num_patches + c.num_extra_tokens
    fwd = c.depth * _attention_flops(n_enc, c.embed_dim // c.num_heads, c.window_sizes)
    fwd += c.decoder_depth * _attention_flops(
        n_dec, c.decoder_embed_dim // c.decoder_num_heads, c.decoder_window_sizes)
    return 3.0 * fwd


def encoder_flops_per_example(c) -> float:
    """Analytic matmul FLOPs of the encoder's forward over every patch (no masking): what a
    tagger's step runs forward, and three times that with its backward."""
    n = c.num_patches + c.num_extra_tokens
    d = c.embed_dim
    fwd = 2.0 * c.num_patches * c.patch_dim * d
    fwd += c.depth * (2.0 * n * d * d * (4 + 2 * c.mlp_ratio)
                      + _attention_flops(n, d // c.num_heads, c.window_sizes))
    return fwd


def encoder_attention_flops_per_example(c) -> float:
    """The share of :func:`encoder_flops_per_example` inside attention."""
    n = c.num_patches + c.num_extra_tokens
    return c.depth * _attention_flops(n, c.embed_dim // c.num_heads, c.window_sizes)
