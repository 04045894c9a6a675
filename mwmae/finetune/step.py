"""One supervised step: augment, classify, loss; the engine's step averages the gradient over
microbatches and applies the AdamW update. Read it top to bottom.

Targets: multi-hot float (B, C) for multilabel tasks (sigmoid binary cross-entropy), one-hot
float (B, C) for multiclass tasks (softmax cross-entropy with label smoothing). Labels arrive from
the shards as class indices padded with -1 (:func:`targets_from_labels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mwmae.finetune.augment import AugmentConfig, augment
from mwmae.finetune.model import Classifier
from mwmae.train.step import make_step

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


@dataclasses.dataclass(frozen=True)
class SupervisedObjective:
    """The supervised step's two halves, as the engine's step takes them (see
    :func:`mwmae.train.step.make_step`): ``prepare`` augments the whole batch (mixup pairs and
    masks do not depend on how it is split into microbatches), ``loss`` classifies a
    (micro)batch with dropout."""

    model: Classifier
    task: str
    seed: int
    augmentation: AugmentConfig = AugmentConfig()
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: expected one of {TASKS}")

    def prepare(self, batch: Mapping[str, jax.Array], step: jax.Array
                ) -> tuple[dict[str, jax.Array], jax.Array]:
        # Augmentation and dropout depend only on (seed, step): a resume repeats them exactly.
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        k_augment, k_dropout = jax.random.split(key)
        targets = targets_from_labels(batch["label"], self.model.head_config.num_classes,
                                      self.task)
        audio, targets = augment(k_augment, batch["audio"], targets, self.augmentation)
        return {"audio": audio, "targets": targets}, k_dropout

    def loss(self, params: Any, examples: Mapping[str, jax.Array], key: jax.Array
             ) -> jax.Array:
        logits = self.model.apply({"params": params}, examples["audio"], train=True,
                                  rngs={"dropout": key})
        return classification_loss(logits, examples["targets"], self.task, self.label_smoothing)


def make_supervised_step(model: Classifier, tx: optax.GradientTransformation,
                         schedule: optax.Schedule, *, task: str, seed: int,
                         augmentation: AugmentConfig | None = None,
                         label_smoothing: float = 0.0, grad_accum_steps: int = 1):
    """Returns ``step(state, {"audio", "label"}) -> (state, metrics)`` (not yet jitted)."""
    objective = SupervisedObjective(model, task, seed, augmentation or AugmentConfig(),
                                    label_smoothing)
    return make_step(objective, tx, schedule, grad_accum_steps)
