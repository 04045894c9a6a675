"""The masked autoencoder: MW-MAE (windowed heads) and the MAE baseline in one module."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mwmae.model.blocks import Stack, _part, dense_init, layer_norm
from mwmae.model.config import ModelConfig
from mwmae.model.embed import patchify, random_masking, sincos_1d, sincos_2d, with_cls_slot


class Reconstruction(NamedTuple):
    pred: jax.Array    # (B, L, patch_dim) float32
    target: jax.Array  # (B, L, patch_dim) float32 (normalised per patch if norm_pix_loss)
    mask: jax.Array    # (B, L) float32, 1 = masked (removed from the encoder)
    loss: jax.Array    # () float32


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix_loss: bool = False
             ) -> tuple[jax.Array, jax.Array]:
    """Mean squared error per patch, averaged over the masked patches of the whole batch."""
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(axis=-1)
    return (per_patch * mask).sum() / mask.sum(), target


class MaskedAutoencoder(nn.Module):
    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.patch_embed = nn.Conv(
            c.embed_dim, kernel_size=c.patch_size, strides=c.patch_size, padding="VALID",
            dtype=dtype,
            kernel_init=_part(nn.initializers.xavier_uniform(), (None, None, None, "embed")),
            bias_init=_part(nn.initializers.zeros, ("embed",)))
        # Position embeddings are trainable (and weight-decayed) as in the original; sin-cos is
        # only their initial value.
        self.pos_embed = self.param(
            "pos_embed", _part(lambda *_: jnp.asarray(with_cls_slot(
                sincos_2d(c.embed_dim, c.grid_size), c.use_cls_token)), (None, None, "embed")))
        if c.use_cls_token:
            self.cls_token = self.param("cls_token", _part(nn.initializers.normal(0.02),
                                                           (None, None, "embed")),
                                        (1, 1, c.embed_dim))
        self.encoder = Stack(c.depth, c.embed_dim, c.num_heads, c.window_sizes, c.block_period,
                             c.mlp_ratio, dtype, c.attention_impl, c.scan_unroll)
        self.encoder_norm = layer_norm(dtype)
        self.decoder_embed = nn.Dense(c.decoder_embed_dim, dtype=dtype,
                                      kernel_init=_part(dense_init, ("embed", "decoder_embed")),
                                      bias_init=_part(nn.initializers.zeros, ("decoder_embed",)))
        self.mask_token = self.param("mask_token", _part(nn.initializers.normal(0.02),
                                                         (None, None, "decoder_embed")),
                                     (1, 1, c.decoder_embed_dim))
        self.decoder_pos_embed = self.param(
            "decoder_pos_embed", _part(lambda *_: jnp.asarray(with_cls_slot(
                sincos_1d(c.decoder_embed_dim, np.arange(c.num_patches)), c.use_cls_token)),
                (None, None, "decoder_embed")))
        self.decoder = Stack(c.decoder_depth, c.decoder_embed_dim, c.decoder_num_heads,
                             c.decoder_window_sizes, c.block_period, c.mlp_ratio, dtype,
                             c.attention_impl, c.scan_unroll)
        self.decoder_norm = layer_norm(dtype)
        self.decoder_pred = nn.Dense(c.patch_dim, dtype=dtype,
                                     kernel_init=_part(dense_init, ("decoder_embed", None)),
                                     bias_init=_part(nn.initializers.zeros, (None,)))

    def _embed(self, imgs: jax.Array) -> jax.Array:
        c = self.config
        x = self.patch_embed(imgs.astype(c.dtype))
        x = x.reshape(x.shape[0], c.num_patches, c.embed_dim)
        return x + self.pos_embed[:, c.num_extra_tokens:].astype(x.dtype)

    def _prepend_cls(self, x: jax.Array) -> jax.Array:
        if not self.config.use_cls_token:
            return x
        cls = (self.cls_token + self.pos_embed[:, :1]).astype(x.dtype)
        return jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])), x], axis=1)

    def features(self, imgs: jax.Array) -> jax.Array:
        """(B, T, F, 1) -> (B, T/p, (F/q) * D): all patches, no masking, encoder + norm.

        Feature index f * D + d for frequency patch f, as the original arranges them.
        """
        c = self.config
        x = self._prepend_cls(self._embed(imgs))
        x = self.encoder_norm(self.encoder(x))[:, c.num_extra_tokens:]
        t, f = c.grid_size
        return x.reshape(x.shape[0], t, f * c.embed_dim).astype(jnp.float32)

    def __call__(self, imgs: jax.Array, noise: jax.Array) -> Reconstruction:
        """Mask by ``noise`` (B, L) uniform, encode the kept patches, decode all of them."""
        c = self.config
        x, mask, ids_restore = random_masking(self._embed(imgs), noise, c.len_keep)
        latent = self.encoder_norm(self.encoder(self._prepend_cls(x)))

        y = self.decoder_embed(latent)
        n_extra = c.num_extra_tokens
        body = y[:, n_extra:]
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(y.dtype),
                                       (y.shape[0], c.num_patches - body.shape[1], y.shape[2]))
        body = jnp.take_along_axis(jnp.concatenate([body, mask_tokens], axis=1),
                                   ids_restore[:, :, None], axis=1)
        y = jnp.concatenate([y[:, :n_extra], body], axis=1)
        y = y + self.decoder_pos_embed.astype(y.dtype)
        y = self.decoder_pred(self.decoder_norm(self.decoder(y)))[:, n_extra:]

        pred = y.astype(jnp.float32)
        target = patchify(jax.lax.stop_gradient(imgs).astype(jnp.float32), c.patch_size)
        loss, target = mae_loss(pred, target, mask, c.norm_pix_loss)
        return Reconstruction(pred, target, mask, loss)


def _dummy_inputs(config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    return (jnp.zeros((1, *config.input_shape), jnp.float32),
            jnp.zeros((1, config.num_patches), jnp.float32))


def init_params(config: ModelConfig, rng: jax.Array, *, boxed: bool = False) -> dict:
    """Fresh parameters; ``boxed`` keeps the logical-axis metadata used for sharding.

    Traced with the XLA attention: parameters do not depend on the implementation, and a fused
    kernel under a mesh cannot take the batch of one the dummy inputs have.
    """
    config = dataclasses.replace(config, attention_impl="xla")
    variables = MaskedAutoencoder(config).init(rng, *_dummy_inputs(config))
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def param_shapes(config: ModelConfig, *, boxed: bool = False) -> dict:
    """Parameter shapes and dtypes (no computation)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), boxed=boxed))
