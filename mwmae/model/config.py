"""The architecture of an MW-MAE / MAE model as one frozen dataclass.

Everything that decides the shapes of the parameters or the numbers a model computes lives here;
configs in ``configs/`` fill it, converted and exported checkpoints store it as JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# Encoder sizes of the paper (ViT naming): width -> (depth, heads).
ENCODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "medium": {"embed_dim": 512, "depth": 12, "num_heads": 8},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}
HEADS_BY_WIDTH = {v["embed_dim"]: v["num_heads"] for v in ENCODER_SIZES.values()}

PAPER_DECODER_WINDOWS = (2, 5, 10, 25, 50, 125, 0, 0)


def _as_windows(value: int | Sequence[int], num_heads: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (int(value),) * num_heads
    windows = tuple(int(w) for w in value)
    if len(windows) == 1:  # one size for every head
        return windows * num_heads
    if len(windows) != num_heads:
        raise ValueError(f"{what}: {len(windows)} window sizes given for {num_heads} heads "
                         f"({list(windows)}); give one per head, 0 for a global head")
    return windows


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a masked autoencoder on log-mel patches.

    ``window_sizes`` / ``decoder_window_sizes``: one per head (an int means all heads); 0 = a
    global head. ``use_cls_token`` is the MAE baseline's class token (the original MW-MAE has none).
    """

    img_size: tuple[int, int] = (200, 80)
    patch_size: tuple[int, int] = (4, 16)
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 8
    mlp_ratio: int = 4
    mask_ratio: float = 0.8
    window_sizes: tuple[int, ...] = (0,)
    decoder_window_sizes: tuple[int, ...] = PAPER_DECODER_WINDOWS
    shifting_windows: bool = False
    use_cls_token: bool = False
    norm_pix_loss: bool = False
    # Compute dtype; parameters are always float32.
    dtype: str = "float32"
    # Multi-window attention backend: see mwmae.kernels.multi_window_attention.
    attention_impl: str = "auto"
    # At a run's start on an accelerator, a kernel that disagrees with the XLA reference:
    # "fallback" (to XLA, with a warning), "error" (stop), "off" (trust it); see
    # mwmae.train.attention_plan.
    attention_guard: str = "fallback"
    # Layers run under one nn.scan (fast compiles); unroll > 1 trades compile time for speed.
    scan_unroll: int = 1

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("img_size", tuple(int(x) for x in self.img_size))
        set_("patch_size", tuple(int(x) for x in self.patch_size))
        set_("window_sizes", _as_windows(self.window_sizes, self.num_heads, "window_sizes"))
        set_("decoder_window_sizes", _as_windows(
            self.decoder_window_sizes, self.decoder_num_heads, "decoder_window_sizes"))
        self.validate()

    # Derived sizes ---------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        t, f = self.grid_size
        return t * f

    @property
    def patch_dim(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.in_chans

    @property
    def len_keep(self) -> int:
        # Integer percent arithmetic as the original (1 - 0.8 is 0.19999...).
        return int(self.num_patches * (100 - self.mask_ratio * 100) / 100)

    @property
    def num_extra_tokens(self) -> int:
        return 1 if self.use_cls_token else 0

    @property
    def block_period(self) -> int:
        """Blocks per scanned group: shifted windows alternate, so two blocks form one group."""
        return 2 if self.shifting_windows else 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.img_size[0], self.img_size[1], self.in_chans)

    @property
    def feature_dim(self) -> int:
        return self.grid_size[1] * self.embed_dim

    # Checks ------------------------------------------------------------------------------------
    def validate(self) -> None:
        errors = []
        for name, size, patch in (("time", self.img_size[0], self.patch_size[0]),
                                  ("frequency", self.img_size[1], self.patch_size[1])):
            if size % patch:
                errors.append(f"input {name} size {size} is not a multiple of patch size {patch}")
        for name, dim, heads in (("encoder", self.embed_dim, self.num_heads),
                                 ("decoder", self.decoder_embed_dim, self.decoder_num_heads)):
            if dim % heads:
                errors.append(f"{name} width {dim} is not divisible by its {heads} heads")
        if self.embed_dim % 4:
            errors.append(f"embed_dim {self.embed_dim} must be a multiple of 4 (2-D sin-cos)")
        if not 0.0 <= self.mask_ratio < 1.0:
            errors.append(f"mask_ratio {self.mask_ratio} must be in [0, 1)")
        if self.shifting_windows and (self.depth % 2 or self.decoder_depth % 2):
            errors.append("shifting_windows alternates blocks, so depth and decoder_depth must be "
                          f"even (got {self.depth} and {self.decoder_depth})")
        if self.attention_guard not in ("fallback", "error", "off"):
            errors.append(f"attention_guard {self.attention_guard!r} must be 'fallback', "
                          "'error' or 'off'")
        if self.dtype not in ("float32", "bfloat16"):
            errors.append(f"dtype {self.dtype!r} must be 'float32' or 'bfloat16'")
        extra = self.num_extra_tokens
        # The encoder sees all tokens for features and only the kept ones in pretraining.
        for where, windows, lengths in (
            ("window_sizes", self.window_sizes,
             {"all patches (features)": self.num_patches + extra,
              "kept patches (pretraining)": self.len_keep + extra}),
            ("decoder_window_sizes", self.decoder_window_sizes,
             {"all patches": self.num_patches + extra}),
        ):
            for h, w in enumerate(windows):
                if w < 0:
                    errors.append(f"{where}[{h}] = {w} is negative (0 means global)")
                    continue
                for what, n in lengths.items():
                    if w and n % w:
                        errors.append(
                            f"{where}[{h}] = {w} does not divide the {n} tokens of {what}; "
                            f"window sizes must divide the token count (divisors of {n}: "
                            f"{[d for d in range(1, n + 1) if n % d == 0]})")
        if errors:
            raise ValueError("invalid model config:\n  " + "\n  ".join(errors))

    # Serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def model_config(size: str = "base", kind: str = "mwmae", **overrides: Any) -> ModelConfig:
    """A paper configuration: ``kind`` 'mwmae' (windowed decoder) or 'mae' (global, cls token)."""
    if size not in ENCODER_SIZES:
        raise ValueError(f"unknown encoder size {size!r}; known: {sorted(ENCODER_SIZES)}")
    base: dict[str, Any] = dict(ENCODER_SIZES[size])
    if kind == "mwmae":
        base.update(window_sizes=0, decoder_window_sizes=PAPER_DECODER_WINDOWS)
    elif kind == "mae":
        base.update(window_sizes=0, decoder_window_sizes=0, use_cls_token=True)
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected 'mwmae' or 'mae'")
    base.update(overrides)
    return ModelConfig(**base)
