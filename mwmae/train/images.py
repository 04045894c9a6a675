"""Pictures people judge an MAE by: input, masked input and reconstruction, side by side."""

from __future__ import annotations

import numpy as np

from mwmae.model.embed import patchify, unpatchify


def reconstruction_grid(audio: np.ndarray, pred: np.ndarray, mask: np.ndarray,
                        patch_size: tuple[int, int]) -> np.ndarray:
    """(N, T, F, 1) inputs -> (N, F, 3T + 2 gaps, 1) images in [0, 1], frequency upwards.

    Panels: the input, the input with masked patches greyed out, and the reconstruction with the
    visible patches pasted back (as MAE papers show it).
    """
    audio = np.asarray(audio, np.float32)
    t, f = audio.shape[1], audio.shape[2]
    grid = (t // patch_size[0], f // patch_size[1])
    patches = np.asarray(patchify(audio, patch_size))
    m = np.asarray(mask, np.float32)[..., None]
    masked = np.asarray(unpatchify(patches * (1 - m) + m * patches.min(), patch_size, grid))
    recon = np.asarray(unpatchify(patches * (1 - m) + np.asarray(pred) * m, patch_size, grid))
    lo, hi = audio.min(axis=(1, 2, 3), keepdims=True), audio.max(axis=(1, 2, 3), keepdims=True)
    norm = lambda x: np.clip((x - lo) / (hi - lo + 1e-6), 0, 1)
    gap = np.ones((audio.shape[0], 2, f, 1), np.float32)
    panels = np.concatenate([norm(audio), gap, norm(masked), gap, norm(recon)], axis=1)
    return np.flip(np.swapaxes(panels, 1, 2), axis=1)  # (N, F, time, 1), low mels at the bottom
