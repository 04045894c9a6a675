"""One training step of any task: the task prepares the batch, the gradient of its loss is
averaged over microbatches, and the AdamW update is applied unless it is not finite. Read it top
to bottom."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mwmae.train.optim import global_norm


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    skipped_steps: jax.Array       # steps whose update was dropped for a non-finite loss/grad
    last_skipped_step: jax.Array   # the latest such step (-1: none)


def init_state(params: Any, tx: optax.GradientTransformation, *, boxed: bool = False
               ) -> TrainState:
    """Fresh state around ``params`` (boxed with their logical axes, which the optimizer's
    moments then carry too); ``boxed=False`` strips that metadata."""
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       skipped_steps=jnp.zeros((), jnp.int32),
                       last_skipped_step=jnp.full((), -1, jnp.int32))
    return state if boxed else nn.meta.unbox(state)


def make_step(task: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
              grad_accum_steps: int = 1):
    """Returns ``step(state, batch) -> (state, metrics)`` for ``task`` (a
    :class:`mwmae.train.task.Task`), not yet jitted."""

    def step(state: TrainState, batch: dict[str, jax.Array]
             ) -> tuple[TrainState, dict[str, Any]]:
        examples, key = task.prepare(batch, state.step)
        loss, grads = accumulated_gradient(task.loss, state.params, examples, key,
                                           grad_accum_steps)
        new_state, grad_norm = guarded_update(state, loss, grads, tx)
        return new_state, step_metrics(loss, schedule(state.step), grad_norm, new_state)

    return step


def accumulated_gradient(loss_fn: Any, params: Any, examples: dict[str, jax.Array],
                         key: jax.Array, k: int) -> tuple[jax.Array, Any]:
    """Loss and gradient of ``loss_fn(params, examples, key)``, the batch taken as ``k``
    microbatches of equal size whose losses and gradients are averaged: the mean loss of the
    whole batch, at the memory of one microbatch. Microbatch i's key is ``fold_in(key, i)``
    (``key`` itself when k = 1)."""
    if k == 1:
        return jax.value_and_grad(loss_fn)(params, examples, key)
    micro = jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), examples)

    def accumulate(carry, inputs):
        i, part = inputs
        loss, grads = jax.value_and_grad(loss_fn)(params, part, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    return jax.tree.map(lambda x: x / k, (loss, grads))


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
