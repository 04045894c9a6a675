"""One supervised step: augment, classify, loss, AdamW update. Read it top to bottom.

Targets: multi-hot float (B, C) for multilabel tasks (sigmoid binary cross-entropy), one-hot
float (B, C) for multiclass tasks (softmax cross-entropy with label smoothing). Labels arrive from
the shards as class indices padded with -1 (:func:`targets_from_labels`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mwmae.finetune.augment import AugmentConfig, augment
from mwmae.finetune.model import Classifier
from mwmae.train.step import TrainState, guarded_update, step_metrics

TASKS = ("multilabel", "multiclass")


def targets_from_labels(labels: jax.Array, num_classes: int, task: str) -> jax.Array:
    """(B, max_labels) int class indices padded with -1 -> (B, C) float32 multi-/one-hot.
    A multiclass clip takes its first label."""
    if task == "multiclass":
        labels = labels[:, :1]
    hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # -1 gives a zero row
    return jnp.clip(hot.sum(axis=1), 0.0, 1.0)


def classification_loss(logits: jax.Array, targets: jax.Array, task: str,
                         label_smoothing: float = 0.0) -> jax.Array:
    if task == "multilabel":
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    targets = optax.smooth_labels(targets, label_smoothing) if label_smoothing else targets
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_supervised_step(model: Classifier, tx: optax.GradientTransformation,
                         schedule: optax.Schedule, *, task: str, seed: int,
                         augmentation: AugmentConfig | None = None,
                         label_smoothing: float = 0.0):
    """Returns ``step(state, (audio, labels)) -> (state, metrics)`` (not yet jitted)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {TASKS}")
    num_classes = model.head_config.num_classes
    augmentation = augmentation or AugmentConfig()

    def step(state: TrainState, batch: tuple[jax.Array, jax.Array]
             ) -> tuple[TrainState, dict[str, Any]]:
        audio, labels = batch
        # Augmentation and dropout depend only on (seed, step): a resume repeats them exactly.
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        k_augment, k_dropout = jax.random.split(key)
        targets = targets_from_labels(labels, num_classes, task)
        audio, targets = augment(k_augment, audio, targets, augmentation)

        def loss_fn(params):
            logits = model.apply({"params": params}, audio, train=True,
                                 rngs={"dropout": k_dropout})
            return classification_loss(logits, targets, task, label_smoothing)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new_state, grad_norm = guarded_update(state, loss, grads, tx)
        return new_state, step_metrics(loss, schedule(state.step), grad_norm, new_state)

    return step
