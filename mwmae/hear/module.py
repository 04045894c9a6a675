"""The HEAR 2021 API over an MW-MAE artifact: torch tensors in and out, JAX or PyTorch inside.

    model = load_model("path/to/artifact")          # an mwmae artifact (or training workdir)
    emb, ts = get_timestamp_embeddings(audio, model) # (n, T, D) float32, (n, T) ms
    scene = get_scene_embeddings(audio, model)       # (n, D) float32

``audio`` is a (n_sounds, n_samples) float tensor of 16 kHz mono in [-1, 1], on any device; the
outputs come back on the input's device. See :mod:`mwmae.hear.chunks` for the chunking, the
padding rule and the timestamps (frame centres, 10 p ms apart for a temporal patch of p STFT
frames: 40 ms apart from 15 ms for the paper's 4x16).

Two backends compute the same embeddings (to float32 rounding): ``"jax"`` (the JAX model,
jitted; any source :func:`mwmae.load` reads) and ``"torch"`` (:mod:`mwmae.torch`: an artifact's
``model.safetensors``, on CUDA when present, no JAX needed). The default is JAX where it is
installed and PyTorch where it is not (``pip install "mwmae[hear-torch]"``); hear-eval-kit's
``--model-options '{"backend": "torch"}'`` picks one.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
import torch

from mwmae import audio as _audio

__all__ = ["EmbeddingModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]


class EmbeddingModel(torch.nn.Module):
    """What :func:`load_model` returns: the HEAR tools ask for a ``torch.nn.Module``. With the
    JAX backend it holds no torch parameters (the model lives in ``embedder``); with the
    PyTorch one the encoder is its submodule ``encoder``."""

    sample_rate: int = _audio.SAMPLE_RATE

    def __init__(self, embedder: Any, source: str = "", backend: str = "jax"):
        super().__init__()
        self.embedder = embedder
        self.source = source
        self.backend = backend
        if backend == "torch":
            self.encoder = embedder.encoder
        self.scene_embedding_size = int(embedder.embedding_size)
        self.timestamp_embedding_size = int(embedder.embedding_size)

    def extra_repr(self) -> str:
        c = self.embedder.encoder.config if self.backend == "torch" else \
            self.embedder.model.config
        return (f"source={self.source!r}, backend={self.backend}, embed_dim={c.embed_dim}, "
                f"depth={c.depth}, embedding_size={self.timestamp_embedding_size}")


DTYPES = ("float32", "bfloat16")
BACKENDS = ("jax", "torch")
OPTIONS = ("backend", "batch_size", "dtype")


def jax_installed() -> bool:
    return importlib.util.find_spec("jax") is not None


BACKEND_ENV = "MWMAE_HEAR_BACKEND"


def default_backend() -> str:
    """``$MWMAE_HEAR_BACKEND`` when set; else PyTorch in the cuda image (``MWMAE_TARGET=cuda``:
    it evaluates with torch's CUDA build on the GPU its training used), JAX where it is
    installed, PyTorch where it is not."""
    chosen = os.environ.get(BACKEND_ENV, "") or (
        "torch" if os.environ.get("MWMAE_TARGET") == "cuda" else "")
    if chosen:
        if chosen not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV}={chosen!r}: expected one of {', '.join(BACKENDS)}")
        return chosen
    return "jax" if jax_installed() else "torch"


def check_options(*, dtype: str | None = None, batch_size: int | None = None,
                  backend: str | None = None, **unknown: Any) -> None:
    """Raise ValueError for options :func:`load_model` does not take or cannot honour (they
    come from the user's ``--model-options``, so the messages use their names)."""
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}; mwmae.hear's load_model takes "
                         f"{', '.join(OPTIONS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "jax" and not jax_installed():
        raise ValueError("backend 'jax': JAX is not installed here (the hear-torch install); "
                         "use backend 'torch', or install mwmae's train extra")
    # 0 would silently mean "the default" below; a bool is an int to Python.
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size {batch_size!r}: expected a whole number >= 1 (2-second "
                         "chunks per encoder call)")


def load_model(model_file_path: str = "", *, dtype: str | None = None,
               batch_size: int | None = None, backend: str | None = None,
               **unknown: Any) -> EmbeddingModel:
    """Load an exported artifact (``python -m mwmae.export``); with the JAX backend a training
    workdir or an original-format checkpoint directory also works.

    ``dtype``: "float32" (default: as exported) or "bfloat16" compute. ``batch_size``: 2-second
    chunks per encoder call (default 8 on CPU, 128 on accelerators); bounds device memory.
    ``backend``: "jax" or "torch" (default: JAX where installed). All can come from
    hear-eval-kit's ``--model-options '{"dtype": "bfloat16", "backend": "torch"}'``.
    """
    # hear-eval-kit passes --model-options as keywords: a typo gets a message, not a TypeError.
    check_options(dtype=dtype, batch_size=batch_size, backend=backend, **unknown)
    if not model_file_path:
        # Random weights would give meaningless embeddings without any warning.
        raise ValueError("load_model needs model_file_path: the directory of an mwmae artifact "
                         "(python -m mwmae.export ... --out DIR)")
    if not os.path.exists(model_file_path):
        raise FileNotFoundError(f"{model_file_path}: no such artifact directory")
    backend = backend or default_backend()
    if backend == "torch":
        from mwmae.hear.torch_embed import TorchEmbedder

        embedder = TorchEmbedder.load(model_file_path, max_batch=batch_size,
                                      dtype=dtype or "float32")
    else:
        import mwmae
        from mwmae.hear.embed import Embedder, max_batch_default

        model = mwmae.load(model_file_path, dtype=dtype)
        embedder = Embedder(model, max_batch=batch_size or max_batch_default())
    return EmbeddingModel(embedder, source=str(model_file_path), backend=backend)


def _to_numpy(audio: Any) -> tuple[np.ndarray, torch.device]:
    if isinstance(audio, torch.Tensor):
        if not audio.is_floating_point():
            raise ValueError(f"audio dtype is {audio.dtype}; expected float samples in [-1, 1]")
        return audio.detach().to("cpu", torch.float32).numpy(), audio.device
    if isinstance(audio, np.ndarray):
        return audio, torch.device("cpu")
    raise TypeError(f"audio must be a torch.Tensor (n_sounds, n_samples), got "
                    f"{type(audio).__name__}")


def _check_model(model: Any) -> EmbeddingModel:
    if not isinstance(model, EmbeddingModel):
        raise TypeError(f"model must come from load_model(), got {type(model).__name__}")
    return model


def get_timestamp_embeddings(audio: torch.Tensor, model: EmbeddingModel
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_samples) -> embeddings (n_sounds, n_frames, D) float32 and timestamps
    (n_sounds, n_frames) in ms at the centre of each frame (40 ms frames for 4x16 patches)."""
    x, device = _to_numpy(audio)
    emb, ts = _check_model(model).embedder.timestamp_embeddings(x)
    return torch.from_numpy(emb).to(device), torch.from_numpy(ts).to(device)


def get_scene_embeddings(audio: torch.Tensor, model: EmbeddingModel) -> torch.Tensor:
    """(n_sounds, n_samples) -> (n_sounds, D) float32: the mean of the timestamp embeddings."""
    x, device = _to_numpy(audio)
    return torch.from_numpy(_check_model(model).embedder.scene_embeddings(x)).to(device)
