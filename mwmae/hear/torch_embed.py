"""The PyTorch backend of the HEAR embedder: the artifact's encoder as a :mod:`mwmae.torch`
module, on CUDA when present, with the log-mel, chunking and frame bookkeeping of
:mod:`mwmae.hear.chunks` (shared with the JAX backend, so both give the same embeddings to
float32 rounding). Imports torch, numpy and safetensors only: it runs where JAX is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mwmae.hear.chunks import ChunkEmbedder

# What ``dtype`` may ask for: float32, or autocast in a 16-bit float on the device.
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def max_batch_default(device: torch.device) -> int:
    """Chunks per encoder call: more on a GPU, where one call is cheap."""
    return 8 if device.type == "cpu" else 128


class TorchEmbedder(ChunkEmbedder):
    """An artifact's encoder in PyTorch, called on at most ``max_batch`` chunks at a time."""

    def __init__(self, encoder: torch.nn.Module, *, max_batch: int | None = None,
                 device: torch.device | str | None = None, dtype: str = "float32"):
        if dtype not in AUTOCAST:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(AUTOCAST)}")
        self.device = torch.device(device) if device is not None else default_device()
        self.max_batch = max_batch or max_batch_default(self.device)
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        self.encoder = encoder.to(self.device).eval()
        self.autocast = AUTOCAST[dtype]
        config = encoder.config
        self.chunk_frames, self.n_mels, _ = config.input_shape
        self.frames_per_chunk = config.grid_size[0]
        self.patch_frames = config.patch_size[0]
        self.embedding_size = int(config.feature_dim)

    @classmethod
    def load(cls, path: str, **kwargs: Any) -> TorchEmbedder:
        """The artifact folder ``path`` (config.json + model.safetensors)."""
        import mwmae.torch

        return cls(mwmae.torch.load(path), **kwargs)

    @torch.inference_mode()
    def _encode_chunks(self, chunks: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(chunks), self.max_batch):
            part = torch.from_numpy(np.ascontiguousarray(
                chunks[start:start + self.max_batch], np.float32))[..., None].to(self.device)
            if self.autocast is None:
                out = self.encoder(part)
            else:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    out = self.encoder(part)
            yield start, out.float().cpu().numpy()
