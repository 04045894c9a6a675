"""HEAR 2021 embedding module for MW-MAE artifacts (``hear-eval-kit`` module ``mwmae.hear`` or
``hear_mwmae``; the artifact directory is the ``model_file_path``).

The API functions load torch on first use, so ``mwmae.hear.tasks`` and ``mwmae.hear.embed``
stay importable without it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EmbeddingModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("mwmae.hear.module"), name)
    raise AttributeError(f"module 'mwmae.hear' has no attribute {name!r}")
