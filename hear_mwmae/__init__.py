"""HEAR 2021 module name for hear-eval-kit and hear-validator: ``hear_mwmae``.

    python -m heareval.embeddings.runner hear_mwmae --model ARTIFACT_DIR --tasks-dir TASKS
    hear-validator hear_mwmae -m ARTIFACT_DIR

The implementation is :mod:`mwmae.hear.module`.
"""

from mwmae.hear.module import (
    EmbeddingModel,
    get_scene_embeddings,
    get_timestamp_embeddings,
    load_model,
)

__all__ = ["EmbeddingModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]
