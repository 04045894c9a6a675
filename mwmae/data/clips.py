"""Turning one decoded record into one model input: normalise, crop or pad, format labels."""

from __future__ import annotations

import numpy as np

from mwmae import audio as audio_lib
from mwmae.data.records import RecordError

LABEL_PAD = -1


def crop_start(num_frames: int, crop_frames: int, rng: np.random.Generator | None) -> int:
    """Random start (train, ``rng`` given) or centred start (eval); 0 when the clip is short."""
    if num_frames <= crop_frames:
        return 0
    if rng is None:
        return (num_frames - crop_frames) // 2
    return int(rng.integers(0, num_frames - crop_frames + 1))


def prepare_audio(
    logmel: np.ndarray,
    *,
    crop_frames: int,
    n_mels: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Time-major log-mel ``[T, mels]`` -> normalised ``[crop_frames, mels, 1]`` float32.

    The clip is normalised over all its frames (population std + 1e-8, as the original
    pretraining data) and then cropped; a clip shorter than the crop is padded at the end with
    zeros, i.e. with its own mean after normalisation.
    """
    if logmel.ndim != 2 or logmel.shape[1] != n_mels:
        raise RecordError(f"audio has shape {logmel.shape}, expected [frames, {n_mels}]")
    if logmel.shape[0] == 0:
        raise RecordError("audio has no frames")
    if not np.all(np.isfinite(logmel)):
        raise RecordError("audio holds NaN or infinite values")
    normalised = audio_lib.normalize_for_pretraining(logmel.astype(np.float32, copy=False))
    start = crop_start(logmel.shape[0], crop_frames, rng)
    window = normalised[start : start + crop_frames]
    out = np.zeros((crop_frames, n_mels, 1), np.float32)
    out[: window.shape[0], :, 0] = window
    return out


def format_labels(
    labels: np.ndarray, *, max_labels: int, num_classes: int | None
) -> np.ndarray:
    """Padded int32 ``[max_labels]`` (pad -1) or, with ``num_classes``, multi-hot float32."""
    if num_classes is not None:
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise RecordError(f"label ids {labels.tolist()} outside [0, {num_classes})")
        hot = np.zeros(num_classes, np.float32)
        hot[labels] = 1.0
        return hot
    if labels.size > max_labels:
        raise RecordError(f"{labels.size} labels exceed max_labels={max_labels}")
    out = np.full(max_labels, LABEL_PAD, np.int32)
    out[: labels.size] = labels
    return out
