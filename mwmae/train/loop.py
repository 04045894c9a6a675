"""The training loop: restore, then draw a batch, run the step and call the hooks, until the
last step or a hook stops the run (the periodic work itself is in :mod:`mwmae.train.hooks`)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from mwmae import workdir as workdir_lib
from mwmae.lease import Lease, LeaseHeld
from mwmae.train import checkpoint as ckpt
from mwmae.train import metrics as metrics_lib
from mwmae.train.config import ConfigError
from mwmae.train.engine import Engine
from mwmae.train.goodput import Recorder
from mwmae.train.hooks import Hooks, Run, StepInfo, Stop, standard_hooks
from mwmae.train.task import Task


def take_lease(workdir: workdir_lib.Workdir, config: ml_collections.ConfigDict,
               role: str = "trainer") -> Lease | None:
    """The workdir's writer lease, held by process 0; every process raises LeaseHeld if it is
    taken (the holder named on process 0). ``role`` is what the lease says holds it (a
    trainer, or a preflight timing the workdir)."""
    lease, error = None, ""
    if jax.process_index() == 0:
        lease = Lease(workdir.lease_path, stale_after_s=config.lease_seconds, role=role)
        try:
            lease.acquire()
        except LeaseHeld as e:
            lease, error = None, str(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(lease is not None or error == ""))
        if not ok and not error:
            error = f"{workdir.lease_path}: process 0 found the workdir held by another writer"
    if error:
        raise LeaseHeld(error)
    if lease is not None:
        lease.start_refreshing()
    return lease


def train(task: Callable[[ml_collections.ConfigDict], Task], config: ml_collections.ConfigDict,
          workdir: str | os.PathLike, print_fn: Callable[[str], None] = print
          ) -> dict[str, Any]:
    """Train ``task`` (e.g. :class:`mwmae.train.pretraining.Pretraining`) for the config's
    length, resuming from the newest verified checkpoint. Before anything is written the config
    is checked (once: by the task's constructor) and compared with the workdir's, and the
    writer lease is taken.

    Returns the last logged metrics plus ``status``: "done", "preempted" (SIGTERM or a
    multi-host notice; the current step was saved) or "interrupted" (Ctrl-C; saved likewise).
    """
    began = time.perf_counter()  # the goodput ledger's start-up counts from here
    t, wd, source = go_ahead(task, config, workdir)
    closers: list[Callable[[], None]] = [source.close]
    lease = None
    try:
        lease = take_lease(wd, config)
        run, state, compiled, hooks = _start(t, wd, config, print_fn, lease, source, closers,
                                             began)
        if run is None:
            return {"status": "done"}
        status, logged = "done", {}
        for step in range(run.start_step + 1, t.total_steps + 1):
            wait_start = time.perf_counter()
            audio, ids = run.source.next_local()
            input_wait = time.perf_counter() - wait_start
            state, metrics = compiled(state, t.global_batch(audio, ids))
            try:
                produced = hooks(StepInfo(step, state, metrics, audio, ids, input_wait,
                                          done=step == t.total_steps))
            except Stop as stop:
                status, produced = stop.status, stop.produced
            logged = produced.get("metrics", logged)  # the last line the metric hook logged
            if status != "done":
                break
        run.manager.wait_until_finished()
        latest = run.manager.latest_step()
        if latest is not None:
            run.print_fn(f"checkpoint: {wd.checkpoint_path(latest)}")
        return {**logged, "status": status}
    finally:
        _close(closers, lease)


def go_ahead(task: Callable[[ml_collections.ConfigDict], Task],
             config: ml_collections.ConfigDict, workdir: str | os.PathLike
             ) -> tuple[Engine, workdir_lib.Workdir, Any]:
    """Every check that can refuse the run, made before anything is written to ``workdir``:
    the one place both the trainer and the tagger decide to go ahead (a refused change leaves
    the workdir byte for byte as it was).

    In order: the config's own values (the task's constructor), the workdir's identity against
    this config (:meth:`mwmae.workdir.Workdir.check_resume`), the engine (mesh, batch split,
    schedule), ``init_from`` for a fresh run, the task's own resume checks against what the
    workdir holds (``check_workdir``, where the task has one: the tagger's evaluation split),
    and the training data (missing shards, a damaged header, a manifest that over-counts).
    Returns (the engine, the workdir, the source of batches)."""
    the_task = task(config)
    wd = workdir_lib.Workdir(workdir)
    wd.check_resume(json.loads(config.to_json_best_effort()), the_task.may_change)
    t = Engine(the_task, workdir)
    steps = wd.steps()
    if not steps:
        t.pretrained()  # a bad init_from fails here, before the workdir holds this config
    check_workdir = getattr(the_task, "check_workdir", None)
    if check_workdir is not None:
        # The newest finished checkpoint is where the run resumes (an older one only if that
        # one turns out damaged, and the task's hooks check again then).
        check_workdir(t, wd, steps[-1] if steps else 0)
    try:
        source = the_task.make_source()
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        # The data cannot be read as listed (a shard missing, unreadable or with a damaged
        # first header, a manifest over-counting an ArrayRecord shard, a table that is not
        # these shards'): the message names the file; refused in one line, not a traceback.
        raise ConfigError(f"training data: {e}") from e
    return t, wd, source


def _start(t: Engine, wd: workdir_lib.Workdir, config: ml_collections.ConfigDict,
           print_fn: Callable[[str], None], lease: Lease | None, source: Any,
           closers: list[Callable[[], None]], began: float
           ) -> tuple[Run | None, Any, Any, Hooks | None]:
    """Checkpoint manager, writer, signal watch, progress bar and goodput recorder (each
    registered in ``closers``), the restored or initial state, the compiled step and the hooks;
    (None, ...) when the restored run is already as long as this config asks (nothing is
    written then)."""
    is_main = jax.process_index() == 0
    manager = t.make_manager(wd)
    closers += [manager.close, manager.wait_until_finished]
    restored = ckpt.restore_latest(wd, manager, t.abstract_state())
    if restored is None:
        state, previous_seconds = t.initial_state(), 0.0
        print_fn(f"starting at step 0 (no checkpoint in {wd.checkpoints})"
                 + (f" from the weights of {config.init_from}" if config.init_from else ""))
    else:
        state, data_state, meta = restored
        source.set_state(data_state)
        t.initial_record = meta.get("initial")
        previous_seconds = float(meta.get("train_seconds", 0.0))
        print_fn(f"resumed from step {int(state.step)} in {wd.checkpoints}")
        for line in length_notice(t, meta, int(state.step)):
            print_fn(line)
        if int(state.step) >= t.total_steps:
            return None, None, None, None
    if is_main:
        # The run's whole config beside its checkpoints: export and inspection read it back.
        wd.write_config(config.to_json_best_effort(indent=1))
    writer = metric_writers.create_default_writer(str(wd.tensorboard),
                                                  just_logging=not is_main, asynchronous=True)
    closers.append(writer.close)
    writer.write_hparams(metrics_lib.hparams(config))
    watch = ckpt.PreemptionWatch()
    closers.append(watch.restore)
    if is_main and t.attention.platform != "cpu":
        for line in t.attention.lines():  # which attention each layer runs, and why
            print_fn(line)
    start = int(state.step)
    t0 = time.perf_counter()
    compiled = t.compile(state)
    compile_seconds = time.perf_counter() - t0

    bar = None
    if config.progress_bar and is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.total_steps, initial=start, desc="train", unit="step",
                   dynamic_ncols=True)
        closers.append(bar.close)
        if print_fn is print:
            print_fn = bar.write  # log lines above the bar, not through it
    run = Run(t, wd, config, writer, manager, source, watch, print_fn, start,
              verified_step=start if restored is not None else None,
              skipped_steps_at_start=int(state.skipped_steps), started=time.time(),
              previous_seconds=previous_seconds)
    recorder = Recorder(wd, writer, start, began, compile_seconds, is_main=is_main,
                        lease=lease)
    closers.append(recorder.close)  # first to run: the writer is still open
    hooks = standard_hooks(run, lease=lease, compile_seconds=compile_seconds, bar=bar,
                           goodput=recorder)
    recorder.loop_begins()
    return run, state, compiled, hooks


def length_notice(t: Engine, meta: dict, step: int) -> list[str]:
    """What a resume with another run length does to the run: nothing left to train, or a
    learning-rate schedule recomputed over the new length (and the rate it moves to)."""
    before = meta.get("total_steps")
    if before is None:  # written before checkpoints recorded it: the config's explicit length
        before = (meta.get("config") or {}).get("num_train_steps")
        before = before if isinstance(before, int) and before > 0 else None
    if step >= t.total_steps:
        return [f"step {step} is already at or past this config's {t.total_steps} steps: "
                "nothing to train (the workdir is left as it is; raise num_train_steps or "
                "num_epochs to train on)"]
    if before is None or int(before) == t.total_steps:
        return []
    line = (f"run length {before} -> {t.total_steps} steps: the learning-rate schedule is "
            f"recomputed over {t.total_steps} steps")
    was = meta.get("learning_rate")
    now = float(t.schedule(step))
    if isinstance(was, float):
        line += f"; the rate after step {step} moves from {was:.3g} to {now:.3g}"
    else:
        line += f"; the rate after step {step} is now {now:.3g}"
    return [line]


def _close(closers: list[Callable[[], None]], lease: Lease | None) -> None:
    """Wind down what runs in the background (the progress bar, input workers, async saves,
    the metric writer, the lease refresher) before the error, if any, reaches the user, so
    that it is the last thing printed."""
    for close in reversed(closers):
        try:
            close()
        except Exception as e:  # noqa: BLE001 - the first error is the one to report
            logging.getLogger(__name__).warning("while shutting down: %s: %s",
                                                type(e).__name__, e)
    if lease is not None:
        lease.release()
