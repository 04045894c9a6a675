"""The public way to load and run a model, whatever the weights came from.

    model = mwmae.load(path)      # original-format checkpoint dir, mwmae artifact dir, or a
                                  # training workdir (its latest checkpoint)
    emb = model.features(x)       # (B, 200, 80, 1) normalised log-mel -> (B, 50, 5 * D)
    out = model.reconstruct(x, noise=noise)   # pred, target, mask, loss (needs the decoder)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mwmae.artifact import ArtifactError, has_weights_file, is_artifact, load_artifact
from mwmae.convert import _CKPT_RE, CheckpointError, load_original
from mwmae.model import (
    Encoder,
    MaskedAutoencoder,
    ModelConfig,
    Reconstruction,
    encoder_keys,
    param_problems,
)
from mwmae.workdir import Workdir, WorkdirError


@dataclasses.dataclass(frozen=True)
class Model:
    """A model's architecture and weights, with jit-compiled entry points."""

    config: ModelConfig
    params: Any

    @functools.cached_property
    def _module(self) -> MaskedAutoencoder:
        return MaskedAutoencoder(self.config)

    @property
    def has_decoder(self) -> bool:
        """False for encoder-only weights (an artifact exported without the decoder)."""
        return "decoder_pred" in self.params

    def features_fn(self):
        """The pure ``(params, x) -> features`` function (not jitted), for callers that jit it
        themselves (e.g. to count compilations). It runs the :class:`~mwmae.model.Encoder`
        alone on the encoder's entries of ``params`` (a decoder, if any, is not touched)."""
        encoder, keys = Encoder(self.config), encoder_keys(self.config)
        return lambda params, x: encoder.apply({"params": {k: params[k] for k in keys}}, x)

    @functools.cached_property
    def _features_fn(self):
        return jax.jit(self.features_fn())

    @functools.cached_property
    def _reconstruct_fn(self):
        return jax.jit(lambda p, x, noise: self._module.apply({"params": p}, x, noise))

    def _check_input(self, x: Any) -> jax.Array:
        x = jnp.asarray(x)
        want = self.config.input_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; expected (batch, {', '.join(map(str, want))})"
                " = (batch, frames, mel bins, channels) of normalised log-mel")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"input dtype is {x.dtype}; expected a floating dtype")
        return x.astype(jnp.float32)

    def features(self, x: Any) -> jax.Array:
        """(B, frames, mels, 1) -> (B, frames / patch_t, (mels / patch_f) * embed_dim) float32."""
        return self._features_fn(self.params, self._check_input(x))

    def reconstruct(self, x: Any, noise: Any = None, rng: jax.Array | None = None
                    ) -> Reconstruction:
        """Mask, encode, decode. The mask comes from ``noise`` (B, num_patches) when given (the
        kept patches are those with the smallest noise), else from uniform noise drawn with
        ``rng`` (default ``jax.random.key(0)``) exactly as the original draws it: the original
        ran on JAX < 0.5, whose threefry bits were not partitionable, so the same key gives the
        same mask here."""
        if not self.has_decoder:
            raise ValueError(
                "this model has no decoder weights (an encoder-only artifact): reconstruct "
                "needs the decoder; export with --with-decoder, or load the training workdir or "
                "original checkpoint instead. features() works without it.")
        x = self._check_input(x)
        shape = (x.shape[0], self.config.num_patches)
        if noise is None:
            rng = jax.random.key(0) if rng is None else rng
            with jax.threefry_partitionable(False):
                noise = jax.random.uniform(rng, shape, jnp.float32)
        noise = jnp.asarray(noise, jnp.float32)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {shape} "
                             "(batch, number of patches)")
        return self._reconstruct_fn(self.params, x, noise)

    @property
    def num_params(self) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))


def check_params(config: ModelConfig, params: Any, source: str, *,
                 encoder_only: bool = False) -> None:
    """Raise if the parameter tree does not have exactly the shapes ``config`` implies (only the
    encoder's when ``encoder_only``)."""
    problems = param_problems(config, params, encoder_only=encoder_only)
    if problems:
        raise ArtifactError(f"{source}: weights do not match the config:\n  "
                            + "\n  ".join(problems[:20]))


def load(path: str | os.PathLike, *, dtype: str | None = None,
         attention_impl: str | None = None) -> Model:
    """Load a model from an mwmae artifact, an original-format checkpoint directory, or a
    training workdir (see :mod:`mwmae.workdir`; its latest checkpoint).

    ``dtype`` / ``attention_impl`` override the compute dtype and attention backend. An
    encoder-only artifact loads with ``has_decoder`` False: features work, reconstruct raises.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    # A weights file beside a broken config.json is a damaged artifact: say what is wrong.
    if is_artifact(path) or has_weights_file(path):
        config, params, meta = load_artifact(path)
        check_params(config, params, str(path), encoder_only=bool(meta.get("encoder_only")))
    elif path.is_dir() and any(_CKPT_RE.match(p.name) for p in path.iterdir()):
        config, params = load_original(path)
    elif path.is_dir() and Workdir.looks_like_one(path):
        try:
            config, params, _ = Workdir(path).read_params(with_decoder=None)
        except WorkdirError as e:
            raise CheckpointError(str(e)) from e
    else:
        raise CheckpointError(
            f"{path}: not a model: expected an mwmae artifact (config.json with format "
            "'mwmae-artifact' + model.safetensors), an original-format checkpoint directory "
            "(checkpoint_<step> + config.json) or a training workdir (see mwmae.workdir)")
    overrides = {k: v for k, v in (("dtype", dtype), ("attention_impl", attention_impl)) if v}
    if overrides:
        config = config.replace(**overrides)
    return Model(config, jax.tree.map(jnp.asarray, params))
