"""The engine: what every training task shares, built once per run - mesh, shardings,
optimizer, the jitted (and AOT-compiled) step with gradient accumulation, the attention plan,
the initial state and what checkpoints record. It knows no task: the task it is given
(:class:`mwmae.train.task.Task`) says what is trained and on what."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mwmae import pretrained as pretrained_lib
from mwmae import workdir as workdir_lib
from mwmae.data.global_batch import to_global
from mwmae.kernels.plan import Layer, use_plan
from mwmae.model import ModelConfig
from mwmae.train import attention_plan, init_from, sharding
from mwmae.train import checkpoint as ckpt
from mwmae.train.config import train_examples
from mwmae.train.step import TrainState, init_state, make_step
from mwmae.train.task import Task


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


class Engine:
    """Everything a run of ``task`` needs, built once: mesh, shardings, jitted step, state."""

    def __init__(self, task: Task, workdir: str | os.PathLike,
                 devices: list[jax.Device] | None = None):
        self.task = task
        self.config = config = task.config
        self._pretrained: pretrained_lib.Taken | None = None
        # What the run started from (init_from's source, step and digest), recorded in every
        # checkpoint: set by the first start, carried over from the checkpoint on a resume.
        self.initial_record: dict | None = None
        self.mesh = sharding.make_mesh(config.mesh, devices)
        check_batch(config, self.mesh)
        self.steps_per_epoch, self.total_steps = schedule_lengths(config)
        self.tx, self.schedule = task.optimizer(self.steps_per_epoch, self.total_steps)
        self.workdir = workdir_lib.Workdir(workdir)  # local paths or gs:// alike
        self.attention = self.plan_attention()

        # Shardings come from the logical axis names on the (abstract) boxed state.
        abstract = jax.eval_shape(lambda: self.init_state(jax.random.key(0), boxed=True))
        self.state_sharding = sharding.logical_shardings(abstract, self.mesh)
        # Every array of a batch is split over the batch axes on its first dimension.
        self.batch_shardings = {name: sharding.batch_sharding(self.mesh, len(spec.shape))
                                for name, spec in task.batch_spec().items()}
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        # Initialised outside the mesh context: flax initialises DenseGeneral kernels through a
        # flattened 2-D shape, to which the 4-D logical constraint cannot apply.
        self.init_fn = jax.jit(lambda rng: self.init_state(rng),
                               out_shardings=self.state_sharding)
        step = make_step(task, self.tx, self.schedule, config.grad_accum_steps)
        self.train_step = jax.jit(step, in_shardings=(self.state_sharding, self.batch_shardings),
                                  out_shardings=(self.state_sharding, replicated),
                                  donate_argnums=0)

    @property
    def model_config(self) -> ModelConfig:
        return self.task.model_config

    def init_state(self, rng: jax.Array, *, boxed: bool = False) -> TrainState:
        return init_state(self.task.init_params(rng), self.tx, boxed=boxed)

    def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step takes: shapes, dtypes and shardings."""
        return {name: jax.ShapeDtypeStruct(spec.shape, spec.dtype,
                                           sharding=self.batch_shardings[name])
                for name, spec in self.task.batch_spec().items()}

    def global_batch(self, audio: np.ndarray, ids: np.ndarray | None = None
                     ) -> dict[str, jax.Array]:
        """This host's draw from the source -> the global batch the step takes."""
        return to_global(self.task.local_batch(audio, ids), self.batch_shardings,
                         self.config.batch_size)

    def make_manager(self, wd: workdir_lib.Workdir) -> Any:
        return ckpt.make_manager(wd, self.config, best_metric=self.task.best_metric())

    def attention_layers(self) -> list[Layer]:
        return self.task.attention_layers(self.device_batch())

    def flops_per_example(self) -> float:
        return self.task.flops_per_example()

    def device_batch(self) -> int:
        """Clips per device in one (micro)batch."""
        shards = sharding.batch_shards(self.mesh)
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
        # Only "auto" takes measured choices: a named kernel reads (and warns of) no records.
        records = attention_plan.read_records([self.workdir.preflight_path,
                                               attention_plan.cache_path()]
                                              ) if mc.attention_impl == "auto" else []
        plan = attention_plan.decide(self.attention_layers(), mc.attention_impl, target,
                                     run_on, records, mc.attention_guard)
        if mc.attention_impl != "auto" and any(d.guard is not None and not d.guard.ok
                                               for d in plan.decisions):
            self.task.model_config = mc.replace(attention_impl="xla")
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
                self.config.init_from, step, self.model_config,
                with_decoder=self.task.takes_decoder)
        return self._pretrained

    def checkpoint_record(self, step: int) -> dict:
        """What a checkpoint records beyond counters and config: the retention it was promised
        (see :func:`mwmae.train.checkpoint.keep_promise`), the schedule's length and learning
        rate at this step (a resume with another length says how the schedule moves), and
        what the run started from."""
        record = {"keep": ckpt.keep_promise(self.config, self.task.best_metric()),
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
