"""Training-side augmentation of log-mel batches, on the device inside the step: mixup (with its
labels) and SpecAugment time and frequency masks. Random crops happen in the input pipeline.

Every draw comes from the step's key, so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    mixup_alpha: float = 0.0     # > 0: mix each clip with another, weight ~ Beta(alpha, alpha)
    time_masks: int = 0          # SpecAugment: how many time masks per clip
    time_mask_frames: int = 0    # ... each up to this many frames wide
    freq_masks: int = 0          # how many frequency masks per clip
    freq_mask_bins: int = 0      # ... each up to this many mel bins wide

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or min(self.time_masks, self.time_mask_frames,
                                       self.freq_masks, self.freq_mask_bins) < 0:
            raise ValueError(f"augmentation settings must be >= 0: {self}")


def _masks(key: jax.Array, batch: int, size: int, count: int, width: int) -> jax.Array:
    """(batch, size) bool, True inside any of ``count`` random bands of width < ``width``+1."""
    if count == 0 or width == 0:
        return jnp.zeros((batch, size), bool)
    k_width, k_start = jax.random.split(key)
    widths = jax.random.randint(k_width, (batch, count, 1), 0, width + 1)
    starts = jax.random.randint(k_start, (batch, count, 1), 0, size) - widths // 2
    pos = jnp.arange(size)[None, None, :]
    return jnp.any((pos >= starts) & (pos < starts + widths), axis=1)


def spec_augment(key: jax.Array, audio: jax.Array, config: AugmentConfig) -> jax.Array:
    """Zero (the normalised mean) random time and frequency bands of (B, T, F, 1) clips."""
    b, t, f = audio.shape[:3]
    k_time, k_freq = jax.random.split(key)
    time = _masks(k_time, b, t, config.time_masks, config.time_mask_frames)
    freq = _masks(k_freq, b, f, config.freq_masks, config.freq_mask_bins)
    drop = time[:, :, None] | freq[:, None, :]
    return jnp.where(drop[..., None], 0.0, audio)


def mixup(key: jax.Array, audio: jax.Array, targets: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
    """Each clip mixed with its neighbour in a random permutation of the batch; the targets
    (multi-hot or one-hot, float) mixed with the same weight."""
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha, (audio.shape[0],))
    perm = jax.random.permutation(k_perm, audio.shape[0])
    mix = lambda x: (lam.reshape(-1, *[1] * (x.ndim - 1)) * x  # noqa: E731
                     + (1 - lam.reshape(-1, *[1] * (x.ndim - 1))) * x[perm])
    return mix(audio), mix(targets)


def augment(key: jax.Array, audio: jax.Array, targets: jax.Array, config: AugmentConfig
            ) -> tuple[jax.Array, jax.Array]:
    k_mix, k_spec = jax.random.split(key)
    if config.mixup_alpha > 0:
        audio, targets = mixup(k_mix, audio, targets, config.mixup_alpha)
    return spec_augment(k_spec, audio, config), targets
