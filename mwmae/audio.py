"""The log-mel front end shared by shard building, HEAR embeddings and demos.

One definition of the spectrogram the MW-MAE models were trained on: 16 kHz mono, a periodic
Hann window of 400 samples, n_fft 400, hop 160, centred frames with reflect padding, |STFT|^2,
80 triangular HTK-scale mel filters from 50 to 8000 Hz without area normalisation, and
``log(mel + 1.1920929e-07)``. That is torchaudio's ``MelSpectrogram(sample_rate=16000,
n_fft=400, win_length=400, hop_length=160, f_min=50, f_max=8000, n_mels=80)`` followed by the
log, which is what the original project used; no torchaudio is needed here.

Outputs are time-major, ``(..., frames, 80)`` with ``frames = 1 + samples // 160``: the layout
of the records and of the model input.

Two implementations share the constants below:

* :func:`log_mel_spectrogram` in ``jax.numpy`` (float32, jit-able, for on-device use);
* :func:`log_mel_spectrogram_numpy` (float64 transform, for shard building on CPU workers
  that should not start an XLA runtime each).

Why the window and filterbank are built the way they are: torchaudio computes both in float32.
Quiet mel bins sit next to loud tones (the Hann window's sidelobes decide how much leaks into
them), so the float32 rounding of the window coefficients and of the filter weights moves the
log of quiet or edge bins by up to ~1e-3. Reproducing torchaudio's float32 construction step by
step (see :func:`mel_filterbank`) gives its filterbank bit for bit and a window within one
float32 ulp, which is what brings this front end to the reference. The remaining difference is
the float32 rounding inside torch's own FFT, which no other FFT reproduces. Measured against
the original HEAR module's log-mel (2 clips x 251 frames x 80 bins): within 1e-4 wherever the
mel power exceeds 2e-4 (numpy twin) or 3.4e-4 (jnp, whose float32 FFT adds rounding of its
own); at most 3.7e-4 (numpy) and 6.4e-4 (jnp) in the 8 and 12 quietest bins.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 400
WIN_LENGTH = 400
HOP_LENGTH = 160
N_MELS = 80
F_MIN = 50.0
F_MAX = 8_000.0
# float32 machine epsilon: the offset the original adds before the log.
LOG_OFFSET = 1.1920929e-07
# Per-clip normalisation offset of the original (pretraining data and HEAR module alike).
NORM_EPS = 1e-8
# Frames per model input (2 s).
CROP_FRAMES = 200

__all__ = [
    "CROP_FRAMES",
    "HOP_LENGTH",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "hann_window",
    "log_mel_spectrogram",
    "log_mel_spectrogram_numpy",
    "mel_filterbank",
    "normalize_for_hear",
    "normalize_for_pretraining",
    "num_frames",
    "per_clip_normalize",
]


def num_frames(num_samples: int) -> int:
    """Frames the centred STFT yields for ``num_samples`` samples."""
    return 1 + num_samples // HOP_LENGTH


def _float32_linspace(start: float, end: float, steps: int) -> np.ndarray:
    # torch.linspace in float32: step computed in float32, the first half counted up from
    # `start` and the second half down from `end`, each value rounded once (a fused
    # multiply-add in torch's kernel, exact in float64 here).
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = np.float64(start32) + np.float64(step) * i
    down = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def _hz_to_mel_htk(freq: float) -> float:
    return 2595.0 * math.log10(1.0 + freq / 700.0)


def mel_filterbank(
    n_freqs: int = N_FFT // 2 + 1,
    n_mels: int = N_MELS,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = F_MIN,
    f_max: float = F_MAX,
) -> np.ndarray:
    """HTK-scale triangular filters without area normalisation, ``(n_freqs, n_mels)`` float32.

    Built in float32 exactly as torchaudio's ``melscale_fbanks(norm=None, mel_scale="htk")``,
    so the weights match it bit for bit (a float64 construction differs by ~8e-6, which moves
    the log of a loud bin by ~2e-4 where a filter edge weighs little).
    """
    all_freqs = _float32_linspace(0.0, sample_rate // 2, n_freqs)
    m_pts = _float32_linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2)
    # 10 ** x rounded once from float64: torch's float32 pow is faithful to within an ulp and
    # matches this on every point of the default filterbank.
    powers = (10.0 ** (m_pts / np.float32(2595.0)).astype(np.float64)).astype(np.float32)
    f_pts = np.float32(700.0) * (powers - np.float32(1.0))
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(np.float32(0.0), np.minimum(down, up)).astype(np.float32)


def hann_window(length: int = WIN_LENGTH) -> np.ndarray:
    """Periodic Hann window in float32, computed as ``torch.hann_window`` computes it (its
    vectorised cosine differs from a correctly rounded one by an ulp in a few coefficients)."""
    n = np.arange(length, dtype=np.float32)
    phase = n * np.float32(2.0 * math.pi / length)
    cos = np.cos(phase.astype(np.float64)).astype(np.float32)
    return (cos * np.float32(-0.5) + np.float32(0.5)).astype(np.float32)


_FILTERBANK = mel_filterbank()
_WINDOW = hann_window()


def _check_waveform(waveform: Any) -> None:
    if waveform.ndim < 1:
        raise ValueError("waveform must have a trailing samples axis, got a scalar")
    if waveform.shape[-1] <= N_FFT // 2:
        # Reflect padding needs more samples than the pad width.
        raise ValueError(
            f"waveform has {waveform.shape[-1]} samples; the centred STFT needs more than "
            f"{N_FFT // 2} ({(N_FFT // 2 + 1) / SAMPLE_RATE * 1000:.1f} ms at 16 kHz)"
        )


def _frame_indices(n_frames: int) -> np.ndarray:
    return np.arange(n_frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]


def log_mel_spectrogram_numpy(waveform: np.ndarray, chunk_frames: int = 2048) -> np.ndarray:
    """Log-mel of 16 kHz mono audio ``(..., samples)`` -> float32 ``(..., frames, 80)``.

    The windowed frames are formed in float32 (as torch does) and transformed in float64;
    long inputs are processed ``chunk_frames`` frames at a time to bound memory.
    """
    x = np.asarray(waveform, dtype=np.float32)
    _check_waveform(x)
    pad = N_FFT // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    total = num_frames(x.shape[-1])
    fbank = _FILTERBANK.astype(np.float64)
    out = np.empty(x.shape[:-1] + (total, N_MELS), dtype=np.float32)
    for start in range(0, total, chunk_frames):
        stop = min(start + chunk_frames, total)
        frames = padded[..., _frame_indices(stop - start) + start * HOP_LENGTH]
        spec = np.fft.rfft((frames * _WINDOW).astype(np.float64), axis=-1)
        power = spec.real**2 + spec.imag**2
        out[..., start:stop, :] = np.log(power @ fbank + LOG_OFFSET)
    return out


def log_mel_spectrogram(waveform: Any) -> Any:
    """Log-mel of 16 kHz mono audio ``(..., samples)`` -> float32 ``(..., frames, 80)`` in jnp.

    Traceable under ``jax.jit``; the input length must be static.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(waveform, dtype=jnp.float32)
    _check_waveform(x)
    pad = N_FFT // 2
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    frames = padded[..., _frame_indices(num_frames(x.shape[-1]))]
    spec = jnp.fft.rfft(frames * jnp.asarray(_WINDOW), axis=-1)
    power = spec.real**2 + spec.imag**2
    mel = jnp.matmul(power, jnp.asarray(_FILTERBANK), precision=jax.lax.Precision.HIGHEST)
    return jnp.log(mel + jnp.float32(LOG_OFFSET))


def per_clip_normalize(
    features: Any, *, ddof: int, eps: float = NORM_EPS, batch_dims: int = 0
) -> Any:
    """``(x - mean) / (std + eps)`` over every axis after the first ``batch_dims``.

    Works on numpy and jax arrays alike (the array's own namespace is used).
    """
    xp = _namespace(features)
    axes = tuple(range(batch_dims, features.ndim))
    mean = xp.mean(features, axis=axes, keepdims=True)
    std = xp.std(features, axis=axes, keepdims=True, ddof=ddof)
    return (features - mean) / (std + eps)


def normalize_for_pretraining(features: Any, *, batch_dims: int = 0) -> Any:
    """The pretraining records' normalisation: population std (ddof 0) + 1e-8, per clip."""
    return per_clip_normalize(features, ddof=0, batch_dims=batch_dims)


def normalize_for_hear(features: Any, *, batch_dims: int = 0) -> Any:
    """The original HEAR module's normalisation: unbiased std (ddof 1) + 1e-8, per clip."""
    return per_clip_normalize(features, ddof=1, batch_dims=batch_dims)


def _namespace(array: Any) -> Any:
    if isinstance(array, np.ndarray | np.generic):
        return np
    import jax.numpy as jnp

    return jnp
