"""Waveforms -> MW-MAE embeddings, the way the original HEAR module computes them (numpy + JAX).

Per clip: the log-mel of :mod:`mwmae.audio` (numpy, float64 transform), normalised over the
whole clip with the UNBIASED std + 1e-8 (:func:`mwmae.audio.normalize_for_hear`), then cut into
200-frame (2 s) chunks that go through the encoder; with a temporal patch of ``p`` STFT frames
(the model's ``patch_size[0]``: 4 for the paper's 4x16) each chunk yields ``200 / p`` embedding
frames of ``10 p`` ms (40 ms for p = 4), concatenated over the clip.

Padding. The original pads ``200 - T % 200`` frames by reflection at the end (a whole extra
chunk when T is a multiple of 200) and drops the last ``floor(pad / p)`` embedding frames.
Chunks are independent and the padding comes after normalisation, so an all-padding chunk only
produces frames that are dropped; this implementation pads ``-T % 200`` frames instead, which
gives the same embeddings (``ceil(T / p)`` frames) without computing a discarded chunk. The
tests compare it with a literal transcription of the original's rule, multiples of 200 included,
for p = 2, 4 and 8.

Timestamps. Embedding frame ``i`` covers STFT frames ``p i .. p i + p - 1``, whose (centred)
windows are centred at ``10 p i, 10 p i + 10, ...`` ms, so the frame is centred at
``10 p i + 5 (p - 1)`` ms (``40 i + 15`` for p = 4): the timestamp reported here. The original
module reported ``i * duration / n_frames`` (starting at 0, a step of duration/n_frames, e.g.
39.68 ms for 2.5 s) - frame starts on a slightly wrong grid. The last frame of a clip may hold
padding (up to ``p - 1`` STFT frames), so its centre can lie up to ``5 (p - 1)`` ms past the
clip's last STFT frame.

Compilation. Chunks from all clips of a call are flattened and run through the encoder in
batches of at most ``max_batch``; the last batch is zero-padded up to the next power of two. The
encoder therefore compiles for at most ``log2(max_batch) + 1`` shapes, whatever the clip
lengths, and device memory is bounded by one batch (long clips never enter the device whole).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from mwmae import audio

STFT_HOP_MS = 1000.0 * audio.HOP_LENGTH / audio.SAMPLE_RATE   # 10 ms
MIN_SAMPLES = audio.N_FFT // 2 + 1


def frame_hop_ms(patch_frames: int = 4) -> float:
    """Hop of one embedding frame: ``patch_frames`` STFT frames (40 ms for the 4x16 patch)."""
    return patch_frames * STFT_HOP_MS


def num_embedding_frames(num_samples: int, patch_frames: int = 4) -> int:
    """Embedding frames for a clip of ``num_samples`` samples: ceil(STFT frames / p)."""
    return -(-audio.num_frames(num_samples) // patch_frames)


def timestamps_ms(num_samples: int, patch_frames: int = 4) -> np.ndarray:
    """Centres of the embedding frames in ms, float32: ``10 p i + 5 (p - 1)``."""
    n = num_embedding_frames(num_samples, patch_frames)
    centre = (patch_frames - 1) * STFT_HOP_MS / 2
    return (np.arange(n, dtype=np.float64) * frame_hop_ms(patch_frames) + centre
            ).astype(np.float32)


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Chunk-batch shapes the encoder is compiled for: powers of two up to ``max_batch``."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def check_audio(x: Any, *, sample_rate: int | None = None) -> np.ndarray:
    """(n_sounds, n_samples) float32 mono at 16 kHz, or a ValueError that says what is wrong."""
    if sample_rate is not None and int(sample_rate) != audio.SAMPLE_RATE:
        raise ValueError(f"audio is at {sample_rate} Hz; MW-MAE models take {audio.SAMPLE_RATE} "
                         "Hz mono: resample first")
    arr = np.asarray(x)
    if arr.ndim == 1:
        raise ValueError(f"audio has shape {arr.shape}; expected (n_sounds, n_samples): add a "
                         "batch axis (audio[None]) for one clip")
    if arr.ndim == 3:
        raise ValueError(f"audio has shape {arr.shape}, which looks like (n_sounds, channels, "
                         "n_samples); expected mono (n_sounds, n_samples): mix the channels "
                         "down (mean over the channel axis) first")
    if arr.ndim != 2:
        raise ValueError(f"audio has shape {arr.shape}; expected (n_sounds, n_samples) mono")
    if arr.shape[1] in (1, 2) and arr.shape[0] > arr.shape[1]:
        raise ValueError(f"audio has shape {arr.shape}, which looks like (n_samples, channels) "
                         "as read from a multi-channel file; expected mono (n_sounds, n_samples)"
                         ": mix down (and transpose) first")
    if arr.size == 0:
        raise ValueError(f"audio is empty (shape {arr.shape}); expected (n_sounds, n_samples) "
                         "with at least one sound and one sample")
    if arr.shape[1] < MIN_SAMPLES:
        raise ValueError(f"audio has {arr.shape[1]} samples per sound; the centred STFT needs at "
                         f"least {MIN_SAMPLES} ({MIN_SAMPLES / audio.SAMPLE_RATE * 1e3:.1f} ms at "
                         f"{audio.SAMPLE_RATE} Hz)")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"audio dtype is {arr.dtype}; expected float samples in [-1, 1]")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("audio contains NaN or infinite samples")
    return arr


def chunk_features(features: np.ndarray, chunk: int = audio.CROP_FRAMES) -> np.ndarray:
    """(B, T, 80) normalised log-mel -> (B, n_chunks, chunk, 80): reflect-pad the end to a
    multiple of ``chunk`` frames (none when T already is one; see the module docstring)."""
    t = features.shape[1]
    pad = -t % chunk
    if pad:
        features = np.pad(features, ((0, 0), (0, pad), (0, 0)), mode="reflect")
    return features.reshape(features.shape[0], -1, chunk, features.shape[2])


@dataclasses.dataclass
class Embedder:
    """A loaded model plus the bucketed, jitted encoder. Not thread-safe."""

    model: Any                 # mwmae.api.Model
    max_batch: int = 32        # chunks per encoder call (2 s each)
    device: Any = None         # a jax.Device; default: JAX's default (a GPU when present)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        self.buckets = bucket_sizes(self.max_batch)
        self.traces = 0        # encoder traces so far; at most len(buckets) ever
        fn = self.model.features_fn()

        def counted(params, x):
            self.traces += 1   # runs once per trace, never per call
            return fn(params, x)

        self._encode = jax.jit(counted)
        self._params = jax.device_put(self.model.params, self.device)
        self.chunk_frames, self.n_mels, _ = self.model.config.input_shape
        self.frames_per_chunk = self.model.config.grid_size[0]
        self.patch_frames = self.model.config.patch_size[0]   # STFT frames per embedding frame
        self.embedding_size = int(self.model.config.feature_dim)

    # Normalised log-mel -> frames ----------------------------------------------------------
    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _encode_chunks(self, chunks: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(N, 200, 80) chunks -> (start, (k, 50, D) float32) in order, one batch at a time.

        The next batch is dispatched before the previous one is copied back, so the host-side
        work overlaps the device's."""
        pending: tuple[int, int, Any] | None = None
        for start in range(0, len(chunks), self.max_batch):
            part = chunks[start:start + self.max_batch]
            k = len(part)
            b = self._bucket(k)
            x = np.zeros((b, self.chunk_frames, self.n_mels, 1), np.float32)
            x[:k, :, :, 0] = part
            out = self._encode(self._params, jax.device_put(x, self.device))
            if pending is not None:
                yield pending[0], np.asarray(pending[2])[:pending[1]]
            pending = (start, k, out)
        if pending is not None:
            yield pending[0], np.asarray(pending[2])[:pending[1]]

    def embed_normalised(self, features: np.ndarray) -> np.ndarray:
        """(B, T, 80) normalised log-mel -> (B, ceil(T / p), D) float32 frame embeddings."""
        features = np.asarray(features, np.float32)
        if features.ndim == 4 and features.shape[-1] == 1:
            features = features[..., 0]
        if features.ndim != 3 or features.shape[2] != self.n_mels:
            raise ValueError(f"features have shape {features.shape}; expected (batch, frames, "
                             f"{self.n_mels}) normalised log-mel")
        b, t = features.shape[:2]
        chunks = chunk_features(features, self.chunk_frames)
        n_chunks = chunks.shape[1]
        out = np.empty((b * n_chunks, self.frames_per_chunk, self.embedding_size), np.float32)
        for start, emb in self._encode_chunks(chunks.reshape(-1, self.chunk_frames,
                                                             self.n_mels)):
            out[start:start + len(emb)] = emb
        out = out.reshape(b, n_chunks * self.frames_per_chunk, self.embedding_size)
        return out[:, :-(-t // self.patch_frames)]

    def scene_normalised(self, features: np.ndarray) -> np.ndarray:
        """(B, T, 80) -> (B, D): mean of the frame embeddings, without holding them all."""
        features = np.asarray(features, np.float32)
        b, t = features.shape[:2]
        n_frames = -(-t // self.patch_frames)  # the clip's frames: padding-only ones left out
        chunks = chunk_features(features, self.chunk_frames)
        n_chunks = chunks.shape[1]
        sums = np.zeros((b, self.embedding_size), np.float64)
        for start, emb in self._encode_chunks(chunks.reshape(-1, self.chunk_frames,
                                                             self.n_mels)):
            for j, e in enumerate(emb):
                clip, c = divmod(start + j, n_chunks)
                keep = min(self.frames_per_chunk, n_frames - c * self.frames_per_chunk)
                sums[clip] += e[:keep].sum(axis=0, dtype=np.float64)
        return (sums / n_frames).astype(np.float32)

    # Waveforms -> embeddings ---------------------------------------------------------------
    def normalised_logmel(self, audio_batch: np.ndarray) -> np.ndarray:
        """(B, samples) -> (B, T, 80) log-mel normalised per clip as the original HEAR module."""
        mel = audio.log_mel_spectrogram_numpy(audio_batch)
        return audio.normalize_for_hear(mel.astype(np.float64), batch_dims=1).astype(np.float32)

    def timestamp_embeddings(self, audio_batch: Any, *, sample_rate: int | None = None
                             ) -> tuple[np.ndarray, np.ndarray]:
        """(B, samples) -> ((B, n, D) embeddings, (B, n) timestamps in ms at frame centres)."""
        x = check_audio(audio_batch, sample_rate=sample_rate)
        emb = self.embed_normalised(self.normalised_logmel(x))
        ts = np.broadcast_to(timestamps_ms(x.shape[1], self.patch_frames), emb.shape[:2]).copy()
        return emb, ts

    def scene_embeddings(self, audio_batch: Any, *, sample_rate: int | None = None
                         ) -> np.ndarray:
        """(B, samples) -> (B, D): the mean over time of the timestamp embeddings."""
        x = check_audio(audio_batch, sample_rate=sample_rate)
        return self.scene_normalised(self.normalised_logmel(x))

    def warm_up(self) -> None:
        """Compile every bucket now (first calls then run at full speed)."""
        for b in self.buckets:
            x = np.zeros((b, self.chunk_frames, self.n_mels, 1), np.float32)
            jax.block_until_ready(self._encode(self._params, jax.device_put(x, self.device)))


def max_batch_default() -> int:
    """Chunks per encoder call: more on accelerators, where one call is cheap."""
    return 8 if jax.default_backend() == "cpu" else 128


def padded_chunk_count(num_samples: int) -> int:
    """Encoder chunks per clip (for sizing batches)."""
    return math.ceil(audio.num_frames(num_samples) / audio.CROP_FRAMES)
