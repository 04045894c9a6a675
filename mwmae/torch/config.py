"""The encoder's share of an artifact's ``model`` dict, read without the JAX package.

The JAX side's ``ModelConfig`` decides every shape; this is its encoder half as a small frozen
dataclass, so that a PyTorch environment can read ``config.json`` on its own. Keys are checked
strictly: a key this module does not know may change what the encoder computes, so it is an
error rather than something silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# Keys that belong to pretraining, the decoder or the JAX runtime: they leave the encoder's
# float32 numbers unchanged. ``dtype`` is JAX's compute dtype; here the caller picks it (the
# module's dtype, or autocast), so a bfloat16-trained model still loads in float32.
IGNORED_KEYS = frozenset({
    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "decoder_window_sizes",
    "mask_ratio", "norm_pix_loss", "dtype", "attention_impl", "attention_guard", "scan_unroll",
})


class ConfigError(ValueError):
    """A model dict this encoder cannot build; the message names every problem."""


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ConfigError(f"{name} must be (time, frequency), got {list(pair)}")
    return pair[0], pair[1]


def _windows(value: int | Sequence[int], num_heads: int) -> tuple[int, ...]:
    # As the JAX side reads them: one int (or a one-element list) for every head.
    if isinstance(value, int):
        return (int(value),) * num_heads
    windows = tuple(int(w) for w in value)
    if len(windows) == 1:
        return windows * num_heads
    if len(windows) != num_heads:
        raise ConfigError(f"window_sizes: {len(windows)} sizes for {num_heads} heads "
                          f"({list(windows)}); give one per head, 0 for a global head")
    return windows


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """What the encoder's shapes and numbers depend on (defaults: the JAX ``ModelConfig``'s);
    ``window_sizes`` has one entry per head (0: a global head)."""

    # Deliberate repeat of the JAX ModelConfig's encoder fields: this package must not import
    # the JAX side; a test keeps the two in step.
    img_size: tuple[int, int] = (200, 80)
    patch_size: tuple[int, int] = (4, 16)
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    window_sizes: tuple[int, ...] = (0,)
    shifting_windows: bool = False
    use_cls_token: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("img_size", _pair(self.img_size, "img_size"))
        set_("patch_size", _pair(self.patch_size, "patch_size"))
        for name in ("in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio"):
            set_(name, int(getattr(self, name)))
        set_("shifting_windows", bool(self.shifting_windows))
        set_("use_cls_token", bool(self.use_cls_token))
        set_("window_sizes", _windows(self.window_sizes, self.num_heads))
        self._validate()

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_extra_tokens(self) -> int:
        return 1 if self.use_cls_token else 0

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_extra_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def block_period(self) -> int:
        """Blocks per stored layer group: with shifted windows, odd blocks shift, and the JAX
        stack stores the pair (``block_0``, ``block_1``) as one scanned group."""
        return 2 if self.shifting_windows else 1

    @property
    def feature_dim(self) -> int:
        return self.grid_size[1] * self.embed_dim

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.img_size[0], self.img_size[1], self.in_chans)

    def _validate(self) -> None:
        errors = []
        for what, size, patch in (("time", self.img_size[0], self.patch_size[0]),
                                  ("frequency", self.img_size[1], self.patch_size[1])):
            if patch < 1 or size < patch or size % patch:
                errors.append(f"input {what} size {size} is not a positive multiple of patch "
                              f"size {patch}")
        for name in ("in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads >= 1 and self.embed_dim % self.num_heads:
            errors.append(f"width {self.embed_dim} is not divisible by its {self.num_heads} "
                          "heads")
        if self.embed_dim % 4:
            errors.append(f"embed_dim {self.embed_dim} must be a multiple of 4 (2-D sin-cos)")
        if self.shifting_windows and self.depth % 2:
            errors.append(f"shifting_windows alternates blocks, so depth must be even (got "
                          f"{self.depth})")
        errors += [f"window_sizes[{h}] = {w} is negative (0 means global)"
                   for h, w in enumerate(self.window_sizes) if w < 0]
        if not errors:  # the token count is only meaningful for a valid grid
            n = self.num_tokens
            errors += [f"window_sizes[{h}] = {w} does not divide the {n} tokens the encoder sees"
                       for h, w in enumerate(self.window_sizes) if w > 0 and n % w]
        if errors:
            raise ConfigError("invalid encoder config:\n  " + "\n  ".join(errors))

    @classmethod
    def from_dict(cls, model: Mapping[str, Any]) -> EncoderConfig:
        """The ``model`` dict of an artifact's config.json (every ``ModelConfig`` field)."""
        if not isinstance(model, Mapping):
            raise ConfigError(f"model config must be a mapping, got {type(model).__name__}")
        if "format" in model and "model" in model:
            raise ConfigError("got a whole artifact config.json; pass its 'model' entry")
        unknown = sorted(set(model) - ENCODER_KEYS - IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}: they may change what the "
                              "encoder computes, which this mwmae.torch does not implement; "
                              "upgrade mwmae")
        return cls(**{k: model[k] for k in ENCODER_KEYS if k in model})

    @classmethod
    def coerce(cls, config: Any) -> EncoderConfig:
        """An EncoderConfig, a model dict, or anything with ``to_dict()`` giving one (the JAX
        ``ModelConfig``, read without importing it)."""
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        to_dict = getattr(config, "to_dict", None)
        if callable(to_dict):
            return cls.from_dict(to_dict())
        raise ConfigError(f"expected an EncoderConfig or a model config dict, got "
                          f"{type(config).__name__}")


# The model dict's keys that shape the encoder.
ENCODER_KEYS = frozenset(f.name for f in dataclasses.fields(EncoderConfig))
