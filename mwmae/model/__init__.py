"""MW-MAE and MAE models in Flax."""

from mwmae.model.config import ENCODER_SIZES, ModelConfig, model_config
from mwmae.model.embed import patchify, random_masking, unpatchify
from mwmae.model.mae import (
    MaskedAutoencoder,
    Reconstruction,
    init_params,
    mae_loss,
    param_shapes,
)

__all__ = [
    "ENCODER_SIZES", "MaskedAutoencoder", "ModelConfig", "Reconstruction", "init_params",
    "mae_loss", "model_config", "param_shapes", "patchify", "random_masking", "unpatchify",
]
