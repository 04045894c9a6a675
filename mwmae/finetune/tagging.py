"""The tagger as a task of the engine: the same loop, mesh, workdir, checkpoints, preemption,
gradient accumulation and metrics as pretraining, with a classifier's parameters and loss,
labelled batches, a whole-clip evaluation hook and the best evaluated checkpoint kept beside the
latest.

    python -m mwmae.finetune --config configs/tag.py[:VARIANT] --workdir DIR \\
        --config.init_from=ARTIFACT_OR_CHECKPOINT_OR_WORKDIR
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mwmae.data import PipelineConfig, storage
from mwmae.data.sources import Source
from mwmae.finetune import augment
from mwmae.finetune.config import (
    MAIN_METRIC,
    MAY_CHANGE,
    check_tag_config,
    check_vocabularies,
    clip_labels_csv,
    num_classes,
    tag_config,
)
from mwmae.finetune.evaluate import EvalSplit, best_evaluation, evaluate
from mwmae.finetune.model import Classifier, HeadConfig
from mwmae.finetune.optim import tagger_optimizer
from mwmae.finetune.step import SupervisedObjective
from mwmae.kernels.plan import Layer
from mwmae.train import attention_plan, perf, sharding
from mwmae.train import metrics as metrics_lib
from mwmae.train.config import ConfigError, model_config_from
from mwmae.train.optim import decay_mask, learning_rate_schedule
from mwmae.train.sources import make_source
from mwmae.train.task import TaskHook
from mwmae.workdir import Workdir, WorkdirError

# Label slots per clip in a batch: the input pipeline's padded label ids.
MAX_LABELS = PipelineConfig.max_labels


class Tagging:
    """Fine-tuning (or probing) the encoder with a classification head."""

    may_change = MAY_CHANGE
    takes_decoder = False  # init_from takes the encoder; the head starts fresh

    def __init__(self, config: ml_collections.ConfigDict):
        check_tag_config(config)
        self.config = config
        t = config.tagger
        self.num_classes = num_classes(config)
        check_vocabularies(config)
        self.task = t.task
        self.main_metric = MAIN_METRIC[t.task]
        self.head_config = HeadConfig(self.num_classes, t.head, t.dropout, t.drop_path,
                                      t.freeze_encoder, t.pooling)
        self.model_config = model_config_from(config)
        self._eval_split: EvalSplit | None = None

    @staticmethod
    def schema() -> ml_collections.ConfigDict:
        return tag_config()

    def classifier(self, *, for_init: bool = False) -> Classifier:
        # Initialised with the XLA attention, as pretraining's: parameters do not depend on it.
        config = (dataclasses.replace(self.model_config, attention_impl="xla") if for_init
                  else self.model_config)
        return Classifier(config, self.head_config)

    def init_params(self, rng: jax.Array) -> Any:
        x = jnp.zeros((1, *self.model_config.input_shape), jnp.float32)
        return self.classifier(for_init=True).init(rng, x)["params"]

    def optimizer(self, steps_per_epoch: int, total_steps: int
                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        c, o, t = self.config, self.config.optimizer, self.config.tagger
        schedule = learning_rate_schedule(o.base_learning_rate, c.batch_size,
                                          int(o.warmup_epochs * steps_per_epoch), total_steps)
        shapes = jax.eval_shape(lambda: nn.meta.unbox(self.init_params(jax.random.key(0))))
        tx = tagger_optimizer(shapes, self.model_config, schedule,
                              weight_decay=o.weight_decay, layer_decay=t.layer_decay,
                              freeze_encoder=t.freeze_encoder, b1=o.b1, b2=o.b2, eps=o.eps,
                              grad_clip_norm=o.grad_clip_norm,
                              mask=decay_mask if o.decay_exempt_1d else None)
        return tx, schedule

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        b = self.config.batch_size
        return {"audio": jax.ShapeDtypeStruct((b, *self.model_config.input_shape), np.float32),
                "label": jax.ShapeDtypeStruct((b, MAX_LABELS), np.int32)}

    def local_batch(self, audio: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        if ids is None or ids.ndim != 2 or ids.shape[1] != MAX_LABELS:
            raise ValueError("the tagger's batches need their padded label ids "
                             f"(B, {MAX_LABELS}); got {None if ids is None else ids.shape}")
        return {"audio": audio, "label": np.asarray(ids, np.int32)}

    def _objective(self) -> SupervisedObjective:
        t = self.config.tagger
        augmentation = augment.AugmentConfig(
            mixup_alpha=t.mixup_alpha, time_masks=t.time_masks,
            time_mask_frames=t.time_mask_frames, freq_masks=t.freq_masks,
            freq_mask_bins=t.freq_mask_bins)
        return SupervisedObjective(self.classifier(), t.task, self.config.seed + 1,
                                   augmentation, t.label_smoothing)

    def prepare(self, batch: Mapping[str, jax.Array], step: jax.Array
                ) -> tuple[dict[str, jax.Array], jax.Array]:
        return self._objective().prepare(batch, step)

    def loss(self, params: Any, examples: Mapping[str, jax.Array], key: jax.Array
             ) -> jax.Array:
        return self._objective().loss(params, examples, key)

    def make_source(self) -> Source:
        balanced = clip_labels_csv(self.config) if self.config.data.balanced_sampling else None
        return make_source(self.config, balanced_labels=balanced)

    def best_metric(self) -> str | None:
        return self.main_metric if self.config.tagger.keep_best and self.evaluates else None

    def attention_layers(self, device_batch: int) -> list[Layer]:
        """The encoder over every patch: fine-tuning has no masking and no decoder."""
        mc = self.model_config
        return attention_plan.model_layers(mc, device_batch,
                                           mc.num_patches + mc.num_extra_tokens, decoder=False)

    def flops_per_example(self) -> float:
        # Forward and backward of the encoder over every patch (no masking), the head aside.
        return 3 * perf.encoder_flops_per_example(self.model_config)

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

    def hooks(self, run: Any) -> list[TaskHook]:
        if not self.evaluates:
            return []
        split = self.eval_split()  # read once now: a bad split fails before training
        every = self.config.tagger.eval_every_steps
        run.print_fn(f"evaluation: {split.total_clips} clips of {self.config.tagger.eval_shards}"
                     + (f" every {every} steps and" if every else "") + " at the last step")
        return [TaskHook("evaluate", self._evaluation_hook(run, Evaluator(self, run.engine)),
                         every, True)]

    def check_workdir(self, engine: Any, wd: Workdir, start_step: int) -> None:
        """What this run would refuse once started, checked before the workdir is written (see
        :func:`mwmae.train.loop.go_ahead`): an evaluation batch the mesh cannot split, a
        damaged or empty evaluation split, and a resume whose evaluations were made on another
        split or cannot be read."""
        if not self.evaluates:
            return
        check_eval_batch(self, engine)
        self._evaluations(wd, start_step)  # reads the split (its fingerprint) once

    def _evaluations(self, wd: Workdir, start_step: int
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the workdir's evaluations up to ``start_step``, those after it), refused when
        unreadable, lacking the main metric or made on another split than this run's."""
        main, spec = self.main_metric, self.config.tagger.eval_shards
        split = self.eval_split().fingerprint
        path = wd.evaluations_path
        try:
            rows = wd.read_evaluations()
        except WorkdirError as e:
            raise WorkdirError(f"{e}; the run ranks its best checkpoint by this file: repair or "
                               "delete that line (the TensorBoard logs hold every evaluation "
                               "too) and rerun") from e
        earlier = [r for r in rows if r["step"] <= start_step]
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
        return earlier, [r for r in rows if r["step"] > start_step]

    def _evaluation_hook(self, run: Any, evaluator: Evaluator) -> Callable:
        main = self.main_metric
        split = self.eval_split().fingerprint
        path = run.workdir.evaluations_path
        # Checked before anything was written too; again here, against the step the run
        # actually restored (an older one when the newest was set aside as damaged).
        earlier, later = self._evaluations(run.workdir, run.start_step)
        if later:
            # Evaluations of checkpoints that never committed (or of an earlier run in this
            # workdir): this run evaluates those steps afresh.
            run.print_fn(f"{path}: dropping the evaluations after the restored step "
                         f"{run.start_step} (" + ", ".join(f"step {r['step']} {main} {r.get(main)}"
                                                           for r in later) + ")")
            if jax.process_index() == 0:
                storage.write_text(str(path), "".join(json.dumps(r) + "\n" for r in earlier))
        best = best_evaluation(earlier, main)

        def hook(info: Any) -> dict[str, Any]:
            nonlocal best
            t0 = time.perf_counter()
            result = evaluator(info.state.params)
            result["eval_seconds"] = time.perf_counter() - t0
            row = {"step": info.step, **result, "split": split}
            best = best_evaluation([*([best] if best else []), row], main)
            if jax.process_index() == 0:
                run.workdir.append_evaluation(row)
            run.writer.write_scalars(info.step, metrics_lib.tagged(
                {k: v for k, v in result.items() if not _is_nan(v)}))
            run.print_fn(f"eval  {info.step:5d}/{run.engine.total_steps}  {main} "
                         f"{result[main]:.4f}  "
                         + "  ".join(f"{k} {result[k]:.4f}" for k in ("mAUC", "d_prime")
                                     if k in result)
                         + f"  ({result['clips']} clips, {result['eval_seconds']:.1f} s; "
                         + (f"best {best[main]:.4f} at step {best['step']})" if best else
                            "no best yet)"))
            # The checkpoint hook saves this step with it (what the best-checkpoint policy
            # ranks by).
            return {"evaluation": {main: result[main]}}
        return hook


class Evaluator:
    """The held-out split's metrics for given parameters, on the engine's mesh (every host
    calls it; each takes back the logits of its own windows)."""

    def __init__(self, task: Tagging, engine: Any):
        check_eval_batch(task, engine)
        self.task, self.engine = task, engine
        self.window_sharding = engine.batch_shardings["audio"]
        model = task.classifier()
        # Logits stay split over the batch: each host takes back its own rows.
        self._predict = jax.jit(lambda params, x: model.apply({"params": params}, x),
                                in_shardings=(engine.state_sharding.params,
                                              self.window_sharding),
                                out_shardings=sharding.batch_sharding(engine.mesh, 2))

    def predict(self, params: Any, windows: np.ndarray) -> np.ndarray:
        """This host's windows -> their logits (b, classes), as numpy on this host."""
        with self.engine.mesh_context():
            out = self._predict(params, jax.make_array_from_process_local_data(
                self.window_sharding, windows))
        if jax.process_count() == 1:
            return np.asarray(out)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.global_array_to_host_local_array(
            out, self.engine.mesh, out.sharding.spec))

    def __call__(self, params: Any) -> dict[str, float]:
        return evaluate(self.task.eval_split(), lambda x: self.predict(params, x),
                        self.task.task)


def check_eval_batch(task: Tagging, engine: Any) -> None:
    """Refuse an evaluation batch the engine's mesh cannot split: found before the workdir is
    written, rather than at the first evaluation."""
    shards = sharding.batch_shards(engine.mesh)
    size = task.config.tagger.eval_batch_size
    if size % shards:
        raise ConfigError(f"tagger.eval_batch_size={size}: not divisible by the {shards} "
                          f"batch shards of the mesh; use a multiple of {shards}")


def _is_nan(value: float) -> bool:
    return isinstance(value, float) and np.isnan(value)
