"""Turning one decoded record into one model input: normalise, crop or pad, format labels."""

from __future__ import annotations

import math

import numpy as np

from mwmae import audio as audio_lib
from mwmae.data.records import RecordError

LABEL_PAD = -1


_MASK64 = (1 << 64) - 1


def crop_key(*parts: int) -> int:
    """A 64-bit value drawn from ``parts`` (splitmix64 over them): the randomness of one crop.

    A few integer operations instead of seeding a numpy generator per clip (which cost about
    a tenth of the clip's whole preparation); the crop is still a pure function of its key.
    """
    h = 0
    for part in parts:
        h = (h + 0x9E3779B97F4A7C15 + (int(part) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


def crop_start(num_frames: int, crop_frames: int, key: int | None) -> int:
    """Random start (train: drawn from ``key``, see :func:`crop_key`) or centred start (eval,
    ``key`` None); 0 when the clip is short."""
    if num_frames <= crop_frames:
        return 0
    if key is None:
        return (num_frames - crop_frames) // 2
    return key % (num_frames - crop_frames + 1)


def prepare_audio(
    logmel: np.ndarray,
    *,
    crop_frames: int,
    n_mels: int,
    crop: int | None,
) -> np.ndarray:
    """Time-major log-mel ``[T, mels]`` -> normalised ``[crop_frames, mels, 1]`` float32.

    ``crop``: the training crop's key (:func:`crop_key`), or None for the centre crop.

    The clip is normalised over all its frames (population std + 1e-8, as the original
    pretraining data) and then cropped; a clip shorter than the crop is padded at the end with
    zeros, i.e. with its own mean after normalisation.

    Bit for bit ``audio.normalize_for_pretraining(logmel)`` cropped, at a fraction of the cost
    (this runs once per clip on the input path): the statistics are numpy's own float32
    reductions in the same order as ``np.mean``/``np.std``, but the mean is computed once, the
    squares reuse the centred copy, and only the crop is scaled, written straight into the
    output. Non-finite input shows in the statistics, so only then are the values searched.
    """
    if logmel.ndim != 2 or logmel.shape[1] != n_mels:
        raise RecordError(f"audio has shape {logmel.shape}, expected [frames, {n_mels}]")
    frames = logmel.shape[0]
    if frames == 0:
        raise RecordError("audio has no frames")
    x = logmel.astype(np.float32, copy=False)
    count = np.intp(x.size)
    mean = np.add.reduce(x, axis=(0, 1), keepdims=True)
    np.true_divide(mean, count, out=mean, casting="unsafe")
    centred = x - mean
    start = crop_start(frames, crop_frames, crop)
    kept = min(crop_frames, frames - start)
    out = np.empty((crop_frames, n_mels, 1), np.float32)
    window = out[:kept, :, 0]
    window[...] = centred[start : start + kept]
    out[kept:] = 0.0
    np.multiply(centred, centred, out=centred)
    var = np.add.reduce(centred, axis=(0, 1), keepdims=True)
    np.true_divide(var, count, out=var, casting="unsafe")
    np.sqrt(var, out=var)
    if not (math.isfinite(mean[0, 0]) and math.isfinite(var[0, 0])):
        # A NaN or an infinity anywhere makes the sums non-finite.
        if not np.all(np.isfinite(x)):
            raise RecordError("audio holds NaN or infinite values")
    np.divide(window, var + audio_lib.NORM_EPS, out=window)
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
