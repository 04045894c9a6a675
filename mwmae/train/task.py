"""What a training task gives the engine (:class:`mwmae.train.engine.Engine`).

The engine owns everything a run shares - mesh, shardings, the jitted and AOT-compiled step,
gradient accumulation, the divergence guard, the loop, hooks, checkpoints, preemption, metrics
- and knows no task. A task (pretraining in :mod:`mwmae.train.pretraining`, the tagger in
:mod:`mwmae.finetune.tagging`) says what is trained and on what, through :class:`Task`.

A step, as the engine runs it (:func:`mwmae.train.step.make_step`)::

    examples, key = task.prepare(batch, state.step)       # whole batch: masks, augmentation
    loss, grads = mean over microbatches of grad(task.loss)(params, micro_examples, key_i)
    state = guarded AdamW update
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import jax
import ml_collections
import numpy as np
import optax

if TYPE_CHECKING:  # annotations only: the modules below import nothing of the tasks
    from mwmae.data.sources import Source
    from mwmae.kernels.plan import Layer
    from mwmae.model import ModelConfig


class TaskHook(NamedTuple):
    """A task's periodic work: ``fn(info)`` after every ``every``-th step (never when
    ``every`` <= 0) and, with ``last``, after the run's last step. What ``fn`` returns (a
    mapping, or None) is handed to the hooks that run after it in the same step
    (``info.produced``), such as ``{"evaluation": {metric: value}}`` for the checkpoint hook."""

    name: str
    fn: Callable[[Any], Mapping[str, Any] | None]
    every: int
    last: bool


class Task(Protocol):
    """One training task. Built from its config, which the constructor checks (once per run)."""

    config: ml_collections.ConfigDict
    # The network's config. The engine may replace it once, before anything is traced, with
    # ``attention_impl="xla"`` when a kernel the config names fails the numerics guard.
    model_config: ModelConfig
    # Config keys a resumed run may set differently (see mwmae.train.config).
    may_change: frozenset[str]
    # init_from also takes the source's decoder (continued pretraining).
    takes_decoder: bool

    @staticmethod
    def schema() -> ml_collections.ConfigDict:
        """Every key this task's configs may hold, with its default."""

    def init_params(self, rng: jax.Array) -> Any:
        """Fresh parameters, boxed with their logical axes (the engine derives the state's
        shardings from them)."""

    def optimizer(self, steps_per_epoch: int, total_steps: int
                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """The update rule and the learning-rate schedule it follows."""

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step takes, by name: shapes and dtypes (the engine adds the
        shardings: every array is split over the mesh's batch axes on its first dimension)."""

    def local_batch(self, audio: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        """What the source drew on this host (clips, and their labels or ids) -> this host's
        rows of the named arrays of :meth:`batch_spec`."""

    def prepare(self, batch: Mapping[str, jax.Array], step: jax.Array
                ) -> tuple[dict[str, jax.Array], jax.Array]:
        """The whole global batch -> the examples the loss takes (each with the batch as its
        first dimension) and the key of the loss's own randomness. Randomness that must not
        depend on how the batch is split into microbatches (masks, mixup) is drawn here."""

    def loss(self, params: Any, examples: Mapping[str, jax.Array], key: jax.Array
             ) -> jax.Array:
        """The mean loss over ``examples`` (a microbatch: equal sizes, so the mean of the
        microbatches' losses is the whole batch's)."""

    def make_source(self) -> Source:
        """Where the run's batches come from (built before anything is written)."""

    def hooks(self, run: Any) -> list[TaskHook]:
        """This task's periodic work, run before the checkpoint hook."""

    def best_metric(self) -> str | None:
        """The evaluation metric whose best checkpoint is kept beside the latest (None: no
        evaluation)."""

    def attention_layers(self, device_batch: int) -> list[Layer]:
        """The attention calls of one step as a device runs them."""

    def flops_per_example(self) -> float:
        """Training FLOPs per example (forward and backward), for MFU."""
