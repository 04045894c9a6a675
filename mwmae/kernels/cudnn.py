"""Multi-window attention through cuDNN's fused (flash) attention.

A maintained library kernel in place of the project's own: cuDNN takes q, k and v in the
(batch, length, heads, head_dim) layout the qkv projection writes, so the per-head transposes
and the power-of-two padding a Pallas kernel needs around it disappear from the step. It
reaches cuDNN through ``jax.nn.dot_product_attention``, whose ``"xla"`` implementation is the
same function in plain XLA: that is how its numerics are checked where no GPU is (the library
runs only on an NVIDIA GPU; a deviceless compile for one includes it).

Windowed heads go through the same call as the global ones. MW-MAE's windows are aligned runs of
``w`` tokens, which cuDNN's sliding window cannot say, so the layer's windows become data: one
(1, heads, L, L) additive bias, shared by the batch, holding each windowed head's relative
position bias inside its windows and a mask outside them (global heads: no bias, no mask).
Attention is equivariant to reordering its tokens, so a shifted layer needs no roll: a token's
window, its place in it and the shift's -100 region mask are all read from its rolled position.
The bias is gathered from the float32 tables and cast to the compute dtype; its gradient (cuDNN
sums it over the batch) goes back to the tables in float32. cuDNN's bias gradient needs an even
sequence length (250 tokens: yes; the encoder's global layers carry no bias at all).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mwmae.kernels.reference import SHIFT_MASK_VALUE, Heads, shift_region_labels

# cuDNN's limits for bfloat16/float16 flash attention on Hopper (head dim a multiple of 8).
_MAX_HEAD_DIM = 256


def unsupported(window_sizes: Sequence[int], head_dim: int | None = None,
                length: int | None = None) -> str | None:
    """Why a layer cannot run through cuDNN here, or None when it can (shifted or not: the
    shift is part of the bias)."""
    windowed = any(int(w) != 0 for w in window_sizes)
    if head_dim is not None and (head_dim % 8 or head_dim > _MAX_HEAD_DIM):
        return f"cuDNN attention needs a head dim that is a multiple of 8 up to 256, not {head_dim}"
    if windowed and length is not None and length % 2:
        return (f"cuDNN's bias gradient needs an even sequence length, and a windowed layer "
                f"carries a bias; this one has {length} tokens")
    return None


@functools.lru_cache(maxsize=64)
def window_layout(window_sizes: tuple[int, ...], shift: bool, length: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Static parts of a layer's dense bias, or None when every head is global.

    Returns ``(index, constant, allowed)``, each (heads, L, L): ``index`` points into a head's
    table extended by one zero entry at the end (used outside windows and by global heads),
    ``constant`` is the shift's region mask (0 or -100) and ``allowed`` is True where query i
    may attend to key j.
    """
    if not any(window_sizes):
        return None
    heads = len(window_sizes)
    width = 2 * max(window_sizes) - 1  # the stacked tables' width; its zero entry goes after
    index = np.full((heads, length, length), width, np.int32)
    constant = np.zeros((heads, length, length), np.float32)
    allowed = np.ones((heads, length, length), bool)
    for h, w in enumerate(window_sizes):
        if w == 0:
            continue
        s = w // 2 if shift else 0
        rolled = (np.arange(length) - s) % length  # where each token sits in the rolled sequence
        window, place = rolled // w, rolled % w
        same = window[:, None] == window[None, :]
        allowed[h] = same
        index[h] = np.where(same, place[:, None] - place[None, :] + w - 1, width)
        if s:
            labels = shift_region_labels(length, w)[rolled]
            constant[h] = np.where(same & (labels[:, None] != labels[None, :]),
                                   SHIFT_MASK_VALUE, 0.0)
    return index, constant, allowed


def dense_bias(tables: jax.Array, heads: Heads, length: int
               ) -> tuple[jax.Array | None, np.ndarray | None]:
    """(bias float32 (1, heads, L, L), mask bool (1, heads, L, L)) of a layer; (None, None)
    when every head is global. Differentiable in ``tables`` (heads, T)."""
    layout = window_layout(heads.window_sizes, heads.shift, length)
    if layout is None:
        return None, None
    index, constant, allowed = layout
    width = 2 * max(heads.window_sizes) - 1
    tables = jnp.concatenate([tables[:, :width].astype(jnp.float32),
                              jnp.zeros((tables.shape[0], 1), jnp.float32)], axis=1)
    flat = jnp.take_along_axis(tables, jnp.asarray(index.reshape(len(index), -1)), axis=1)
    bias = flat.reshape(index.shape) + constant
    return bias[None], allowed[None]


def attention_blhd(q: jax.Array, k: jax.Array, v: jax.Array, heads: Heads,
                   tables: jax.Array | None = None, implementation: str = "cudnn") -> jax.Array:
    """Multi-window attention of (batch, length, heads, head_dim) inputs, same layout out.

    ``tables``: the (heads, T) relative position bias tables, needed when any head is windowed.
    ``implementation="xla"`` runs the same function without cuDNN (numerics checks on CPU).
    """
    length = q.shape[1]
    why = unsupported(heads.window_sizes, q.shape[-1], length)
    if why:
        raise ValueError(why)
    if q.dtype not in (jnp.bfloat16, jnp.float16) and implementation == "cudnn":
        raise ValueError(f"cuDNN attention computes in bfloat16 or float16, not {q.dtype}; use "
                         "the 'xla' attention for float32")
    bias = mask = None
    if any(heads.window_sizes):
        if tables is None:
            raise ValueError("windowed heads need their bias tables")
        bias, mask = dense_bias(tables, heads, length)
        bias, mask = bias.astype(q.dtype), jnp.asarray(mask)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=heads.scale,
                                        implementation=implementation)
