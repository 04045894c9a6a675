"""Running a model with its attention captured: per layer, the probabilities and head outputs.

The model's ``capture_attention`` option (see :class:`mwmae.model.blocks.MultiWindowAttention`)
makes every attention layer sow its probabilities and per-head outputs, computed by the XLA
reference whatever ``attention_impl`` the config names. The two passes analysed:

* **encoder**: all patches through the :class:`~mwmae.model.Encoder`, no masking (mask ratio 0,
  as ``features`` and the paper's analysis of the encoder on whole inputs), so its attention is
  over every patch of the grid;
* **decoder**: the pretraining forward of the :class:`~mwmae.model.MaskedAutoencoder`: the
  encoder sees the kept patches (the config's mask ratio, a mask drawn from a seed), the
  decoder all of them, visible and mask tokens, in grid order; its attention is over those.

A class token (the MAE baseline's) is not on the grid: its row and column are dropped and each
patch query's probabilities renormalised over the patch keys; its output is left out of CKA.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mwmae.model import Encoder, MaskedAutoencoder, ModelConfig, encoder_keys

PARTS = ("encoder", "decoder")


def _per_layer(stack: Mapping[str, Any], period: int, extra: int) -> dict[str, jax.Array]:
    """A ``Stack``'s sown entries -> ``attention`` (L, B, H, N, N) and ``head_outputs``
    (L, B, N, H, head_dim) over the patch tokens, layers in order."""
    blocks = [stack["layers"][f"block_{i}"]["attn"] for i in range(period)]
    out = {}
    for name in ("attention", "head_outputs"):
        # (groups, period, ...): block i of group g is layer g * period + i.
        stacked = jnp.stack([b[name][0] for b in blocks], axis=1)
        out[name] = stacked.reshape(-1, *stacked.shape[2:])
    if extra:
        probs = out["attention"][..., extra:, extra:]
        out["attention"] = probs / probs.sum(axis=-1, keepdims=True)
        out["head_outputs"] = out["head_outputs"][:, :, extra:]
    return out


def encoder_pass(config: ModelConfig) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
    """jitted ``(params, x) -> {attention, head_outputs}`` of the encoder on whole inputs
    ``x`` (B, frames, mels, 1); ``params`` may hold the decoder too (it is not used)."""
    config = config.replace(attention_impl="xla")
    module, keys = Encoder(config, capture_attention=True), encoder_keys(config)

    def run(params: Any, x: jax.Array) -> dict[str, jax.Array]:
        _, state = module.apply({"params": {k: params[k] for k in keys}}, x,
                                mutable=["intermediates"])
        return _per_layer(state["intermediates"]["encoder"], config.block_period,
                          config.num_extra_tokens)

    return jax.jit(run)


def decoder_pass(config: ModelConfig
                 ) -> Callable[[Any, jax.Array, jax.Array], dict[str, jax.Array]]:
    """jitted ``(params, x, noise) -> {attention, head_outputs, mask}`` of the decoder in the
    pretraining forward; ``noise`` (B, num_patches) picks the kept patches as in training,
    ``mask`` (B, N) is 1 where the decoder saw a mask token."""
    config = config.replace(attention_impl="xla")
    module = MaskedAutoencoder(config, capture_attention=True)

    def run(params: Any, x: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
        rec, state = module.apply({"params": params}, x, noise, mutable=["intermediates"])
        out = _per_layer(state["intermediates"]["decoder"], config.block_period,
                         config.num_extra_tokens)
        return {**out, "mask": rec.mask}

    return jax.jit(run)


def mask_noise(seed: int, batch_index: int, batch: int, num_patches: int) -> jax.Array:
    """The decoder pass's masking noise for one batch: a pure function of (seed, batch)."""
    key = jax.random.fold_in(jax.random.key(seed), batch_index)
    return jax.random.uniform(key, (batch, num_patches), jnp.float32)
