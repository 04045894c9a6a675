"""Audio-like log-mel clips made on the fly, for the demo and tests before real shards exist.

Each clip is a few harmonic sources (a fundamental gliding in pitch with decaying overtones),
broadband onsets and a coloured noise floor, rendered directly on the mel axis and normalised
per clip as the pretraining pipeline does. Deterministic given (seed, index).
"""

from __future__ import annotations

import numpy as np


def _mel_axis(n_mels: int) -> np.ndarray:
    # Centre frequencies of HTK mel bins between 50 and 8000 Hz.
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    m = np.linspace(mel(50.0), mel(8000.0), n_mels + 2)[1:-1]
    return 700.0 * (10 ** (m / 2595.0) - 1.0)


def synthetic_logmel(index: int, seed: int = 0, frames: int = 200, n_mels: int = 80
                     ) -> np.ndarray:
    """One normalised clip, (frames, n_mels, 1) float32."""
    rng = np.random.default_rng([seed, index])
    hz = _mel_axis(n_mels)
    t = np.arange(frames)[:, None]
    power = np.full((frames, n_mels), 1e-4) * (hz[None] / 1000.0) ** rng.uniform(-2, 0)
    for _ in range(rng.integers(1, 4)):
        f0 = rng.uniform(100, 600) * 2 ** (rng.uniform(-1, 1) * t / frames)   # glide
        start, length = rng.integers(0, frames // 2), rng.integers(frames // 4, frames)
        env = ((t >= start) & (t < start + length)) * np.exp(-(t - start).clip(0) / length)
        for h in range(1, 8):
            width = 0.03 * f0 * h
            power += env * rng.uniform(0.3, 1) / h * np.exp(-0.5 * ((hz - h * f0) / width) ** 2)
    for onset in rng.integers(0, frames, rng.integers(0, 4)):
        power[onset:onset + 3] += rng.uniform(0.05, 0.3)
    logmel = np.log(power + 1.1920929e-07)
    logmel = (logmel - logmel.mean()) / (logmel.std() + 1e-8)
    return logmel[:, :, None].astype(np.float32)


def synthetic_batch(step: int, batch_size: int, seed: int = 0, frames: int = 200,
                    n_mels: int = 80) -> np.ndarray:
    """Batch ``step`` of an endless stream: (batch, frames, n_mels, 1)."""
    return np.stack([synthetic_logmel(step * batch_size + i, seed, frames, n_mels)
                     for i in range(batch_size)])
