"""Global attention through cuDNN's fused (flash) attention, for layers whose heads are all global.

A maintained library kernel in place of the project's own for the encoder's layers: cuDNN takes
q, k and v in the (batch, length, heads, head_dim) layout the qkv projection writes, so the
per-head transposes and the power-of-two padding the Pallas kernel needs around it disappear
from the step. It reaches cuDNN through ``jax.nn.dot_product_attention``, whose ``"xla"``
implementation is the same function in plain XLA: that is how its numerics are checked where no
GPU is (the library itself runs only on an NVIDIA GPU; a deviceless compile for one includes it).

Windowed heads stay with the other implementations: cuDNN's bias gradient needs even lengths and
the paper's windows 5, 25 and 125 are odd, and its sliding window is not MW-MAE's aligned one.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from mwmae.kernels.reference import Heads

# cuDNN's limits for bfloat16/float16 flash attention on Hopper (head dim a multiple of 8).
_MAX_HEAD_DIM = 256


def unsupported(window_sizes: Sequence[int], shift: bool, head_dim: int | None = None
                ) -> str | None:
    """Why a layer cannot run through cuDNN here, or None when it can."""
    if any(int(w) != 0 for w in window_sizes):
        return "cuDNN attention takes layers whose heads are all global (window 0)"
    if shift:
        return "cuDNN attention has no shifted windows"
    if head_dim is not None and (head_dim % 8 or head_dim > _MAX_HEAD_DIM):
        return f"cuDNN attention needs a head dim that is a multiple of 8 up to 256, not {head_dim}"
    return None


def attention_blhd(q: jax.Array, k: jax.Array, v: jax.Array, heads: Heads,
                   implementation: str = "cudnn") -> jax.Array:
    """Global attention of (batch, length, heads, head_dim) inputs, same layout out.

    ``implementation="xla"`` runs the same function without cuDNN (numerics checks on CPU).
    """
    why = unsupported(heads.window_sizes, heads.shift, q.shape[-1])
    if why:
        raise ValueError(why)
    if q.dtype not in (jax.numpy.bfloat16, jax.numpy.float16) and implementation == "cudnn":
        raise ValueError(f"cuDNN attention computes in bfloat16 or float16, not {q.dtype}; use "
                         "the 'xla' attention for float32")
    return jax.nn.dot_product_attention(q, k, v, scale=heads.scale,
                                        implementation=implementation)
