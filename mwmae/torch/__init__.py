"""MW-MAE / MAE encoders in PyTorch, for environments without JAX.

    import mwmae.torch
    encoder = mwmae.torch.load("artifact/", device="cuda")   # config.json + model.safetensors
    features = encoder(x)      # (B, 200, 80, 1) normalised log-mel -> (B, 50, 5 * D), float32
    tokens = encoder.tokens(x) # (B, [1 +] 250, D): per-token outputs, cls first if any

    encoder = mwmae.torch.Encoder.from_params(model_dict, params)  # flat "a/b/c" -> array

The numbers are those of the JAX ``Encoder`` (``mwmae.Model.features``) to float32 rounding.
This package imports torch and numpy only (safetensors when ``load`` reads a file), never JAX;
of the rest of mwmae only :mod:`mwmae.checksum`, whose weights-file check ``mwmae.load`` makes
too. Tensor names: :mod:`mwmae.torch.weights`; attention semantics:
:mod:`mwmae.torch.attention`.
"""

from mwmae.torch.config import ConfigError, EncoderConfig
from mwmae.torch.encoder import Encoder
from mwmae.torch.load import ArtifactError, load, read_config
from mwmae.torch.weights import WeightsError, param_shapes

__all__ = ["ArtifactError", "ConfigError", "Encoder", "EncoderConfig", "WeightsError", "load",
           "param_shapes", "read_config"]
