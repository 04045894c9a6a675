"""Vectorised multi-window attention in plain jax.numpy.

This is the numerical ground truth for the fused kernels and the CPU default. Heads that share a
window size are computed together: the sequence is cut into non-overlapping windows and one batched
einsum per group computes all windows of all heads in the group. There is no Python loop over
heads, only over the distinct window sizes of a layer (at most a handful).

Semantics follow the original MW-MAE implementation exactly:
  * windows are contiguous runs of ``w`` tokens of the flattened sequence;
  * the bias of query ``i`` and key ``j`` inside a window is ``table[i - j + w - 1]``;
  * global heads (``w == 0``) attend over the whole sequence with no bias;
  * shifted windows roll q, k, v by ``-(w // 2)``, add ``-100`` (not -inf) between tokens whose
    Swin-style region labels differ, and roll the output back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SHIFT_MASK_VALUE = -100.0


def shift_region_labels(length: int, window: int) -> np.ndarray:
    """Swin-style region label of every position for a shifted window of size ``window``."""
    shift = window // 2
    labels = np.zeros((length,), np.int32)
    labels[length - window:length - shift] = 1
    labels[length - shift:] = 2
    return labels


def shift_mask(length: int, window: int) -> np.ndarray:
    """Additive mask (num_windows, w, w): -100 where query and key regions differ, else 0."""
    labels = shift_region_labels(length, window).reshape(length // window, window)
    differ = labels[:, :, None] != labels[:, None, :]
    return np.where(differ, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def relative_bias(table: jax.Array, window: int) -> jax.Array:
    """Expand a (..., 2w-1) bias table to (..., w, w) with bias[i, j] = table[i - j + w - 1]."""
    idx = np.arange(window)[:, None] - np.arange(window)[None, :] + window - 1
    return table[..., idx]


def check_window_sizes(window_sizes: Sequence[int], length: int) -> None:
    for h, w in enumerate(window_sizes):
        if w < 0:
            raise ValueError(f"head {h}: window size {w} is negative (0 means a global head)")
        if w > 0 and length % w != 0:
            raise ValueError(
                f"head {h}: window size {w} does not divide the sequence length {length}; every "
                f"windowed head needs a window size that divides the number of tokens it sees")


def _global_attention(q, k, v, scale: float):
    """(output, float32 probabilities (b, g, L, L))."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out, probs


def _windowed_attention(q, k, v, table, window: int, shift: bool, scale: float):
    """(output, float32 probabilities per window (b, g, L / w, w, w) of the rolled sequence)."""
    b, g, length, d = q.shape
    s = window // 2 if shift else 0
    if s:
        q, k, v = (jnp.roll(t, -s, axis=2) for t in (q, k, v))
    n = length // window
    qw, kw, vw = (t.reshape(b, g, n, window, d) for t in (q, k, v))
    scores = jnp.einsum("bgnqd,bgnkd->bgnqk", qw, kw, preferred_element_type=jnp.float32) * scale
    scores = scores + relative_bias(table.astype(jnp.float32), window)[None, :, None]
    if s:
        scores = scores + shift_mask(length, window)[None, None]
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgnqk,bgnkd->bgnqd", probs.astype(v.dtype), vw,
                     preferred_element_type=jnp.float32)
    out = out.reshape(b, g, length, d)
    if s:
        out = jnp.roll(out, s, axis=2)
    return out, probs


def dense_window_probabilities(probs: jax.Array, window: int, shift: bool) -> jax.Array:
    """Per-window probabilities (b, g, L / w, w, w) -> (b, g, L, L) over the whole sequence, in
    the tokens' own order: exact zeros outside each query's window (shifted windows are rolled
    back, so a query's window is where the shifted layer really looked)."""
    b, g, n, w, _ = probs.shape
    length = n * w
    # Block diagonal: window m's (w, w) block lands at rows and columns m*w ... m*w + w - 1.
    dense = jnp.einsum("bgnqk,nm->bgnqmk", probs, jnp.eye(n, dtype=probs.dtype))
    dense = dense.reshape(b, g, length, length)
    s = window // 2 if shift else 0
    # Rolled position p held token p + s: rolling both axes by +s puts token i at row i.
    return jnp.roll(dense, (s, s), axis=(2, 3)) if s else dense


@dataclasses.dataclass(frozen=True)
class Heads:
    """What one call asks of its heads, static and checked: each head's window size (0 = a global
    head), whether windows are shifted, and the factor on q @ k^T. Every implementation takes it."""

    window_sizes: tuple[int, ...]
    shift: bool
    scale: float


def check_call(q: jax.Array, k: jax.Array, v: jax.Array, window_sizes: Sequence[int],
               bias_tables: jax.Array, shift: bool, scale: float | None) -> Heads:
    """The contract of ``multi_window_attention``, checked once for every implementation.

    q, k, v: (batch, heads, length, head_dim); window_sizes: one per head, each dividing the
    length; bias_tables: (heads, T) with T >= 2 * max(window_sizes) - 1 (head h uses its first
    2 * w_h - 1 entries, the rest is padding and gets zero gradient); scale defaults to
    head_dim ** -0.5.
    """
    window_sizes = tuple(int(w) for w in window_sizes)
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (batch, heads, length, head_dim) shape; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    num_heads, length = q.shape[1], q.shape[2]
    if len(window_sizes) != num_heads:
        raise ValueError(f"got {len(window_sizes)} window sizes for {num_heads} heads")
    check_window_sizes(window_sizes, length)
    need = 2 * max(window_sizes) - 1
    if bias_tables.ndim != 2 or bias_tables.shape[0] != num_heads or (
            need > 0 and bias_tables.shape[1] < need):
        raise ValueError(f"bias_tables must be (heads={num_heads}, T>={need}); got "
                         f"{bias_tables.shape}")
    return Heads(window_sizes, bool(shift),
                 q.shape[-1] ** -0.5 if scale is None else float(scale))


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, bias_tables: jax.Array,
                  heads: Heads) -> jax.Array:
    """Multi-window attention as batched einsums, one per distinct window size; returns
    (batch, heads, length, head_dim) in the dtype of v. Inputs as ``check_call`` accepts them."""
    return _attention(q, k, v, bias_tables, heads, with_probs=False)[0]


def attention_xla_with_probs(q: jax.Array, k: jax.Array, v: jax.Array, bias_tables: jax.Array,
                             heads: Heads) -> tuple[jax.Array, jax.Array]:
    """:func:`attention_xla`'s output (the same computation, so the same numbers) and every
    head's attention probabilities as one dense float32 (batch, heads, length, length) array:
    row i is query i's distribution over the keys, zero outside a windowed head's window."""
    return _attention(q, k, v, bias_tables, heads, with_probs=True)


def _attention(q, k, v, bias_tables, heads: Heads, with_probs: bool):
    window_sizes, shift, scale = heads.window_sizes, heads.shift, heads.scale
    groups: dict[int, list[int]] = {}
    for h, w in enumerate(window_sizes):
        groups.setdefault(w, []).append(h)
    outs, dense, order = [], [], []
    for w, members in groups.items():
        idx = np.asarray(members)
        qg, kg, vg = q[:, idx], k[:, idx], v[:, idx]
        if w == 0:
            out, probs = _global_attention(qg, kg, vg, scale)
        else:
            table = bias_tables[idx, : 2 * w - 1]
            out, probs = _windowed_attention(qg, kg, vg, table, w, shift, scale)
            if with_probs:
                probs = dense_window_probabilities(probs, w, shift)
        outs.append(out)
        dense.append(probs)
        order.extend(members)
    out = _in_head_order(outs, order).astype(v.dtype)
    return out, _in_head_order(dense, order) if with_probs else None


def _in_head_order(parts: list[jax.Array], order: list[int]) -> jax.Array:
    """Per-group arrays (heads on axis 1, grouped by window size) -> heads in their own order."""
    out = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if order != sorted(order):
        out = out[:, np.argsort(np.asarray(order))]
    return out
