"""MW-MAE and MAE models in Flax."""

from mwmae.model.config import ENCODER_SIZES, ModelConfig, model_config
from mwmae.model.embed import patchify, random_masking, unpatchify
from mwmae.model.mae import (
    Encoder,
    MaskedAutoencoder,
    Reconstruction,
    encoder_keys,
    init_params,
    mae_loss,
    param_problems,
    param_shapes,
)

__all__ = [
    "ENCODER_SIZES", "Encoder", "MaskedAutoencoder", "ModelConfig", "Reconstruction",
    "encoder_keys", "init_params", "mae_loss", "model_config", "param_problems", "param_shapes",
    "patchify", "random_masking", "unpatchify",
]
