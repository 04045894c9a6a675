"""Pretraining as a task of the engine: mask 80% of the patches, reconstruct them, and write
reconstruction images to TensorBoard every ``image_every_steps``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from mwmae.data.sources import Source
from mwmae.kernels.plan import Layer
from mwmae.model import MaskedAutoencoder, init_params
from mwmae.train import attention_plan, perf
from mwmae.train import metrics as metrics_lib
from mwmae.train.config import (
    MAY_CHANGE_ON_RESUME,
    check_config,
    default_config,
    model_config_from,
)
from mwmae.train.images import reconstruction_grid
from mwmae.train.optim import make_optimizer
from mwmae.train.sources import make_source
from mwmae.train.task import TaskHook


class Pretraining:
    """The masked autoencoder's task (MW-MAE or MAE, as the config's decoder windows say)."""

    may_change = MAY_CHANGE_ON_RESUME
    takes_decoder = True

    def __init__(self, config: ml_collections.ConfigDict):
        check_config(config, self.schema())
        self.config = config
        self.model_config = model_config_from(config)
        # The mask depends only on (seed, step), drawn for the global batch: the same on any
        # mesh and any number of hosts, and the same again after a resume.
        self.mask_seed = config.seed + 1

    @staticmethod
    def schema() -> ml_collections.ConfigDict:
        return default_config()

    def init_params(self, rng: jax.Array) -> Any:
        return init_params(self.model_config, rng, boxed=True)

    def optimizer(self, steps_per_epoch: int, total_steps: int
                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        return make_optimizer(self.config, steps_per_epoch, total_steps)

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {"audio": jax.ShapeDtypeStruct(
            (self.config.batch_size, *self.model_config.input_shape), np.float32)}

    def local_batch(self, audio: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"audio": audio}  # the clips alone: labels or ids play no part

    def prepare(self, batch: Mapping[str, jax.Array], step: jax.Array
                ) -> tuple[dict[str, jax.Array], jax.Array]:
        audio = batch["audio"]
        rng = jax.random.fold_in(jax.random.key(self.mask_seed), step)
        return {"audio": audio, "noise": self.mask_noise(audio.shape[0], step)}, rng

    def mask_noise(self, batch: int, step: Any) -> jax.Array:
        """The step's masking noise for the global batch: a function of (seed, step) only."""
        rng = jax.random.fold_in(jax.random.key(self.mask_seed), step)
        return jax.random.uniform(rng, (batch, self.model_config.num_patches))

    def loss(self, params: Any, examples: Mapping[str, jax.Array], key: jax.Array
             ) -> jax.Array:
        # Every clip has the same number of masked patches, so the mean over microbatches of
        # this loss is the whole batch's.
        model = MaskedAutoencoder(self.model_config)
        return model.apply({"params": params}, examples["audio"], examples["noise"]).loss

    def make_source(self) -> Source:
        return make_source(self.config)

    def hooks(self, run: Any) -> list[TaskHook]:
        every = self.config.image_every_steps
        return [TaskHook("images", self._image_hook(run), every, every > 0)]

    def best_metric(self) -> str | None:
        return None  # no evaluation: the latest and the every-N-steps checkpoints are kept

    def attention_layers(self, device_batch: int) -> list[Layer]:
        """The encoder on the kept patches, the decoder on all of them."""
        mc = self.model_config
        return attention_plan.model_layers(mc, device_batch, mc.len_keep + mc.num_extra_tokens)

    def flops_per_example(self) -> float:
        return perf.train_flops_per_example(self.model_config)

    def reconstructions(self, params: Any, audio: np.ndarray, step: int) -> np.ndarray:
        """Image grid of a few clips, masked with the step's own noise."""
        n = min(self.config.num_images, audio.shape[0])
        noise = self.mask_noise(audio.shape[0], step)[:n]
        x = np.asarray(audio[:n])
        params = jax.device_get(params)
        out = MaskedAutoencoder(self.model_config).apply({"params": params}, x, noise)
        return reconstruction_grid(x, out.pred, out.mask, self.model_config.patch_size)

    def _image_hook(self, run: Any):
        def write(info: Any) -> None:
            grid = self.reconstructions(info.state.params, info.audio, info.step - 1)
            run.writer.write_images(info.step, {metrics_lib.IMAGE_TAG: grid})
        return write
