"""The JAX backend of the HEAR embedder: :class:`Embedder` runs the encoder jitted, in batches
bucketed to powers of two, so the encoder compiles for at most ``log2(max_batch) + 1`` shapes
whatever the clip lengths; the next batch is dispatched before the previous one is copied back.
Everything else (log-mel, normalisation, chunking, padding, timestamps, scene means) is
:mod:`mwmae.hear.chunks`, which the PyTorch backend (:mod:`mwmae.hear.torch_embed`) shares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from mwmae.hear.chunks import (  # noqa: F401 - the names this module has always offered
    MIN_SAMPLES,
    STFT_HOP_MS,
    ChunkEmbedder,
    bucket_sizes,
    check_audio,
    chunk_features,
    frame_hop_ms,
    num_embedding_frames,
    padded_chunk_count,
    timestamps_ms,
)


@dataclasses.dataclass
class Embedder(ChunkEmbedder):
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

    def warm_up(self) -> None:
        """Compile every bucket now (first calls then run at full speed)."""
        for b in self.buckets:
            x = np.zeros((b, self.chunk_frames, self.n_mels, 1), np.float32)
            jax.block_until_ready(self._encode(self._params, jax.device_put(x, self.device)))


def max_batch_default() -> int:
    """Chunks per encoder call: more on accelerators, where one call is cheap."""
    return 8 if jax.default_backend() == "cpu" else 128
