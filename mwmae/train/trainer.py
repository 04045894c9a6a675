"""The trainer's fixed parts, built once per run: mesh, shardings, optimizer, jitted step, and the
source of batches the config names."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from mwmae import pretrained as pretrained_lib
from mwmae import workdir as workdir_lib
from mwmae.data import PipelineConfig
from mwmae.data.sources import ShardSource, Source, SyntheticSource
from mwmae.data.workers import resolve_num_workers
from mwmae.kernels.plan import Layer, use_plan
from mwmae.model import MaskedAutoencoder
from mwmae.train import attention_plan, init_from, perf, sharding
from mwmae.train import checkpoint as ckpt
from mwmae.train.config import (
    MAY_CHANGE_ON_RESUME,
    check_config,
    default_config,
    model_config_from,
    train_examples,
)
from mwmae.train.images import reconstruction_grid
from mwmae.train.optim import make_optimizer
from mwmae.train.step import TrainState, init_state, make_train_step


def schedule_lengths(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(steps per epoch, total steps) from the config."""
    examples = None if config.steps_per_epoch > 0 else train_examples(config)
    steps_per_epoch = (config.steps_per_epoch if examples is None
                       else examples // config.batch_size)
    if steps_per_epoch <= 0:
        raise ValueError(f"batch_size {config.batch_size} is larger than the "
                         f"{examples} training examples")
    total = (config.num_train_steps if config.num_train_steps > 0
             else steps_per_epoch * config.num_epochs)
    return steps_per_epoch, total


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Fail before compiling when the batch cannot be split as the config asks."""
    axes = sharding.mesh_axes("act_batch")
    shards = math.prod(mesh.shape[a] for a in axes)
    b, k = config.batch_size, config.grad_accum_steps
    if b % shards:
        split = " x ".join(f"{a} {mesh.shape[a]}" for a in axes)
        raise ValueError(f"batch_size {b} is not divisible by the {shards} batch shards of the "
                         f"mesh ({split}); use a multiple of {shards}")
    if k < 1 or b % k or (b // k) % shards:
        raise ValueError(f"grad_accum_steps {k}: each microbatch (batch_size / k) must be a "
                         f"whole multiple of the {shards} batch shards")
    if b % jax.process_count():
        raise ValueError(f"batch_size {b} is not divisible by the {jax.process_count()} hosts")


def make_source(config: ml_collections.ConfigDict, balanced_labels: str | None = None
                ) -> Source:
    """The source of batches ``config.data.source`` names, sized by the config
    (``balanced_labels``: class-balanced sampling by that clip-labels table)."""
    frames, n_mels = config.model.img_size
    if config.data.source == "synthetic":
        return SyntheticSource(config.batch_size, config.seed, frames, n_mels)
    if config.data.source == "shards":
        d = config.data
        return ShardSource(d.train_shards, PipelineConfig(
            global_batch_size=config.batch_size, seed=config.seed, crop_frames=frames,
            n_mels=n_mels, shuffle_buffer=d.shuffle_buffer, cycle_length=d.cycle_length,
            num_workers=resolve_num_workers(d.num_workers), on_error=d.on_error,
            balanced_labels=balanced_labels))
    raise ValueError(f"data.source {config.data.source!r}: expected 'synthetic' or 'shards'")


class Trainer:
    """Everything a run needs, built once: mesh, shardings, jitted step, state, writers.

    The pretraining task. A task of its own (the tagger of :mod:`mwmae.finetune`) overrides the
    methods between the markers below: its config schema, state, step, batches, hooks and
    checkpoint policy; the loop, the workdir's guarantees and the hooks it shares stay these.
    """

    # What a resumed run may set differently (see mwmae.train.config).
    may_change = MAY_CHANGE_ON_RESUME
    # init_from also takes the source's decoder (continued pretraining).
    takes_decoder = True

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 devices: list[jax.Device] | None = None):
        self.check(config)
        self.config = config
        self._pretrained: pretrained_lib.Taken | None = None
        # What the run started from (init_from's source, step and digest), recorded in every
        # checkpoint: set by the first start, carried over from the checkpoint on a resume.
        self.initial_record: dict | None = None
        self.model_config = model_config_from(config)
        self.mesh = sharding.make_mesh(config.mesh, devices)
        check_batch(config, self.mesh)
        self.steps_per_epoch, self.total_steps = schedule_lengths(config)
        self.tx, self.schedule = self.make_optimizer()
        self.workdir = workdir_lib.Workdir(workdir)  # local paths or gs:// alike
        self.attention = self.plan_attention()

        # Shardings come from the logical axis names on the (abstract) boxed state.
        abstract = jax.eval_shape(lambda: self.init_state(jax.random.key(0), boxed=True))
        self.state_sharding = sharding.logical_shardings(abstract, self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh, 4)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        # Initialised outside the mesh context: flax initialises DenseGeneral kernels through a
        # flattened 2-D shape, to which the 4-D logical constraint cannot apply.
        self.init_fn = jax.jit(lambda rng: self.init_state(rng),
                               out_shardings=self.state_sharding)
        batch_shardings = jax.tree.map(lambda s: s.sharding, self.batch_spec())
        self.train_step = jax.jit(self.make_step(), in_shardings=(self.state_sharding,
                                                                  batch_shardings),
                                  out_shardings=(self.state_sharding, replicated),
                                  donate_argnums=0)

    # ---------------------------------------------------------------- what a task overrides

    @staticmethod
    def schema() -> ml_collections.ConfigDict:
        """Every key this task's configs may hold, with its default."""
        return default_config()

    @classmethod
    def check(cls, config: ml_collections.ConfigDict) -> None:
        """Raise ConfigError (one line naming the key) for a config this task cannot run."""
        check_config(config, cls.schema())

    def make_optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
        return make_optimizer(self.config, self.steps_per_epoch, self.total_steps)

    def init_state(self, rng: jax.Array, *, boxed: bool = False) -> TrainState:
        return init_state(self.model_config, self.tx, rng, boxed=boxed)

    def make_step(self):
        """``step(state, batch) -> (state, metrics)``, not yet jitted."""
        return make_train_step(self.model_config, self.tx, self.schedule,
                               mask_seed=self.config.seed + 1,
                               grad_accum_steps=self.config.grad_accum_steps)

    def batch_spec(self) -> Any:
        """The global batch the step takes: shapes, dtypes and shardings."""
        return jax.ShapeDtypeStruct((self.config.batch_size, *self.model_config.input_shape),
                                    np.float32, sharding=self.batch_sharding)

    def global_batch(self, audio: np.ndarray, labels: np.ndarray | None = None) -> Any:
        """This host's rows of a batch -> the global batch the step takes (pretraining uses
        the audio alone)."""
        return jax.make_array_from_process_local_data(self.batch_sharding, audio)

    def make_source(self) -> Source:
        return make_source(self.config)

    def best_metric(self) -> str | None:
        """The evaluation metric whose best checkpoint is kept beside the latest (None: no
        evaluation, only the latest and the every-N-steps ones are kept)."""
        return None

    def make_manager(self, wd: workdir_lib.Workdir) -> Any:
        return ckpt.make_manager(wd, self.config, best_metric=self.best_metric())

    def task_hooks(self, run: Any) -> list[tuple[str, Callable, int, bool]]:
        """(name, hook, every, last) of this task's own periodic work, run before the
        checkpoint hook: for pretraining, the reconstruction images."""
        from mwmae.train.hooks import reconstruction_images  # the hooks know the Trainer

        every = self.config.image_every_steps
        return [("images", reconstruction_images(run), every, every > 0)]

    def flops_per_example(self) -> float:
        return perf.train_flops_per_example(self.model_config)

    def attention_layers(self) -> list[Layer]:
        """The attention calls of one step as a device runs them: the encoder on the kept
        patches, the decoder on all of them."""
        mc = self.model_config
        return attention_plan.model_layers(mc, self.device_batch(),
                                           mc.len_keep + mc.num_extra_tokens)

    # ---------------------------------------------------------------- shared by every task

    def device_batch(self) -> int:
        """Clips per device in one (micro)batch."""
        shards = math.prod(self.mesh.shape[a] for a in sharding.mesh_axes("act_batch"))
        return max(1, self.config.batch_size // self.config.grad_accum_steps // shards)

    def attention_target(self) -> tuple[Any, jax.Device | None]:
        """(the device the step is compiled for, a local device of the mesh to run the
        numerics guard on; None when none is local, as in an AOT compile for a TPU topology)."""
        local = set(jax.local_devices())
        devices = list(self.mesh.devices.flat)
        return devices[0], next((d for d in devices if d in local), None)

    def plan_attention(self) -> attention_plan.AttentionPlan:
        """Each layer's implementation: the preflight's measured choice (workdir, then the
        user's cache) or the default rule, checked by the numerics guard. An explicitly named
        kernel that fails the guard sends the whole model to XLA."""
        mc = self.model_config
        target, run_on = self.attention_target()
        records = attention_plan.read_records([self.workdir.preflight_path,
                                               attention_plan.cache_path()])
        plan = attention_plan.decide(self.attention_layers(), mc.attention_impl, target,
                                     run_on, records, mc.attention_guard)
        if mc.attention_impl != "auto" and any(d.guard is not None and not d.guard.ok
                                               for d in plan.decisions):
            self.model_config = mc.replace(attention_impl="xla")
        return plan

    def mesh_context(self):
        """Rules, mesh and attention plan in scope, so activation constraints in the model
        resolve and ``"auto"`` attention takes what was measured."""
        stack = contextlib.ExitStack()
        stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(use_plan(self.attention.plan))
        return stack

    def initial_state(self):
        """Fresh state; with ``init_from``, its parameters replaced by the pretrained ones
        (the optimizer's moments start at zero either way)."""
        taken = self.pretrained()  # before the initialisation compiles: a bad source fails
        state = self.init_fn(jax.random.key(self.config.seed))
        if taken is None:
            return state
        self.initial_record = taken.record()
        return state.replace(params=init_from.place(state.params, self.state_sharding.params,
                                                    taken.params))

    def pretrained(self) -> pretrained_lib.Taken | None:
        """The ``init_from`` weights this run starts from, read and checked once; None without
        ``init_from``."""
        if not self.config.init_from:
            return None
        if self._pretrained is None:
            step = self.config.init_from_step if self.config.init_from_step >= 0 else None
            self._pretrained = pretrained_lib.take(
                self.config.init_from, step, self.model_config, with_decoder=self.takes_decoder)
        return self._pretrained

    def checkpoint_record(self, step: int) -> dict:
        """What a checkpoint records beyond counters and config: the retention it was promised
        (see :func:`mwmae.train.checkpoint.keep_promise`), the schedule's length and learning
        rate at this step (a resume with another length says how the schedule moves), and
        what the run started from."""
        record = {"keep": ckpt.keep_promise(self.config, self.best_metric()),
                  "total_steps": int(self.total_steps),
                  "learning_rate": float(self.schedule(step))}
        if self.initial_record is not None:
            record["initial"] = self.initial_record
        return record

    def abstract_state(self):
        """Shapes, dtypes and shardings of the state, without allocating it."""
        shapes = jax.eval_shape(lambda: self.init_state(jax.random.key(0)))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_sharding)

    def lower(self, state=None):
        """Lower the step for the state's shapes (abstract by default: no data, no devices)."""
        with self.mesh_context():
            return self.train_step.lower(self.abstract_state() if state is None else state,
                                         self.batch_spec())

    def compile(self, state=None):
        """AOT-compile the step once; the loop calls the executable, so nothing recompiles."""
        return self.lower(state).compile()

    def step(self, state, batch):
        with self.mesh_context():
            return self.train_step(state, batch)

    def reconstructions(self, params, audio: np.ndarray, step: int) -> np.ndarray:
        """Image grid of a few clips, masked with the step's own noise."""
        n = min(self.config.num_images, audio.shape[0])
        rng = jax.random.fold_in(jax.random.key(self.config.seed + 1), step)
        noise = jax.random.uniform(rng, (audio.shape[0], self.model_config.num_patches))[:n]
        x = np.asarray(audio[:n])
        params = jax.device_get(params)
        out = MaskedAutoencoder(self.model_config).apply({"params": params}, x, noise)
        return reconstruction_grid(x, out.pred, out.mask, self.model_config.patch_size)
