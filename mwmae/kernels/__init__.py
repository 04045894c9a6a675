"""Multi-window attention: the one entry point the model calls.

``implementation`` selects how it is computed:
  * ``"xla"``: the vectorised jax.numpy reference (``reference.py``), the CPU default;
  * ``"auto"``: the fused kernel where one exists for the backend, else ``"xla"``.
Fused Pallas kernels register further implementations here as they land.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from mwmae.kernels.reference import multi_window_attention_xla

IMPLEMENTATIONS = ("auto", "xla")


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
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"expected one of {IMPLEMENTATIONS}")
    return multi_window_attention_xla(q, k, v, window_sizes, bias_tables, shift, scale=scale)
