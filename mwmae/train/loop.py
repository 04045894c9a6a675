"""The training loop: mesh, sharded state, jitted step, metrics, images, checkpoints."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions

from mwmae import workdir as workdir_lib
from mwmae.lease import Lease, LeaseHeld
from mwmae.model import MaskedAutoencoder
from mwmae.train import checkpoint as ckpt
from mwmae.train import perf, sharding
from mwmae.train.config import MAY_CHANGE_ON_RESUME, check_config, model_config_from, train_examples
from mwmae.train.images import reconstruction_grid
from mwmae.train.optim import make_optimizer
from mwmae.train.step import init_state, make_train_step
from mwmae.train.synthetic import synthetic_batch


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
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    b, k = config.batch_size, config.grad_accum_steps
    if b % shards:
        raise ValueError(f"batch_size {b} is not divisible by the {shards} batch shards of the "
                         f"mesh (data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
                         f"use a multiple of {shards}")
    if k < 1 or b % k or (b // k) % shards:
        raise ValueError(f"grad_accum_steps {k}: each microbatch (batch_size / k) must be a "
                         f"whole multiple of the {shards} batch shards")
    if b % jax.process_count():
        raise ValueError(f"batch_size {b} is not divisible by the {jax.process_count()} hosts")


def synthetic_source(config: ml_collections.ConfigDict, start_step: int) -> Iterator[np.ndarray]:
    """This host's slice of each global batch of synthetic clips."""
    n_local = config.batch_size // jax.process_count()
    h, w = config.model.img_size
    step = start_step
    while True:
        full = synthetic_batch(step, config.batch_size, seed=config.seed, frames=h, n_mels=w)
        lo = jax.process_index() * n_local
        yield full[lo:lo + n_local]
        step += 1


class SyntheticSource:
    """Endless synthetic clips; its position is the number of batches drawn."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config, self.position = config, 0
        self._it = synthetic_source(config, 0)

    def next_local(self) -> tuple[np.ndarray, np.ndarray]:
        """(this host's audio, the global indices of its clips)."""
        n_local = self.config.batch_size // jax.process_count()
        first = self.position * self.config.batch_size + jax.process_index() * n_local
        self.position += 1
        return next(self._it), np.arange(first, first + n_local)

    def get_state(self) -> dict:
        return {"position": self.position}

    def skipped_records(self) -> int:
        return 0

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
        self._it = synthetic_source(self.config, self.position)

    def close(self) -> None:
        """Nothing to release (the shard source stops its worker processes here)."""


class ShardSource:
    """Log-mel shards through mwmae.data; its position restores exactly (see mwmae.data)."""

    def __init__(self, config: ml_collections.ConfigDict):
        from mwmae.data import PipelineConfig, make_input_iterator
        from mwmae.data.workers import resolve_num_workers

        d = config.data
        if not d.train_shards:
            raise ValueError("data.source is 'shards' but data.train_shards is empty; give a "
                             "manifest CSV, a glob or a path of shards (local or gs://)")
        self._it = make_input_iterator(
            d.train_shards, PipelineConfig(
                global_batch_size=config.batch_size, seed=config.seed,
                crop_frames=config.model.img_size[0], n_mels=config.model.img_size[1],
                shuffle_buffer=d.shuffle_buffer, cycle_length=d.cycle_length,
                num_workers=resolve_num_workers(d.num_workers),
                on_error=d.on_error), as_numpy=True)

    def next_local(self) -> tuple[np.ndarray, np.ndarray]:
        """(this host's audio, its clips' labels: -1 padded ids)."""
        batch = next(self._it)
        return batch["audio"], batch["label"]

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)

    def skipped_records(self) -> int:
        """Records lost on this host under ``data.on_error="skip"``, summed over its workers.
        The count lives in the iterator state, so after a restore it includes the records the
        run skipped before its checkpoint."""
        return self._it.errors.skipped_records

    def close(self) -> None:
        self._it.close()


def make_source(config: ml_collections.ConfigDict) -> SyntheticSource | ShardSource:
    if config.data.source == "synthetic":
        return SyntheticSource(config)
    if config.data.source == "shards":
        return ShardSource(config)
    raise ValueError(f"data.source {config.data.source!r}: expected 'synthetic' or 'shards'")


class Trainer:
    """Everything a run needs, built once: mesh, shardings, jitted step, state, writers."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 devices: list[jax.Device] | None = None):
        check_config(config)
        self.config = config
        self.model_config = model_config_from(config)
        self.mesh = sharding.make_mesh(config.mesh, devices)
        check_batch(config, self.mesh)
        self.steps_per_epoch, self.total_steps = schedule_lengths(config)
        self.tx, self.schedule = make_optimizer(config, self.steps_per_epoch, self.total_steps)
        self.workdir = workdir_lib.Workdir(workdir)  # local paths or gs:// alike

        # Shardings come from the logical axis names on the (abstract) boxed state.
        abstract = jax.eval_shape(lambda: init_state(self.model_config, self.tx,
                                                     jax.random.key(0), boxed=True))
        self.state_sharding = sharding.logical_shardings(abstract, self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh, 4)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        # Initialised outside the mesh context: flax initialises DenseGeneral kernels through a
        # flattened 2-D shape, to which the 4-D logical constraint cannot apply.
        self.init_fn = jax.jit(lambda rng: init_state(self.model_config, self.tx, rng),
                               out_shardings=self.state_sharding)
        step_fn = make_train_step(self.model_config, self.tx, self.schedule,
                                  mask_seed=config.seed + 1,
                                  grad_accum_steps=config.grad_accum_steps)
        self.train_step = jax.jit(step_fn, in_shardings=(self.state_sharding,
                                                         self.batch_sharding),
                                  out_shardings=(self.state_sharding, replicated),
                                  donate_argnums=0)

    def mesh_context(self):
        """Rules + mesh in scope, so activation constraints in the model resolve."""
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(nn.logical_axis_rules(sharding.LOGICAL_RULES))
        stack.enter_context(jax.set_mesh(self.mesh))
        return stack

    def initial_state(self):
        return self.init_fn(jax.random.key(self.config.seed))

    def global_batch(self, local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.batch_sharding, local)

    def abstract_state(self):
        """Shapes, dtypes and shardings of the state, without allocating it."""
        shapes = jax.eval_shape(lambda: init_state(self.model_config, self.tx, jax.random.key(0)))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_sharding)

    def lower(self, state=None):
        """Lower the step for the state's shapes (abstract by default: no data, no devices)."""
        batch = jax.ShapeDtypeStruct((self.config.batch_size, *self.model_config.input_shape),
                                     np.float32, sharding=self.batch_sharding)
        with self.mesh_context():
            return self.train_step.lower(self.abstract_state() if state is None else state, batch)

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


class _Trace:
    """Per-host JSON lines of every step's loss and clip ids (config.trace_batches): the audit
    trail that shows a resumed run saw exactly the data and numbers of an uninterrupted one."""

    def __init__(self, workdir: workdir_lib.Workdir, enabled: bool):
        self.path = workdir.trace_file(jax.process_index()) if enabled else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, loss: Any, ids: np.ndarray) -> None:
        if self.path:
            line = json.dumps({"step": step, "loss": float(loss).hex(),
                               "ids": np.asarray(ids).tolist()})
            with self.path.open("a") as f:
                f.write(line + "\n")


def _global_sum(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.array([value], np.int64))))


def take_lease(workdir: workdir_lib.Workdir, config: ml_collections.ConfigDict) -> Lease | None:
    """The workdir's writer lease, held by process 0; every process raises LeaseHeld if it is
    taken (the holder named on process 0)."""
    lease, error = None, ""
    if jax.process_index() == 0:
        lease = Lease(workdir.lease_path, stale_after_s=config.lease_seconds)
        try:
            lease.acquire()
        except LeaseHeld as e:
            lease, error = None, str(e)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(lease is not None or error == ""))
        if not ok and not error:
            error = f"{workdir.lease_path}: process 0 found the workdir held by another trainer"
    if error:
        raise LeaseHeld(error)
    if lease is not None:
        lease.start_refreshing()
    return lease


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Pretrain until ``num_train_steps``, resuming from the newest verified checkpoint.

    Before anything is written the config is validated and compared with the workdir's
    (:data:`MAY_CHANGE_ON_RESUME`), and the workdir's writer lease is taken.

    Returns the last logged metrics plus ``status``: "done", "preempted" (SIGTERM or a
    multi-host preemption notice; a checkpoint of the current step was committed) or
    "interrupted" (Ctrl-C; saved likewise).
    """
    check_config(config)
    wd = workdir_lib.Workdir(workdir)
    wd.check_resume(json.loads(config.to_json_best_effort()), MAY_CHANGE_ON_RESUME)
    t = Trainer(config, workdir)
    lease = take_lease(wd, config)
    closers: list[Callable[[], None]] = []
    try:
        return _run(t, wd, config, print_fn, lease, closers)
    finally:
        # Wind down what runs in the background (async saves, the metric writer, reader
        # threads, the lease refresher) before the error, if any, reaches the user, so that it
        # is the last thing printed.
        for close in reversed(closers):
            try:
                close()
            except Exception as e:  # noqa: BLE001 - the first error is the one to report
                logging.getLogger(__name__).warning("while shutting down: %s: %s",
                                                    type(e).__name__, e)
        if lease is not None:
            lease.release()


def _run(t: Trainer, wd: workdir_lib.Workdir, config: ml_collections.ConfigDict,
         print_fn: Callable[[str], None], lease: Lease | None,
         closers: list[Callable[[], None]]) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    if is_main:
        # The run's whole config beside its checkpoints: export and inspection read it back.
        wd.write_config(config.to_json_best_effort(indent=1))
    writer = metric_writers.create_default_writer(str(wd.tensorboard),
                                                  just_logging=not is_main, asynchronous=True)
    closers.append(writer.close)
    manager = ckpt.make_manager(wd, config)
    closers.append(manager.close)
    closers.append(manager.wait_until_finished)
    watch = ckpt.PreemptionWatch()
    closers.append(watch.restore)
    trace = _Trace(wd, config.trace_batches)

    source = make_source(config)
    closers.append(source.close)
    restored = ckpt.restore_latest(wd, manager, t.abstract_state())
    previous_seconds = 0.0
    if restored is None:
        state = t.initial_state()
    else:
        state, data_state, meta = restored
        source.set_state(data_state)
        previous_seconds = float(meta.get("train_seconds", 0.0))
        print_fn(f"resumed from step {int(state.step)} in {wd.checkpoints}")
    start = int(state.step)
    verified = start if restored is not None else None  # the newest checkpoint known good
    skipped_at_start = int(state.skipped_steps)
    started = time.time()

    t0 = time.perf_counter()
    compiled = t.compile(state)
    compile_s = time.perf_counter() - t0
    n_dev = jax.device_count()
    flops = perf.train_flops_per_example(t.model_config) * config.batch_size / n_dev
    peak = perf.device_peak_flops(dtype=t.model_config.dtype)
    hooks = [periodic_actions.ReportProgress(num_train_steps=t.total_steps, writer=writer,
                                             every_steps=config.log_every_steps)]
    if config.profile_steps > 0 and is_main:
        hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                              first_profile=start + 10,
                                              logdir=str(wd.tensorboard)))

    def skipped_records() -> int:
        # The run's total: the input iterator's state carries each host's count across a
        # restore (so a resumed run does not add the checkpoint's metadata figure again).
        return _global_sum(source.skipped_records())

    saved: list[int] = []

    def save(step: int) -> None:
        meta = ckpt.counters(step, step * config.batch_size, started, previous_seconds,
                             int(state.skipped_steps), config, skipped_records())
        if ckpt.save_checkpoint(wd, manager, step, state, source.get_state(), meta,
                                force=True):
            saved.append(step)

    def check_finite(step: int) -> None:
        if config.nonfinite_policy == "stop" and int(state.skipped_steps) > skipped_at_start:
            manager.wait_until_finished()
            # Saves of this run were checksummed from the state in memory; the restored one
            # was verified on restore.
            good = max([s for s in saved if s in manager.all_steps()]
                       + ([verified] if verified is not None else []), default=None)
            raise FloatingPointError(
                f"non-finite loss or gradient at step {int(state.last_skipped_step)} (its update "
                f"was dropped; checked at step {step}). Last verified checkpoint: "
                f"{wd.checkpoint_path(good) if good is not None else 'none'}. "
                "Set nonfinite_policy='skip' to drop such steps and continue.")

    bar = None
    if config.progress_bar and is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.total_steps, initial=start, desc="train", unit="step",
                   dynamic_ncols=True)
        closers.append(bar.close)
        if print_fn is print:
            print_fn = bar.write  # log lines above the bar, not through it
    metrics: dict[str, Any] = {}
    status = "done"
    last_t, last_step = time.perf_counter(), start
    input_wait = 0.0  # seconds the step loop waited for input since the last log line
    for step in range(start, t.total_steps):
        if lease is not None and lease.lost:
            raise LeaseHeld(f"{wd.lease_path}: another trainer took over this workdir while "
                            "this one ran (its lease had gone stale); stopping without saving")
        wait_start = time.perf_counter()
        audio, ids = source.next_local()
        input_wait += time.perf_counter() - wait_start
        state, m = compiled(state, t.global_batch(audio))
        done = step + 1 == t.total_steps
        if config.trace_batches:
            trace.write(step + 1, m["loss"], ids)
        for h in hooks:
            h(step + 1)
        if (step + 1) % config.log_every_steps == 0 or done or step == start:
            metrics = {k: float(v) for k, v in jax.device_get(m).items()}
            check_finite(step + 1)
            now = time.perf_counter()
            steps = max(1, step + 1 - last_step)
            dt = (now - last_t) / steps
            last_t, last_step = now, step + 1
            metrics.update({"steps_per_sec": 1 / dt, "examples_per_sec": config.batch_size / dt,
                            "examples_per_sec_per_device": config.batch_size / dt / n_dev,
                            "mfu": flops / dt / peak,
                            "input_wait_ms_per_step": 1e3 * input_wait / steps,
                            "input_wait_fraction": input_wait / steps / dt,
                            "skipped_records": float(skipped_records())})
            input_wait = 0.0
            if step == start:
                metrics["compile_seconds"] = compile_s
            writer.write_scalars(step + 1, metrics)
            print_fn(f"step {step + 1:5d}/{t.total_steps}  loss {metrics['loss']:.4f}  "
                     f"lr {metrics['learning_rate']:.2e}  grad_norm {metrics['grad_norm']:.3f}  "
                     f"{metrics['examples_per_sec']:.1f} ex/s  "
                     f"input wait {metrics['input_wait_ms_per_step']:.1f} ms/step")
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                ex_s=f"{metrics['examples_per_sec']:.0f}")
        if bar is not None:
            bar.update(1)
        if config.image_every_steps > 0 and ((step + 1) % config.image_every_steps == 0 or done):
            writer.write_images(step + 1, {"reconstruction": t.reconstructions(
                state.params, audio, step)})
        preempted = watch.reached(step + 1, manager)
        if preempted or done or manager.should_save(step + 1):
            check_finite(step + 1)
            save(step + 1)
        if preempted:
            status = "interrupted" if watch.interrupted else "preempted"
            print_fn(f"{'interrupted' if watch.interrupted else 'preempted'}: saving step "
                     f"{step + 1} and stopping")
            break
    if bar is not None:
        bar.close()
    source.close()
    manager.wait_until_finished()
    writer.flush()
    latest = manager.latest_step()
    if latest is not None:
        print_fn(f"checkpoint: {wd.checkpoint_path(latest)}")
    return {**metrics, "status": status}
