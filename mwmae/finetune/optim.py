"""AdamW for the tagger: layer-wise learning-rate decay over the encoder, or a frozen encoder.

With decay ``d`` and ``L`` encoder blocks, block ``i`` (0-based) learns at ``d ** (L - i)`` of the
head's rate, the patch and position embeddings (and class token) at ``d ** (L + 1)``, the final
encoder norm and the head at the full rate (the BEiT / MAE fine-tuning recipe). The blocks are one
scanned, stacked parameter per kind, so the factor is a vector along their leading (layer) axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mwmae.model import ModelConfig, encoder_keys


def layer_scales(params: Any, config: ModelConfig, decay: float) -> Any:
    """A tree like ``params`` of factors (scalars, or (groups, 1, ...) for the stacked blocks)."""
    depth, period = config.depth, config.block_period
    groups = depth // period
    # A group of ``period`` blocks takes the factor of its last block.
    block = np.array([decay ** (depth - (g + 1) * period + 1) for g in range(groups)] if
                     period > 1 else [decay ** (depth - i) for i in range(depth)], np.float32)
    embed = np.float32(decay ** (depth + 1))

    def scale(path, leaf):
        names = [str(p.key) for p in path if hasattr(p, "key")]
        if names[0] == "encoder":
            return jnp.asarray(block).reshape(groups, *[1] * (np.ndim(leaf) - 1))
        if names[0] in ("patch_embed", "pos_embed", "cls_token"):
            return jnp.asarray(embed)
        return jnp.asarray(np.float32(1.0))
    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by its factor in ``scales`` (a tree like the parameters)."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def frozen_encoder_labels(params: Any, config: ModelConfig) -> dict[str, str]:
    keys = set(encoder_keys(config))
    return {k: jax.tree.map(lambda _, k=k: "frozen" if k in keys else "train", v)
            for k, v in params.items()}


def tagger_optimizer(params: Any, config: ModelConfig, schedule: optax.Schedule, *,
                     weight_decay: float, layer_decay: float, freeze_encoder: bool,
                     b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                     grad_clip_norm: float = 0.0, mask: Any = None
                     ) -> optax.GradientTransformation:
    """AdamW on ``schedule``; ``layer_decay`` < 1 scales the encoder's updates per layer;
    ``freeze_encoder`` leaves the encoder untouched (no update, no weight decay); ``mask``
    (a tree or a function of the parameters) says where weight decay applies."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    if layer_decay < 1.0 and not freeze_encoder:
        adamw = optax.chain(adamw, scale_by_tree(layer_scales(params, config, layer_decay)))
    if freeze_encoder:
        adamw = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                                      frozen_encoder_labels(params, config))
    if grad_clip_norm > 0:
        adamw = optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
    return adamw
