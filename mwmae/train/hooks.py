"""The training loop's periodic work, as hooks with a cadence.

The loop only draws a batch, runs the step and hands a :class:`StepInfo` to :class:`Hooks`;
everything else - metrics, trace, progress, profile, checkpoints, preemption, divergence, the
writer lease, the goodput ledger, and the task's own work (images, evaluations) - is one small
hook, registered by :func:`standard_hooks`. A hook that ends the run raises :class:`Stop` with
the run's status.

Hooks share nothing mutable: what a hook produces for the others it returns (a mapping), and
the hooks after it in the same step read it from ``info.produced`` (the metric logger's
``"metrics"``, an evaluation's ``"evaluation"``, which the checkpoint hook saves with its step).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import periodic_actions

from mwmae.data.sources import Source
from mwmae.lease import Lease, LeaseHeld
from mwmae.train import checkpoint as ckpt
from mwmae.train import metrics as metrics_lib
from mwmae.train import perf
from mwmae.train.engine import Engine
from mwmae.train.goodput import Recorder
from mwmae.workdir import Workdir

Hook = Callable[["StepInfo"], "Mapping[str, Any] | None"]


@dataclasses.dataclass
class StepInfo:
    """What one finished step hands to the hooks."""

    step: int  # steps done, this one included
    state: Any
    metrics: Any  # this step's metrics, still on the device
    audio: np.ndarray  # this host's batch
    ids: np.ndarray  # its clips' ids (labels for shards, global indices for synthetic clips)
    input_wait_s: float  # time the loop waited for this batch
    done: bool  # the run's last step
    # What the hooks that ran before, in this step, returned (read-only).
    produced: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))


class Stop(Exception):  # noqa: N818 - a signal to the loop, not an error
    """Raised by a hook to end the run after this step (the hook saved what it had to)."""

    def __init__(self, status: str):
        super().__init__(status)
        self.status = status
        self.produced: dict[str, Any] = {}  # what the step's earlier hooks produced


@dataclasses.dataclass
class _Entry:
    name: str
    fn: Hook
    every: int
    first: bool
    last: bool


class Hooks:
    """Hooks run in the order they were added, each when its cadence says."""

    def __init__(self, start_step: int):
        self.start_step = start_step
        self._entries: list[_Entry] = []

    def add(self, name: str, fn: Hook, every: int = 1, *, first: bool = False,
            last: bool = False) -> None:
        """Run ``fn`` after every ``every``-th step (never when ``every`` <= 0), and also after
        this process's first step (``first``) and the run's last step (``last``)."""
        self._entries.append(_Entry(name, fn, every, first, last))

    def schedule(self) -> list[tuple[str, int, bool, bool]]:
        """(name, every, first, last) of each hook, in the order they run."""
        return [(e.name, e.every, e.first, e.last) for e in self._entries]

    def __call__(self, info: StepInfo) -> dict[str, Any]:
        """Run the hooks due after ``info.step``; returns what they produced."""
        produced: dict[str, Any] = {}
        info = dataclasses.replace(info, produced=types.MappingProxyType(produced))
        for e in self._entries:
            if ((e.every > 0 and info.step % e.every == 0) or (e.last and info.done)
                    or (e.first and info.step == self.start_step + 1)):
                try:
                    out = e.fn(info)
                except Stop as stop:
                    stop.produced = dict(produced)  # the loop still reports this step's
                    raise
                if out is not None and not isinstance(out, Mapping):
                    raise TypeError(f"hook {e.name!r} returned {type(out).__name__}: a hook "
                                    "returns None or a mapping of what it produces")
                for key in out or {}:
                    if key in produced:
                        raise ValueError(f"hook {e.name!r} produces {key!r}, which an earlier "
                                         "hook of this step produced too")
                produced.update(out or {})
        return produced


@dataclasses.dataclass(frozen=True)
class Run:
    """The parts of one run that hooks use (none of them is changed by a hook)."""

    engine: Engine
    workdir: Workdir
    config: ml_collections.ConfigDict
    writer: Any  # clu MetricWriter
    manager: Any  # orbax CheckpointManager
    source: Source
    watch: ckpt.PreemptionWatch
    print_fn: Callable[[str], None]
    start_step: int
    verified_step: int | None  # the restored checkpoint, verified on restore
    skipped_steps_at_start: int
    started: float  # wall time this process started training
    previous_seconds: float  # training time of earlier processes of this run


def global_sum(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.array([value], np.int64))))


def lease_guard(run: Run, lease: Lease) -> Hook:
    def check(info: StepInfo) -> None:
        if lease.lost:
            raise LeaseHeld(f"{run.workdir.lease_path}: another trainer took over this workdir "
                            "while this one ran (its lease had gone stale); stopping without "
                            "saving")
    return check


def batch_trace(run: Run) -> Hook:
    """Per-host JSON lines of every step's loss and clip ids (``config.trace_batches``): the
    audit trail that shows a resumed run saw exactly the data and numbers of an uninterrupted
    one."""
    path = run.workdir.trace_file(jax.process_index())
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(info: StepInfo) -> None:
        line = json.dumps({"step": info.step, "loss": float(info.metrics["loss"]).hex(),
                           "ids": np.asarray(info.ids).tolist()})
        with path.open("a") as f:
            f.write(line + "\n")
    return write


def clu_action(action: periodic_actions.PeriodicAction) -> Hook:
    """A CLU periodic action (it keeps its own cadence)."""
    def act(info: StepInfo) -> None:
        action(info.step)
    return act


class MetricLogger:
    """Every ``log_every_steps``: the interval's scalars to TensorBoard (tags grouped by
    :data:`mwmae.train.metrics.GROUPS`) and one console line with the ETA."""

    def __init__(self, run: Run, compile_seconds: float, bar: Any = None):
        self.run, self.bar = run, bar
        t, c = run.engine, run.config
        self.flops = t.flops_per_example() * c.batch_size / jax.device_count()
        self.peak = perf.device_peak_flops(dtype=t.model_config.dtype)
        self.compile_seconds = compile_seconds
        self.last_time, self.last_step = time.perf_counter(), run.start_step
        self.interval = metrics_lib.IntervalMetrics()
        self.input_wait = 0.0

    def accumulate(self, info: StepInfo) -> None:
        """Every step: its metrics and the time the loop waited for its batch."""
        self.interval.add(info.metrics)
        self.input_wait += info.input_wait_s

    def __call__(self, info: StepInfo) -> dict[str, Any]:
        run, c = self.run, self.run.config
        metrics = self.interval.flush()
        now = time.perf_counter()
        steps = max(1, info.step - self.last_step)
        dt = (now - self.last_time) / steps
        metrics.update({"steps_per_sec": 1 / dt, "examples_per_sec": c.batch_size / dt,
                        "examples_per_sec_per_device": c.batch_size / dt / jax.device_count(),
                        "mfu": self.flops / dt / self.peak,
                        "input_wait_ms_per_step": 1e3 * self.input_wait / steps,
                        "input_wait_fraction": self.input_wait / steps / dt,
                        # The input iterator's state carries each host's count across a
                        # restore, so this is the whole run's total.
                        "skipped_records": float(global_sum(run.source.skipped_records()))})
        if info.step == run.start_step + 1:
            metrics["compile_seconds"] = self.compile_seconds
        self.last_time, self.last_step, self.input_wait = now, info.step, 0.0
        run.writer.write_scalars(info.step, metrics_lib.tagged(metrics))
        eta = datetime.timedelta(seconds=round((run.engine.total_steps - info.step) * dt))
        run.print_fn(f"step {info.step:5d}/{run.engine.total_steps}  loss {metrics['loss']:.4f}  "
                     f"lr {metrics['learning_rate']:.2e}  grad_norm {metrics['grad_norm']:.3f}  "
                     f"{metrics['examples_per_sec']:.1f} ex/s  "
                     f"input wait {metrics['input_wait_ms_per_step']:.1f} ms/step  ETA {eta}")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                 ex_s=f"{metrics['examples_per_sec']:.0f}")
        return {"metrics": metrics}


def progress_bar(bar: Any) -> Hook:
    def advance(info: StepInfo) -> None:
        bar.update(1)
    return advance


class Checkpointer:
    """Saves when the policies say, at the run's last step, at an evaluated step (with its
    metrics, what the best-checkpoint policy ranks by) and at the step a preemption or Ctrl-C
    was noticed (then ends the run). It owns the list of steps this process saved, which the
    divergence guard reads: a diverged state is never saved."""

    def __init__(self, run: Run):
        self.run = run
        self.saved: list[int] = []

    def divergence(self, info: StepInfo) -> None:
        """With ``nonfinite_policy="stop"``: a dropped (non-finite) update ends the run naming
        the newest checkpoint known good. Reading the counter waits for the step, so this runs
        at log points and before saves, not every step."""
        run, state = self.run, info.state
        if (run.config.nonfinite_policy != "stop"
                or int(state.skipped_steps) <= run.skipped_steps_at_start):
            return
        run.manager.wait_until_finished()
        # Saves of this run were checksummed from the state in memory; the restored one was
        # verified on restore.
        good = max([s for s in self.saved if s in run.manager.all_steps()]
                   + ([run.verified_step] if run.verified_step is not None else []),
                   default=None)
        raise FloatingPointError(
            f"non-finite loss or gradient at step {int(state.last_skipped_step)} (its update "
            f"was dropped; checked at step {info.step}). Last verified checkpoint: "
            f"{run.workdir.checkpoint_path(good) if good is not None else 'none'}. "
            "Set nonfinite_policy='skip' to drop such steps and continue.")

    def save(self, info: StepInfo) -> None:
        run = self.run
        preempted = run.watch.reached(info.step, run.manager)
        evaluation = info.produced.get("evaluation")
        if not (preempted or info.done or evaluation is not None
                or run.manager.should_save(info.step)):
            return
        self.divergence(info)
        c = run.config
        meta = ckpt.counters(info.step, info.step * c.batch_size, run.started,
                             run.previous_seconds, int(info.state.skipped_steps), c,
                             global_sum(run.source.skipped_records()))
        meta.update(run.engine.checkpoint_record(info.step))
        t0 = time.perf_counter()
        if ckpt.save_checkpoint(run.workdir, run.manager, info.step, info.state,
                                run.source.get_state(), meta, force=True, metrics=evaluation):
            self.saved.append(info.step)
            # The time the loop was held (the device-to-host copy when saves are async).
            run.writer.write_scalars(info.step, metrics_lib.tagged(
                {"save_seconds": time.perf_counter() - t0}))
            if preempted or info.done:
                # The run's last save: wait for it to commit here, so the time it holds the
                # process is this hook's (the goodput ledger counts it as checkpointing).
                run.manager.wait_until_finished()
        if preempted:
            status = "interrupted" if run.watch.interrupted else "preempted"
            run.print_fn(f"{status}: saving step {info.step} and stopping")
            raise Stop(status)


def standard_hooks(run: Run, *, lease: Lease | None, compile_seconds: float,
                   bar: Any = None, goodput: Recorder | None = None) -> Hooks:
    """The trainer's hooks, in the order they run after each step; with ``goodput``, the
    checkpoint hook and the task's hooks are timed by it and it flushes at the log cadence."""
    c = run.config
    hooks = Hooks(run.start_step)

    def timed(part: str, hook: Hook) -> Hook:
        return hook if goodput is None else goodput.timed(part, hook)

    if goodput is not None:
        hooks.add("goodput", goodput.count)
    if lease is not None:
        hooks.add("lease", lease_guard(run, lease))
    if c.trace_batches:
        hooks.add("trace", batch_trace(run))
    # ETA to the log; steps/s is the metric logger's (one steps_per_sec on the dashboard).
    hooks.add("progress", clu_action(periodic_actions.ReportProgress(
        num_train_steps=run.engine.total_steps, every_steps=c.log_every_steps)))
    if c.profile_steps > 0 and jax.process_index() == 0:
        hooks.add("profile", clu_action(periodic_actions.Profile(
            num_profile_steps=c.profile_steps, first_profile=run.start_step + 10,
            logdir=str(run.workdir.tensorboard))))
    logger = MetricLogger(run, compile_seconds, bar)
    hooks.add("interval", logger.accumulate)
    checkpointer = Checkpointer(run)
    hooks.add("divergence", checkpointer.divergence, c.log_every_steps, first=True, last=True)
    hooks.add("metrics", logger, c.log_every_steps, first=True, last=True)
    if goodput is not None:
        hooks.add("goodput_log", goodput.at_log_point, c.log_every_steps, first=True)
    if bar is not None:
        hooks.add("progress_bar", progress_bar(bar))
    for name, fn, every, last in run.engine.task.hooks(run):
        hooks.add(name, timed("evaluation", fn), every, last=last)
    hooks.add("checkpoint", timed("checkpoint", checkpointer.save))
    return hooks
