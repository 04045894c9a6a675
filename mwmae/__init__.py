"""mwmae: pretraining and serving MW-MAE audio models in JAX.

The public names load lazily, so ``import mwmae.audio`` (shard-building workers) does not pay
for importing the model stack.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# gs:// workdirs (config.json, checkpoints through etils) go through fsspec/gcsfs, the client the
# tests run against a storage emulator, rather than TensorFlow's GCS filesystem, which etils
# would pick when TensorFlow is installed. etils reads this once, at its first gs:// path, so it
# is set here, before any mwmae module imports etils or Orbax.
os.environ["EPATH_USE_TF"] = "false"

__version__ = "0.1.0"
__all__ = ["Model", "ModelConfig", "load", "model_config"]

_LAZY = {"Model": "mwmae.api", "load": "mwmae.api", "ModelConfig": "mwmae.model.config",
         "model_config": "mwmae.model.config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mwmae' has no attribute {name!r}")
