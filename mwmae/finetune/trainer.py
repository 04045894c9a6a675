"""The tagger as a task of the trainer: the same loop, mesh, workdir, checkpoints, preemption
and metrics as pretraining, with a classifier's state and step, labelled batches, a whole-clip
evaluation hook and the best evaluated checkpoint kept beside the latest.

    python -m mwmae.finetune --config configs/tag.py[:VARIANT] --workdir DIR \\
        --config.init_from=ARTIFACT_OR_CHECKPOINT_OR_WORKDIR
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mwmae.data import PipelineConfig
from mwmae.finetune import augment
from mwmae.finetune.config import (
    MAIN_METRIC,
    MAY_CHANGE,
    check_tag_config,
    clip_labels_csv,
    labels_csv,
    num_classes,
    read_vocabulary,
    tag_config,
)
from mwmae.finetune.evaluate import EvalSplit, evaluate
from mwmae.finetune.model import Classifier, HeadConfig
from mwmae.finetune.optim import tagger_optimizer
from mwmae.finetune.step import make_supervised_step
from mwmae.train import attention_plan, perf, sharding
from mwmae.train import metrics as metrics_lib
from mwmae.train.config import ConfigError
from mwmae.train.optim import decay_mask, learning_rate_schedule
from mwmae.train.step import TrainState
from mwmae.train.trainer import Trainer, make_source

# Label slots per clip in a batch: the input pipeline's padded label ids.
MAX_LABELS = PipelineConfig.max_labels


class Tagger(Trainer):
    """Fine-tuning (or probing) the encoder with a classification head."""

    may_change = MAY_CHANGE
    takes_decoder = False  # init_from takes the encoder; the head starts fresh

    def __init__(self, config: ml_collections.ConfigDict, workdir: Any,
                 devices: list[jax.Device] | None = None):
        self.check(config)
        t = config.tagger
        self.num_classes = num_classes(config)
        _check_vocabularies(config)
        self.task = t.task
        self.main_metric = MAIN_METRIC[t.task]
        self.head_config = HeadConfig(self.num_classes, t.head, t.dropout, t.drop_path,
                                      t.freeze_encoder, t.pooling)
        self._eval_split: EvalSplit | None = None
        super().__init__(config, workdir, devices)
        self.model = self._classifier()
        self.label_sharding = sharding.batch_sharding(self.mesh, 2)
        # Evaluation logits stay split over the batch: each host takes back its own rows.
        self._predict = jax.jit(lambda params, x: self.model.apply({"params": params}, x),
                                in_shardings=(self.state_sharding.params, self.batch_sharding),
                                out_shardings=sharding.batch_sharding(self.mesh, 2))

    @staticmethod
    def schema() -> ml_collections.ConfigDict:
        return tag_config()

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        check_tag_config(config)

    def _classifier(self, *, for_init: bool = False) -> Classifier:
        # Initialised with the XLA attention, as pretraining's: parameters do not depend on it.
        config = (dataclasses.replace(self.model_config, attention_impl="xla") if for_init
                  else self.model_config)
        return Classifier(config, self.head_config)

    def _init_params(self, rng: jax.Array) -> Any:
        """Fresh parameters, boxed with their logical axes."""
        x = jnp.zeros((1, *self.model_config.input_shape), jnp.float32)
        return self._classifier(for_init=True).init(rng, x)["params"]

    def make_optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
        c, o, t = self.config, self.config.optimizer, self.config.tagger
        schedule = learning_rate_schedule(o.base_learning_rate, c.batch_size,
                                          int(o.warmup_epochs * self.steps_per_epoch),
                                          self.total_steps)
        shapes = jax.eval_shape(lambda: nn.meta.unbox(self._init_params(jax.random.key(0))))
        tx = tagger_optimizer(shapes, self.model_config, schedule,
                              weight_decay=o.weight_decay, layer_decay=t.layer_decay,
                              freeze_encoder=t.freeze_encoder, b1=o.b1, b2=o.b2, eps=o.eps,
                              grad_clip_norm=o.grad_clip_norm,
                              mask=decay_mask if o.decay_exempt_1d else None)
        return tx, schedule

    def init_state(self, rng: jax.Array, *, boxed: bool = False) -> TrainState:
        params = self._init_params(rng)
        # Boxed parameters give the optimizer's moments their logical axes too.
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=self.tx.init(params),
                           skipped_steps=jnp.zeros((), jnp.int32),
                           last_skipped_step=jnp.full((), -1, jnp.int32))
        return state if boxed else nn.meta.unbox(state)

    def make_step(self) -> Callable:
        t = self.config.tagger
        augmentation = augment.AugmentConfig(
            mixup_alpha=t.mixup_alpha, time_masks=t.time_masks,
            time_mask_frames=t.time_mask_frames, freq_masks=t.freq_masks,
            freq_mask_bins=t.freq_mask_bins)
        return make_supervised_step(self._classifier(), self.tx, self.schedule, task=t.task,
                                    seed=self.config.seed + 1, augmentation=augmentation,
                                    label_smoothing=t.label_smoothing)

    def batch_spec(self) -> Any:
        labels = jax.ShapeDtypeStruct((self.config.batch_size, MAX_LABELS), np.int32,
                                      sharding=sharding.batch_sharding(self.mesh, 2))
        return (super().batch_spec(), labels)

    def global_batch(self, audio: np.ndarray, labels: np.ndarray | None = None) -> Any:
        if labels is None or labels.ndim != 2 or labels.shape[1] != MAX_LABELS:
            raise ValueError("the tagger's batches need their padded label ids "
                             f"(B, {MAX_LABELS}); got {None if labels is None else labels.shape}")
        return (super().global_batch(audio),
                jax.make_array_from_process_local_data(self.label_sharding,
                                                       np.asarray(labels, np.int32)))

    def make_source(self) -> Any:
        balanced = clip_labels_csv(self.config) if self.config.data.balanced_sampling else None
        return make_source(self.config, balanced_labels=balanced)

    def best_metric(self) -> str | None:
        return self.main_metric if self.config.tagger.keep_best and self.evaluates else None

    def attention_layers(self) -> list:
        """The encoder over every patch: fine-tuning has no masking and no decoder."""
        mc = self.model_config
        return attention_plan.model_layers(mc, self.device_batch(),
                                           mc.num_patches + mc.num_extra_tokens, decoder=False)

    def flops_per_example(self) -> float:
        # Forward and backward of the encoder over every patch (no masking), the head aside.
        return 3 * perf.encoder_flops_per_example(self.model_config)

    def reconstructions(self, params, audio, step):
        raise NotImplementedError("a tagger has no decoder: there are no reconstructions")

    # ---------------------------------------------------------------- evaluation

    @property
    def evaluates(self) -> bool:
        return bool(self.config.tagger.eval_shards)

    def eval_split(self) -> EvalSplit:
        if self._eval_split is None:
            frames, n_mels = self.model_config.img_size
            self._eval_split = EvalSplit(
                self.config.tagger.eval_shards, frames=frames, n_mels=n_mels,
                max_labels=MAX_LABELS, batch_size=self.config.tagger.eval_batch_size,
                num_classes=self.num_classes)
        return self._eval_split

    def predict(self, params: Any, windows: np.ndarray) -> np.ndarray:
        """This host's windows -> their logits (b, classes), as numpy on this host."""
        with self.mesh_context():
            out = self._predict(params, jax.make_array_from_process_local_data(
                self.batch_sharding, windows))
        if jax.process_count() == 1:
            return np.asarray(out)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.global_array_to_host_local_array(
            out, self.mesh, out.sharding.spec))

    def evaluate(self, params: Any) -> dict[str, float]:
        """The held-out split's metrics for ``params`` (every host calls it)."""
        return evaluate(self.eval_split(), lambda x: self.predict(params, x), self.task)

    def task_hooks(self, run: Any) -> list[tuple[str, Callable, int, bool]]:
        if not self.evaluates:
            return []
        split = self.eval_split()  # read once now: a bad split fails before training
        every = self.config.tagger.eval_every_steps
        run.print_fn(f"evaluation: {split.total_clips} clips of {self.config.tagger.eval_shards}"
                     + (f" every {every} steps and" if every else "") + " at the last step")
        return [("evaluate", self._evaluation_hook(run), self.config.tagger.eval_every_steps,
                 True)]

    def _evaluation_hook(self, run: Any) -> Callable:
        import json
        import math

        from mwmae.data import storage
        from mwmae.finetune.evaluate import best_evaluation
        from mwmae.workdir import WorkdirError

        shards = math.prod(self.mesh.shape[a] for a in sharding.mesh_axes("act_batch"))
        size = self.config.tagger.eval_batch_size
        if size % shards:
            # Found here, before the first step, rather than at the first evaluation.
            raise ConfigError(f"tagger.eval_batch_size={size}: not divisible by the {shards} "
                              f"batch shards of the mesh; use a multiple of {shards}")
        main, spec = self.main_metric, self.config.tagger.eval_shards
        split = self.eval_split().fingerprint
        path = run.workdir.evaluations_path
        try:
            rows = run.workdir.read_evaluations()
        except WorkdirError as e:
            raise WorkdirError(f"{e}; the run ranks its best checkpoint by this file: repair or "
                               "delete that line (the TensorBoard logs hold every evaluation "
                               "too) and rerun") from e
        earlier = [r for r in rows if r["step"] <= run.start_step]
        for r in earlier:
            if not isinstance(r.get(main), (int, float)):
                raise WorkdirError(f"{path}: the evaluation of step {r['step']} has no {main}; "
                                   "repair or delete that line and rerun")
        ranked_on = sorted({r["split"] for r in earlier if "split" in r} - {split})
        if ranked_on:
            # Tie or not, scores of two splits are not comparable, and the checkpoint kept as
            # the best is chosen by them.
            raise ConfigError(
                f"tagger.eval_shards={spec}: not the split this workdir's evaluations (and the "
                f"checkpoint it keeps as the best) were made on ({path}: split {ranked_on[0]}, "
                f"this one is {split}); resume with that split, or give this one a new --workdir")
        later = [r for r in rows if r["step"] > run.start_step]
        if later:
            # Evaluations of checkpoints that never committed (or of an earlier run in this
            # workdir): this run evaluates those steps afresh.
            run.print_fn(f"{path}: dropping the evaluations after the restored step "
                         f"{run.start_step} (" + ", ".join(f"step {r['step']} {main} {r.get(main)}"
                                                           for r in later) + ")")
            if jax.process_index() == 0:
                storage.write_text(str(path), "".join(json.dumps(r) + "\n" for r in earlier))
        best = best_evaluation(earlier, main)

        def hook(info: Any) -> None:
            nonlocal best
            t0 = time.perf_counter()
            result = self.evaluate(info.state.params)
            result["eval_seconds"] = time.perf_counter() - t0
            run.evaluated[info.step] = {main: result[main]}
            row = {"step": info.step, **result, "split": split}
            best = best_evaluation([*([best] if best else []), row], main)
            if jax.process_index() == 0:
                run.workdir.append_evaluation(row)
            run.writer.write_scalars(info.step, metrics_lib.tagged(
                {k: v for k, v in result.items() if not _is_nan(v)}))
            run.print_fn(f"eval  {info.step:5d}/{self.total_steps}  {main} {result[main]:.4f}  "
                         + "  ".join(f"{k} {result[k]:.4f}" for k in ("mAUC", "d_prime")
                                     if k in result)
                         + f"  ({result['clips']} clips, {result['eval_seconds']:.1f} s; "
                         + (f"best {best[main]:.4f} at step {best['step']})" if best else
                            "no best yet)"))
        return hook


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and np.isnan(value)


def _check_vocabularies(config: ml_collections.ConfigDict) -> None:
    """The evaluation split must be listed whole and prove it uses the training split's labels
    (same names, same ids): class ids are bare integers in the records, so a split built with
    another vocabulary would be scored as if its ids were the run's, silently."""
    spec = config.tagger.eval_shards
    if not spec:
        return
    if not (isinstance(spec, str) and spec.endswith("-manifest.csv")):
        raise ConfigError(f"tagger.eval_shards={spec!r}: give the evaluation split as the "
                          "builder's PREFIX-manifest.csv, whose PREFIX-labels.csv proves its "
                          "classes are the training split's (a glob or a shard has none)")
    from mwmae.finetune.evaluate import list_split

    list_split(spec)  # a missing manifest or shard is named before anything is written
    eval_csv = spec[: -len("-manifest.csv")] + "-labels.csv"
    train_csv = labels_csv(config)
    if train_csv is None:
        raise ConfigError("tagger.eval_shards needs the training split's labels to check the "
                          "evaluation split's against, and data.train_shards is not a "
                          "PREFIX-manifest.csv: set tagger.labels_csv to its index,label CSV")
    from mwmae.data import storage

    if not storage.exists(train_csv):
        raise ConfigError(f"{train_csv}: missing; tagger.eval_shards is checked against the "
                          "training split's labels CSV: set tagger.labels_csv to it, or rebuild "
                          "data.train_shards with its labels")
    if not storage.exists(eval_csv):
        raise ConfigError(f"{eval_csv}: missing; tagger.eval_shards ({spec}) must prove its "
                          f"classes are the training split's ({train_csv}): rebuild it with its "
                          "labels (tfrecord_tools.build with the training split's --vocabulary)")
    ours, theirs = read_vocabulary(train_csv), read_vocabulary(eval_csv)
    if ours != theirs:
        diff = next(i for i, (a, b) in enumerate(zip(ours + [None] * len(theirs),
                                                     theirs + [None] * len(ours))) if a != b)
        raise ConfigError(f"{eval_csv}: the evaluation split's labels are not the training "
                          f"split's ({train_csv}): index {diff} is "
                          f"{theirs[diff] if diff < len(theirs) else 'missing'!r} there, "
                          f"{ours[diff] if diff < len(ours) else 'missing'!r} here; build both "
                          "with one --vocabulary")
