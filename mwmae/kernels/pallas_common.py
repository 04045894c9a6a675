"""Static metadata and XLA-side glue shared by the TPU and GPU multi-window attention kernels.

Both kernels see the sequence after three cheap XLA steps that keep the kernels simple:
  * shifted heads are rolled by ``-(w // 2)`` (per head, static) so that every window is a
    contiguous, aligned run of ``w`` positions; the output is rolled back afterwards;
  * the sequence is zero-padded to the kernel's tile multiple;
  * each head's bias table is rearranged into a "diagonal vector" indexed by the key-minus-query
    offset modulo its width (see ``diagonal_bias``), which the kernels expand on the fly.

Masking inside the kernels is driven by one int32 code per (head, position):
``window_id * 4 + region`` where ``region`` is the Swin label of a shifted window (0 otherwise)
and padded positions get window id -1. Two positions attend to each other iff their window ids
match (which also excludes padding); a shifted pair whose regions differ gets the reference's
additive -100.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mwmae.kernels.reference import shift_region_labels

# Finite so that fully masked rows (padding) stay NaN-free; exp(MASKED - max) is exactly 0.
MASKED = -1e30


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_power_of_2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Everything static about one attention call (hashable: it keys the custom_vjp)."""

    window_sizes: tuple[int, ...]
    length: int
    padded_length: int
    shift: bool
    scale: float
    bias_width: int

    @property
    def shifts(self) -> tuple[int, ...]:
        return tuple(w // 2 if (self.shift and w > 0) else 0 for w in self.window_sizes)

    @property
    def has_bias(self) -> bool:
        return any(w > 0 for w in self.window_sizes)

    @property
    def has_shift(self) -> bool:
        return any(s > 0 for s in self.shifts)

    @property
    def max_window(self) -> int:
        return max(self.window_sizes, default=0)

    def codes(self) -> np.ndarray:
        """(heads, padded_length) int32 codes ``window_id * 4 + region`` (padding: -4)."""
        lp, n = self.padded_length, self.length
        out = np.full((len(self.window_sizes), lp), -4, np.int32)
        pos = np.arange(n)
        for h, w in enumerate(self.window_sizes):
            if w == 0:
                out[h, :n] = 0
                continue
            region = shift_region_labels(n, w) if self.shifts[h] else np.zeros(n, np.int32)
            out[h, :n] = (pos // w) * 4 + region
        return out


def roll_heads(x: jax.Array, shifts: Sequence[int], sign: int) -> jax.Array:
    """Roll head h of (batch, heads, length, ...) by ``sign * shifts[h]`` along the length axis."""
    if not any(shifts):
        return x
    return jnp.stack([jnp.roll(x[:, h], sign * s, axis=1) if s else x[:, h]
                      for h, s in enumerate(shifts)], axis=1)


def pad_length(x: jax.Array, padded_length: int, padded_dim: int | None = None) -> jax.Array:
    extra_l = padded_length - x.shape[2]
    extra_d = 0 if padded_dim is None else padded_dim - x.shape[3]
    if extra_l == 0 and extra_d == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, 0), (0, extra_l), (0, extra_d)))


def diagonal_bias(bias_tables: jax.Array, window_sizes: Sequence[int], width: int) -> jax.Array:
    """(heads, T) tables -> (heads, width) float32 vectors indexed by (key - query) mod width.

    For a query i and key j in the same window of head h, the reference bias is
    ``table[h, i - j + w - 1]``; with ``d = j - i`` in (-w, w) it sits at ``out[h, d mod width]``.
    ``width >= 2 * w - 1`` keeps positive and negative offsets apart. Entries no window reaches
    (and whole rows of global heads) are zero. The rearrangement is a static gather, so JAX
    differentiates it: the kernels return gradients in this layout and XLA scatters them back.
    """
    num_heads = len(window_sizes)
    index = np.zeros((num_heads, width), np.int32)
    valid = np.zeros((num_heads, width), bool)
    for h, w in enumerate(window_sizes):
        if w == 0:
            continue
        if width < 2 * w - 1:
            raise ValueError(f"bias width {width} too small for window {w}")
        for d in range(-(w - 1), w):
            index[h, d % width] = w - 1 - d
            valid[h, d % width] = True
    gathered = jnp.take_along_axis(bias_tables.astype(jnp.float32), jnp.asarray(index), axis=1)
    return jnp.where(jnp.asarray(valid), gathered, 0.0)


def prepare(q: jax.Array, k: jax.Array, v: jax.Array, geom: Geometry,
            padded_dim: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Roll shifted heads into window-aligned order and pad to the kernel's tile."""
    return tuple(pad_length(roll_heads(t, geom.shifts, -1), geom.padded_length, padded_dim)
                 for t in (q, k, v))


def finish(out: jax.Array, geom: Geometry, head_dim: int) -> jax.Array:
    """Drop padding and roll shifted heads back to their original positions."""
    return roll_heads(out[:, :, :geom.length, :head_dim], geom.shifts, 1)
