"""mwmae: pretraining and serving MW-MAE audio models in JAX."""

from mwmae.api import Model, load
from mwmae.model import ModelConfig, model_config

__all__ = ["Model", "ModelConfig", "load", "model_config"]
__version__ = "0.1.0"
