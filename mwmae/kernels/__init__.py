"""Multi-window attention: the one entry point the model calls.

``implementation`` selects how it is computed:
  * ``"xla"``: the vectorised jax.numpy reference (``reference.py``), the CPU default;
  * ``"auto"``: the fused Pallas kernel for the backend (Mosaic on TPU, Triton on GPU), else
    ``"xla"``;
  * ``"pallas"``: the fused kernel for the backend, an error where there is none (CPU);
  * ``"pallas_tpu"`` / ``"pallas_gpu"``: one kernel explicitly (compiled);
  * ``"pallas_interpret"``: the TPU kernel under the generic Pallas interpreter (any backend;
    for tests and debugging, slow);
  * ``"pallas_tpu_interpret"``: the TPU kernel under the TPU interpreter, which also simulates
    VMEM and detects races (very slow);
  * ``"pallas_gpu_interpret"``: the GPU kernel under the generic Pallas interpreter.
Every implementation has the same contract, supports jit and grad (bias tables included), and
agrees with the reference to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from mwmae.kernels.reference import multi_window_attention_xla

IMPLEMENTATIONS = (
    "auto",
    "xla",
    "pallas",
    "pallas_tpu",
    "pallas_gpu",
    "pallas_interpret",
    "pallas_tpu_interpret",
    "pallas_gpu_interpret",
)

# Above this the TPU kernel's whole-sequence VMEM blocks stop fitting comfortably; "auto" then
# falls back to the reference (the model's sequences are 250 tokens).
_MAX_KERNEL_LENGTH = 1024


def resolve_implementation(implementation: str, length: int | None = None) -> str:
    """The concrete implementation ``implementation`` stands for on the default backend."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one of "
                         f"{IMPLEMENTATIONS}")
    if implementation not in ("auto", "pallas"):
        return implementation
    backend = jax.default_backend()
    if backend == "tpu":
        kernel = "pallas_tpu"
    elif backend in ("gpu", "cuda", "rocm"):
        kernel = "pallas_gpu"
    elif implementation == "pallas":
        raise ValueError(f"no compiled Pallas attention kernel for the {backend!r} backend; use "
                         f"'auto', 'xla' or 'pallas_interpret'")
    else:
        return "xla"
    if implementation == "auto" and length is not None and length > _MAX_KERNEL_LENGTH:
        return "xla"
    return kernel


def multi_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window_sizes: Sequence[int],
    bias_tables: jax.Array,
    shift: bool = False,
    *,
    scale: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Attention where head h attends within windows of ``window_sizes[h]`` tokens (0 = global).

    q, k, v: (batch, heads, length, head_dim); bias_tables: (heads, T), T >= 2 * max(w) - 1.
    Returns (batch, heads, length, head_dim).
    """
    impl = resolve_implementation(implementation, q.shape[2])
    if impl == "xla":
        return multi_window_attention_xla(q, k, v, window_sizes, bias_tables, shift, scale=scale)
    if impl in ("pallas_tpu", "pallas_interpret", "pallas_tpu_interpret"):
        from mwmae.kernels.pallas_tpu import multi_window_attention_tpu

        interpret = {"pallas_tpu": False, "pallas_interpret": "generic",
                     "pallas_tpu_interpret": "tpu"}[impl]
        return multi_window_attention_tpu(q, k, v, window_sizes, bias_tables, shift,
                                          scale=scale, interpret=interpret)
    from mwmae.kernels.pallas_gpu import multi_window_attention_gpu

    return multi_window_attention_gpu(q, k, v, window_sizes, bias_tables, shift, scale=scale,
                                      interpret=impl == "pallas_gpu_interpret")
