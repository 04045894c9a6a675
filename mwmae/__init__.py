"""mwmae: pretraining and serving MW-MAE audio models in JAX.

The public names load lazily, so ``import mwmae.audio`` (shard-building workers) does not pay
for importing the model stack.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Model", "ModelConfig", "load", "model_config"]

_LAZY = {"Model": "mwmae.api", "load": "mwmae.api", "ModelConfig": "mwmae.model.config",
         "model_config": "mwmae.model.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mwmae' has no attribute {name!r}")
