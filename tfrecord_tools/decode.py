"""Audio file -> 16 kHz mono float32 -> log-mel, with failures as reasons, not crashes."""

from __future__ import annotations

import math

import numpy as np
import soundfile
from scipy.signal import resample_poly

from mwmae import audio as audio_lib
from mwmae.data import storage


class DecodeError(Exception):
    """An input file that cannot become a spectrogram; str() is the reason for the rejects CSV."""


def load_audio(path: str, *, max_seconds: float | None = None) -> np.ndarray:
    """16 kHz mono float32 samples of any format libsndfile reads (wav, flac, mp3, ogg, ...)."""
    # libsndfile says only "System error." for a file that is not there: name it first.
    if not storage.is_remote(path) and not storage.exists(path):
        raise DecodeError(f"not found: {path}")
    try:
        if storage.is_remote(path):
            with storage.open_read(path) as f:
                data, rate = soundfile.read(f, dtype="float32", always_2d=True)
        else:
            data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except FileNotFoundError as e:
        raise DecodeError(f"not found: {path}") from e
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise DecodeError(f"cannot decode: {e}") from e
    if data.size == 0:
        raise DecodeError("no samples")
    mono = data.mean(axis=1, dtype=np.float32)  # downmix first: resampling one channel is cheaper
    # Compared before rounding: a limit longer than any file (1e306 s) must not overflow.
    if max_seconds is not None and max_seconds * rate < mono.size:
        mono = mono[: int(math.ceil(max_seconds * rate))]
    if rate != audio_lib.SAMPLE_RATE:
        g = math.gcd(int(rate), audio_lib.SAMPLE_RATE)
        mono = resample_poly(mono, audio_lib.SAMPLE_RATE // g, int(rate) // g).astype(np.float32)
    if not np.all(np.isfinite(mono)):
        raise DecodeError("samples contain NaN or infinity")
    return mono


def file_to_logmel(path: str, *, max_seconds: float | None = None) -> np.ndarray:
    """Time-major float32 ``[frames, 80]`` log-mel of an audio file."""
    samples = load_audio(path, max_seconds=max_seconds)
    if samples.size <= audio_lib.N_FFT // 2:
        raise DecodeError(
            f"too short: {samples.size} samples at 16 kHz, need > {audio_lib.N_FFT // 2}"
        )
    return audio_lib.log_mel_spectrogram_numpy(samples)
