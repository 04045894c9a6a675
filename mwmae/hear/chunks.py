"""Waveforms -> MW-MAE embeddings, the way the original HEAR module computes them: everything but
the encoder call, in numpy, shared by the JAX (:mod:`mwmae.hear.embed`) and PyTorch
(:mod:`mwmae.hear.torch_embed`) backends.

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

Batches. Chunks from all clips of a call are flattened and run through the encoder in batches
of at most ``max_batch`` (a backend may pad the last one, as the JAX one does to bound its
compilations), so device memory is bounded by one batch: long clips never enter the device
whole.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from typing import Any

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


class ChunkEmbedder(abc.ABC):
    """The backend-independent part of an embedder: log-mel, normalisation, chunking, frame
    bookkeeping and scene means. A backend sets ``max_batch``, ``chunk_frames``, ``n_mels``,
    ``frames_per_chunk``, ``patch_frames`` and ``embedding_size`` and implements
    :meth:`_encode_chunks`."""

    max_batch: int
    chunk_frames: int
    n_mels: int
    frames_per_chunk: int
    patch_frames: int
    embedding_size: int

    @abc.abstractmethod
    def _encode_chunks(self, chunks: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(N, chunk_frames, n_mels) chunks -> (start, (k, frames_per_chunk, D) float32) in
        order, at most ``max_batch`` chunks at a time."""

    # Normalised log-mel -> frames ----------------------------------------------------------
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



def padded_chunk_count(num_samples: int) -> int:
    """Encoder chunks per clip (for sizing batches)."""
    return math.ceil(audio.num_frames(num_samples) / audio.CROP_FRAMES)
