"""The masked autoencoder: MW-MAE (windowed heads) and the MAE baseline in one module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

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


class Encoder(nn.Module):
    """Patch embedding, position embeddings, the encoder stack and its norm: what HEAR,
    export and fine-tuning use. Its parameters are the top-level entries ``patch_embed``,
    ``pos_embed``, (``cls_token``), ``encoder``, ``encoder_norm``, as in the original."""

    config: ModelConfig
    drop_path: float = 0.0  # stochastic depth for supervised training (see ``Stack``)
    # Sow every layer's attention probabilities and head outputs (``intermediates``, under
    # ``encoder``; see ``MultiWindowAttention``), computed by the XLA reference.
    capture_attention: bool = False

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
                             c.mlp_ratio, dtype, c.attention_impl, c.scan_unroll,
                             self.drop_path, self.capture_attention)
        self.encoder_norm = layer_norm(dtype)

    def embed(self, imgs: jax.Array) -> jax.Array:
        """(B, T, F, 1) -> (B, L, D) patch tokens with their position embeddings."""
        c = self.config
        x = self.patch_embed(imgs.astype(c.dtype))
        x = x.reshape(x.shape[0], c.num_patches, c.embed_dim)
        return x + self.pos_embed[:, c.num_extra_tokens:].astype(x.dtype)

    def encode(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        """Patch tokens (all, or the kept ones) -> normalised encoder outputs, cls first when the
        config has one. ``deterministic=False`` applies stochastic depth."""
        x = tokens
        if self.config.use_cls_token:
            cls = (self.cls_token + self.pos_embed[:, :1]).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])), x], axis=1)
        return self.encoder_norm(self.encoder(x, deterministic))

    def __call__(self, imgs: jax.Array) -> jax.Array:
        """(B, T, F, 1) -> (B, T/p, (F/q) * D): all patches, no masking, encoder + norm.

        Feature index f * D + d for frequency patch f, as the original arranges them.
        """
        c = self.config
        x = self.encode(self.embed(imgs))[:, c.num_extra_tokens:]
        t, f = c.grid_size
        return x.reshape(x.shape[0], t, f * c.embed_dim).astype(jnp.float32)


class MaskedAutoencoder(nn.Module):
    """The :class:`Encoder` plus the decoder that only pretraining needs.

    ``capture_attention``: both stacks sow their attention (``intermediates`` under ``encoder``,
    which then sees only the kept patches, and ``decoder``, over all of them).
    """

    config: ModelConfig
    capture_attention: bool = False

    def setup(self) -> None:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        # The encoder's parameters stay at the top level of the tree (the original layout).
        self.backbone = Encoder(c, capture_attention=self.capture_attention)
        nn.share_scope(self, self.backbone)
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
                             c.attention_impl, c.scan_unroll, capture=self.capture_attention)
        self.decoder_norm = layer_norm(dtype)
        self.decoder_pred = nn.Dense(c.patch_dim, dtype=dtype,
                                     kernel_init=_part(dense_init, ("decoder_embed", None)),
                                     bias_init=_part(nn.initializers.zeros, (None,)))

    def features(self, imgs: jax.Array) -> jax.Array:
        """The encoder's features (see :class:`Encoder`)."""
        return self.backbone(imgs)

    def __call__(self, imgs: jax.Array, noise: jax.Array) -> Reconstruction:
        """Mask by ``noise`` (B, L) uniform, encode the kept patches, decode all of them."""
        c = self.config
        x, mask, ids_restore = random_masking(self.backbone.embed(imgs), noise, c.len_keep)
        latent = self.backbone.encode(x)

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


def init_params(config: ModelConfig, rng: jax.Array, *, boxed: bool = False,
                encoder_only: bool = False) -> dict:
    """Fresh parameters (the :class:`Encoder`'s alone with ``encoder_only``); ``boxed`` keeps
    the logical-axis metadata used for sharding.

    Traced with the XLA attention: parameters do not depend on the implementation, and a fused
    kernel under a mesh cannot take the batch of one the dummy inputs have.
    """
    config = dataclasses.replace(config, attention_impl="xla")
    imgs, noise = _dummy_inputs(config)
    if encoder_only:
        variables = Encoder(config).init(rng, imgs)
    else:
        variables = MaskedAutoencoder(config).init(rng, imgs, noise)
    params = variables["params"]
    return params if boxed else nn.meta.unbox(params)


def param_shapes(config: ModelConfig, *, boxed: bool = False, encoder_only: bool = False
                 ) -> dict:
    """Parameter shapes and dtypes (no computation)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), boxed=boxed,
                                              encoder_only=encoder_only))


def encoder_keys(config: ModelConfig) -> tuple[str, ...]:
    """The top-level parameter entries that belong to the encoder."""
    return tuple(param_shapes(config, encoder_only=True))


def param_problems(config: ModelConfig, params: Any, *, encoder_only: bool = False,
                   allow_extra: bool = False) -> list[str]:
    """What keeps ``params`` (arrays or shape structs) from being exactly the parameters
    ``config`` implies (the encoder's alone with ``encoder_only``); empty when they are.
    ``allow_extra`` accepts entries the model does not have (a reader taking a subset)."""
    if not isinstance(params, Mapping) or not params:
        return [f"not a parameter tree (got {type(params).__name__})"]
    want = {"/".join(k): tuple(v.shape) for k, v in
            flatten_dict(param_shapes(config, encoder_only=encoder_only)).items()}
    # Arrays, shape structs or checkpoint metadata: anything with a shape.
    got = {"/".join(k): tuple(v.shape if hasattr(v, "shape") else np.shape(v))
           for k, v in flatten_dict(dict(params)).items()}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
    if not allow_extra:
        problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape {got[k]}, config implies {want[k]}"
                 for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    return problems
