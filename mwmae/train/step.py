"""One pretraining step: mask, reconstruct, AdamW update. Read it top to bottom."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mwmae.model import MaskedAutoencoder, ModelConfig, init_params
from mwmae.train.optim import global_norm


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(model_config: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array
               ) -> TrainState:
    params = init_params(model_config, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_train_step(model_config: ModelConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mask_seed: int):
    """Returns ``train_step(state, audio) -> (state, metrics)`` (not yet jitted)."""
    model = MaskedAutoencoder(model_config)

    def train_step(state: TrainState, audio: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        # The mask depends only on (seed, step): a resumed run draws the same masks.
        rng = jax.random.fold_in(jax.random.key(mask_seed), state.step)
        noise = jax.random.uniform(rng, (audio.shape[0], model_config.num_patches))

        def loss_fn(params):
            return model.apply({"params": params}, audio, noise).loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "learning_rate": schedule(state.step),
                   "grad_norm": global_norm(grads), "param_norm": global_norm(params)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step
