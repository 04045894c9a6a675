"""Flax parameter names of the JAX encoder -> this package's ``state_dict``.

A tensor's name is its path in the JAX ``Encoder``'s parameter tree joined with "/"
(``"/".join(key)`` over ``flax.traverse_util.flatten_dict(params)``), with the arrays exactly
as flax stores them. The encoder's layers are one ``nn.scan`` over groups of ``period`` blocks
(2 with ``shifting_windows``, whose odd blocks shift; else 1), so every layer tensor carries a
leading axis over the ``depth / period`` groups, and block ``i`` of group ``g`` is layer
``g * period + i``. Below, D is the width, H the heads of d = D / H channels each,
M = D * mlp_ratio, G = depth / period, ``B/`` stands for ``encoder/layers/block_i/`` and ``l``
for the layer index.

=================================  ==================  =====================================
flax name                          flax shape          torch name (shape)
=================================  ==================  =====================================
``patch_embed/kernel``             (p, q, C, D)        ``patch_embed.weight`` (D, C, p, q)
``patch_embed/bias``               (D,)                ``patch_embed.bias``
``pos_embed``                      (1, [1 +] T*F, D)   ``pos_embed``
``cls_token`` (cls configs)        (1, 1, D)           ``cls_token``
``B/norm1/{scale,bias}``           (G, D)              ``blocks.l.norm1.{weight,bias}``
``B/attn/qkv/kernel``              (G, D, 3, H, d)     ``blocks.l.attn.qkv.weight`` (3D, D)
``B/attn/qkv/bias``                (G, 3, H, d)        ``blocks.l.attn.qkv.bias`` (3D,)
``B/attn/rel_pos_bias_<h>``        (G, 2w_h - 1)       ``blocks.l.attn.rel_pos_bias_<h>``
``B/attn/proj/kernel``             (G, H, d, D)        ``blocks.l.attn.proj.weight`` (D, D)
``B/attn/proj/bias``               (G, D)              ``blocks.l.attn.proj.bias``
``B/norm2/{scale,bias}``           (G, D)              ``blocks.l.norm2.{weight,bias}``
``B/mlp/fc1/{kernel,bias}``        (G, D, M), (G, M)   ``blocks.l.mlp.fc1.{weight,bias}``
``B/mlp/fc2/{kernel,bias}``        (G, M, D), (G, D)   ``blocks.l.mlp.fc2.{weight,bias}``
``encoder_norm/{scale,bias}``      (D,)                ``encoder_norm.{weight,bias}``
=================================  ==================  =====================================

``rel_pos_bias_<h>`` exists only for the windowed heads (w_h > 0), numbered by the head's
index among all heads. Dense kernels are (in, out) in flax and (out, in) in ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch

from mwmae.torch.config import EncoderConfig

# Top-level entries of a whole autoencoder's tree that the encoder does not use.
DECODER_ENTRIES = frozenset({"decoder_embed", "mask_token", "decoder_pos_embed", "decoder",
                             "decoder_norm", "decoder_pred"})


class WeightsError(ValueError):
    """Tensors that do not fit the config; the message lists every one."""


Transform = Callable[[torch.Tensor], torch.Tensor]
_same: Transform = lambda t: t
_dense: Transform = lambda t: t.T  # flax (in, out) -> nn.Linear (out, in)


class _Target(NamedTuple):
    shape: tuple[int, ...]   # as flax stores it
    name: str                # in the torch state_dict; for a layer tensor, inside blocks.<l>
    transform: Transform     # flax array (one layer's slice) -> torch tensor
    block: int | None = None  # a layer tensor: its block within the scanned group


def _targets(config: EncoderConfig) -> dict[str, _Target]:
    c = config
    d, h, hd = c.embed_dim, c.num_heads, c.head_dim
    m = d * c.mlp_ratio
    p, q = c.patch_size
    out = {
        "patch_embed/kernel": _Target((p, q, c.in_chans, d), "patch_embed.weight",
                                      lambda t: t.permute(3, 2, 0, 1)),
        "patch_embed/bias": _Target((d,), "patch_embed.bias", _same),
        "pos_embed": _Target((1, c.num_tokens, d), "pos_embed", _same),
        "encoder_norm/scale": _Target((d,), "encoder_norm.weight", _same),
        "encoder_norm/bias": _Target((d,), "encoder_norm.bias", _same),
    }
    if c.use_cls_token:
        out["cls_token"] = _Target((1, 1, d), "cls_token", _same)
    per_block: dict[str, tuple[tuple[int, ...], str, Transform]] = {
        "norm1/scale": ((d,), "norm1.weight", _same),
        "norm1/bias": ((d,), "norm1.bias", _same),
        "attn/qkv/kernel": ((d, 3, h, hd), "attn.qkv.weight", lambda t: t.reshape(d, 3 * d).T),
        "attn/qkv/bias": ((3, h, hd), "attn.qkv.bias", lambda t: t.reshape(3 * d)),
        "attn/proj/kernel": ((h, hd, d), "attn.proj.weight", lambda t: t.reshape(d, d).T),
        "attn/proj/bias": ((d,), "attn.proj.bias", _same),
        "norm2/scale": ((d,), "norm2.weight", _same),
        "norm2/bias": ((d,), "norm2.bias", _same),
        "mlp/fc1/kernel": ((d, m), "mlp.fc1.weight", _dense),
        "mlp/fc1/bias": ((m,), "mlp.fc1.bias", _same),
        "mlp/fc2/kernel": ((m, d), "mlp.fc2.weight", _dense),
        "mlp/fc2/bias": ((d,), "mlp.fc2.bias", _same),
    }
    for head, w in enumerate(c.window_sizes):
        if w > 0:
            per_block[f"attn/rel_pos_bias_{head}"] = ((2 * w - 1,), f"attn.rel_pos_bias_{head}",
                                                      _same)
    groups = c.depth // c.block_period
    for i in range(c.block_period):
        for rest, (shape, torch_name, fn) in per_block.items():
            out[f"encoder/layers/block_{i}/{rest}"] = _Target((groups, *shape), torch_name, fn, i)
    return out


def param_shapes(config: EncoderConfig | Mapping[str, Any] | Any) -> dict[str, tuple[int, ...]]:
    """Every tensor name the encoder of ``config`` takes, with its flax shape."""
    return {k: v.shape for k, v in _targets(EncoderConfig.coerce(config)).items()}


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))


def check_params(config: EncoderConfig, params: Mapping[str, Any]) -> None:
    """Raise one WeightsError naming every missing, unexpected and mis-shaped tensor."""
    if not isinstance(params, Mapping):
        raise WeightsError(f"params must be a flat mapping name -> array, got "
                           f"{type(params).__name__}")
    want = param_shapes(config)
    got = {str(k): _shape(v) for k, v in params.items()}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape {got[k]}, the config implies {want[k]}"
                 for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    non_float = [k for k, v in params.items() if k in want and not _is_float(v)]
    problems += [f"{k}: dtype {_dtype(params[k])} is not floating point" for k in sorted(non_float)]
    if problems:
        hint = ""
        if any(str(k).split("/")[0] in DECODER_ENTRIES for k in got):
            hint = " (decoder tensors are not the encoder's: leave them out)"
        raise WeightsError(f"{len(problems)} tensor(s) do not fit the encoder config{hint}:\n  "
                           + "\n  ".join(problems))


def _dtype(value: Any) -> Any:
    return value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype


def _is_float(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point()
    kind = np.dtype(_dtype(value)).kind
    # JAX's bfloat16 (an ml_dtypes type) has numpy kind "V"; it converts to float32 exactly.
    return kind == "f" or str(_dtype(value)) == "bfloat16"


def _to_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32)
    # A copy: arrays from JAX are read-only, and bfloat16 ones have no torch view.
    return torch.tensor(np.asarray(value).astype(np.float32))


def state_dict_from_params(config: EncoderConfig, params: Mapping[str, Any]
                           ) -> dict[str, torch.Tensor]:
    """Checked flax-named params -> a float32 ``state_dict`` for :class:`Encoder`."""
    check_params(config, params)
    state: dict[str, torch.Tensor] = {}
    for name, target in _targets(config).items():
        t = _to_tensor(params[name])
        if target.block is None:
            state[target.name] = target.transform(t).contiguous()
            continue
        for g in range(t.shape[0]):
            layer = g * config.block_period + target.block
            state[f"blocks.{layer}.{target.name}"] = target.transform(t[g]).contiguous()
    return state
