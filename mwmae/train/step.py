"""One pretraining step: mask, reconstruct, AdamW update. Read it top to bottom."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
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
    skipped_steps: jax.Array       # steps whose update was dropped for a non-finite loss/grad
    last_skipped_step: jax.Array   # the latest such step (-1: none)


def init_state(model_config: ModelConfig, tx: optax.GradientTransformation, rng: jax.Array,
               *, boxed: bool = False) -> TrainState:
    """Fresh state. ``boxed`` keeps logical-axis metadata on params and optimizer moments."""
    params = init_params(model_config, rng, boxed=True)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       skipped_steps=jnp.zeros((), jnp.int32),
                       last_skipped_step=jnp.full((), -1, jnp.int32))
    return state if boxed else nn.meta.unbox(state)


def make_train_step(model_config: ModelConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mask_seed: int, grad_accum_steps: int = 1):
    """Returns ``train_step(state, audio) -> (state, metrics)`` (not yet jitted).

    ``audio`` is the global batch (B, frames, mels, 1). With ``grad_accum_steps = k`` it is
    processed as k microbatches of B / k and the gradients averaged; every clip has the same
    number of masked patches, so this equals the gradient of the whole batch.
    """
    model = MaskedAutoencoder(model_config)

    def loss_and_grad(params, audio, noise):
        loss_fn = lambda p: model.apply({"params": p}, audio, noise).loss
        return jax.value_and_grad(loss_fn)(params)

    def train_step(state: TrainState, audio: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        # The mask depends only on (seed, step), drawn for the global batch: the same on any
        # mesh and any number of hosts, and the same again after a resume.
        rng = jax.random.fold_in(jax.random.key(mask_seed), state.step)
        noise = jax.random.uniform(rng, (audio.shape[0], model_config.num_patches))

        if grad_accum_steps == 1:
            loss, grads = loss_and_grad(state.params, audio, noise)
        else:
            micro = lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:])

            def accumulate(carry, batch):
                loss, grads = loss_and_grad(state.params, *batch)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro(audio), micro(noise)))
            loss, grads = jax.tree.map(lambda x: x / grad_accum_steps, (loss, grads))

        new_state, grad_norm = guarded_update(state, loss, grads, tx)
        return new_state, step_metrics(loss, schedule(state.step), grad_norm, new_state)

    return train_step


def guarded_update(state: TrainState, loss: jax.Array, grads: Any,
                   tx: optax.GradientTransformation) -> tuple[TrainState, jax.Array]:
    """The optimizer update and the next state, and the gradient's global norm.

    Divergence guard: a non-finite loss or gradient leaves params and optimizer untouched and is
    counted; the loop then stops or carries on, as config.nonfinite_policy says.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_new = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    last_skipped = jnp.where(finite, state.last_skipped_step, state.step + 1)
    return TrainState(state.step + 1, keep_new(params, state.params),
                      keep_new(opt_state, state.opt_state), skipped, last_skipped), grad_norm


def step_metrics(loss: jax.Array, learning_rate: jax.Array, grad_norm: jax.Array,
                 new_state: TrainState) -> dict[str, Any]:
    return {"loss": loss, "learning_rate": learning_rate, "grad_norm": grad_norm,
            "param_norm": global_norm(new_state.params), "skipped_steps": new_state.skipped_steps}
