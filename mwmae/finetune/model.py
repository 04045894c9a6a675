"""The tagger: the pretrained :class:`~mwmae.model.Encoder` plus a head on pooled patch features."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mwmae.model import Encoder, ModelConfig
from mwmae.model.blocks import _part

HEADS = ("linear", "mlp")
# "mean": the mean of all patch tokens (D features; the class token instead where the model has
# one). "time": the mean over time of each frequency band's tokens, concatenated (F * D
# features, index f * D + d): the clip embedding the HEAR module gives (its scene embedding).
POOLINGS = ("mean", "time")
# The head's parameters, top level beside the encoder's (which keep the artifact layout).
HEAD_KEYS = ("head", "head_hidden")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    num_classes: int
    kind: str = "linear"         # "linear" | "mlp" (one hidden layer of the encoder's width)
    dropout: float = 0.0         # on the pooled features (and the MLP's hidden layer)
    drop_path: float = 0.0       # stochastic depth over the encoder's blocks
    freeze_encoder: bool = False  # a probe: no gradient reaches the encoder
    pooling: str = "mean"        # see POOLINGS

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.kind not in HEADS:
            raise ValueError(f"head {self.kind!r}: expected one of {HEADS}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: expected one of {POOLINGS}")
        if not 0 <= self.dropout < 1 or not 0 <= self.drop_path < 1:
            raise ValueError("dropout and drop_path must lie in [0, 1)")


class Classifier(nn.Module):
    """Encoder -> pooled tokens (:data:`POOLINGS`) -> head.

    Logits are float32 (clips, classes). With ``train=True`` dropout and stochastic depth apply
    and need a "dropout" rng.
    """

    config: ModelConfig
    head_config: HeadConfig

    def setup(self) -> None:
        c, h = self.config, self.head_config
        dtype = jnp.dtype(c.dtype)
        self.backbone = Encoder(c, drop_path=0.0 if h.freeze_encoder else h.drop_path)
        nn.share_scope(self, self.backbone)
        self.dropout = nn.Dropout(h.dropout)
        if h.kind == "mlp":
            self.head_hidden = nn.Dense(
                c.embed_dim, dtype=dtype,
                kernel_init=_part(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                bias_init=_part(nn.initializers.zeros, ("mlp",)))
        # Small initial logits, as the usual ViT fine-tuning recipes start the head.
        self.head = nn.Dense(
            h.num_classes, dtype=dtype,
            kernel_init=_part(nn.initializers.truncated_normal(2e-5), (None, None)),
            bias_init=_part(nn.initializers.zeros, (None,)))

    def __call__(self, imgs: jax.Array, *, train: bool = False) -> jax.Array:
        c, h = self.config, self.head_config
        deterministic = not train or h.freeze_encoder
        tokens = self.backbone.encode(self.backbone.embed(imgs), deterministic=deterministic)
        if h.pooling == "time":
            t, f = c.grid_size  # patch tokens are time-major: token t * F + f
            patches = tokens[:, c.num_extra_tokens:].reshape(tokens.shape[0], t, f, c.embed_dim)
            pooled = patches.mean(axis=1).reshape(tokens.shape[0], f * c.embed_dim)
        else:
            pooled = tokens[:, 0] if c.use_cls_token else tokens.mean(axis=1)
        if h.freeze_encoder:
            pooled = jax.lax.stop_gradient(pooled)
        x = self.dropout(pooled, deterministic=not train)
        if h.kind == "mlp":
            x = self.dropout(nn.gelu(self.head_hidden(x)), deterministic=not train)
        return self.head(x).astype(jnp.float32)
