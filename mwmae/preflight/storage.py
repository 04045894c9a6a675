"""The ``storage`` check: the workdir's write and read throughput, and a checkpoint of the real
state (its blocking part and its whole time) as the share of wall time the config's checkpoint
cadence will cost."""

from __future__ import annotations

import os
import secrets
import socket
import time
import uuid
from typing import Any

import jax
import numpy as np
from etils import epath

from mwmae.preflight.report import FAIL, OK, WARN, Section
from mwmae.train import checkpoint as ckpt
from mwmae.workdir import Workdir

# Above this share of wall time spent on checkpoints, the cadence costs more than it saves.
COSTLY = 0.05
PROBE_BYTES = 64 * 2**20


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def state_bytes(state: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def run_name() -> str:
    """This preflight's folder under the scratch folder, the same on every host (the checkpoint
    save is collective): process 0's pid and a random part (and its host, on one host), so no
    other preflight's scratch, on this host or another sharing the workdir, is ever this one's."""
    token = np.array([os.getpid(), secrets.randbits(31)], np.int32)
    host = socket.gethostname()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
        host = "job"  # process 0's name is not broadcast; the random part is what matters
    return f"{host}-{int(token[0])}-{int(token[1]):08x}"


def check_storage(trainer: Any, scratch: epath.Path, state: Any,
                  step_seconds: float | None) -> Section:
    """``scratch``: the workdir's folder for preflights (no run uses it). This check writes in
    a folder of its own under it and removes that afterwards (and ``scratch`` itself once
    empty), so preflights that share a workdir never remove each other's files."""
    s = Section("storage")
    s.figures["path"] = str(scratch.parent)
    mine = scratch / run_name()
    host = mine / f"host{jax.process_index()}-{uuid.uuid4().hex[:8]}"
    interrupted = False
    try:
        try:
            host.mkdir(parents=True, exist_ok=True)
            _throughput(s, host, state)
        except Exception as e:  # noqa: BLE001 - a read-only or full workdir is the finding
            s.line(FAIL, f"{scratch.parent}: cannot write and read back: "
                         f"{type(e).__name__}: {e}")
        # The save is collective: every host takes part, whatever its own probe found.
        if state is not None:
            try:
                _checkpoint(s, trainer, mine / "checkpoint", state, step_seconds)
            except Exception as e:  # noqa: BLE001 - as above
                s.line(FAIL, f"{scratch.parent}: a checkpoint cannot be saved there: "
                             f"{type(e).__name__}: {e}")
        else:
            s.line(WARN, "no checkpoint timed: there is no state (the step check failed)")
    except BaseException:
        interrupted = True  # Ctrl-C: the other hosts may never reach the barrier below
        raise
    finally:
        if not interrupted:
            _sync("mwmae-preflight-storage")
        if interrupted or jax.process_index() == 0:
            _remove(mine, scratch)
    return s


def _remove(mine: epath.Path, scratch: epath.Path) -> None:
    try:
        mine.rmtree()
    except Exception:  # noqa: BLE001 - leftovers are harmless, the report matters
        pass
    try:
        # Only when empty: another preflight's folder may be beside this one. (On gs://
        # folders are only names, gone with their last object.)
        if scratch.exists() and not any(scratch.iterdir()):
            scratch.rmdir()
    except Exception:  # noqa: BLE001 - as above
        pass


def _throughput(s: Section, folder: epath.Path, state: Any) -> None:
    size = min(PROBE_BYTES, max(2**20, state_bytes(state) if state is not None else 0))
    blob = np.random.default_rng(0).integers(0, 255, size, np.uint8).tobytes()
    path = folder / "probe.bin"
    t0 = time.perf_counter()
    path.write_bytes(blob)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = path.read_bytes()
    read_s = time.perf_counter() - t0
    if back != blob:
        s.line(FAIL, f"{path}: what was read back differs from what was written")
        return
    mb = size / 1e6
    s.figures.update(probe_bytes=size, write_mb_per_s=mb / write_s, read_mb_per_s=mb / read_s)
    s.line(OK, f"write {mb / write_s:.0f} MB/s, read {mb / read_s:.0f} MB/s "
               f"({size / 2**20:.0f} MiB at {s.figures['path']})")


def _checkpoint(s: Section, trainer: Any, folder: epath.Path, state: Any,
                step_seconds: float | None) -> None:
    c = trainer.config
    wd = Workdir(folder)
    manager = trainer.make_manager(wd)
    timings = []
    try:
        # Two saves: the first also starts Orbax's writer threads and creates the folders; the
        # second is what every later save of the run costs.
        for n in (1, 2):
            t0 = time.perf_counter()
            ckpt.save_checkpoint(wd, manager, n, state, {"preflight": True}, {"step": n},
                                 force=True)
            blocking = time.perf_counter() - t0
            manager.wait_until_finished()
            timings.append((blocking, time.perf_counter() - t0))
    finally:
        manager.close()
    (first, _), (blocking, total) = timings
    s.figures["checkpoint_first_blocking_seconds"] = first
    size = state_bytes(state)
    s.figures.update(checkpoint_bytes=size, checkpoint_blocking_seconds=blocking,
                     checkpoint_total_seconds=total, asynchronous=c.checkpoint.asynchronous)
    text = (f"checkpoint of {size / 2**20:.0f} MiB: {blocking:.2f} s blocking, {total:.2f} s "
            f"in all ({'async' if c.checkpoint.asynchronous else 'sync'})")
    interval = _interval_seconds(c, step_seconds)
    if interval is None:
        periodic = c.checkpoint.every_steps > 0 or c.checkpoint.every_minutes > 0
        s.line(OK, text + ("; no step time to weigh the cadence against" if periodic
                           else "; no periodic saves configured"))
        return
    # The loop waits for the blocking part; a save still writing when the next one is due
    # holds the loop for the rest.
    held = blocking + max(0.0, total - blocking - interval)
    share = held / (interval + held)
    s.figures.update(checkpoint_interval_seconds=interval, checkpoint_wall_share=share)
    text += f"; every {interval:.0f} s of training that costs {share:.1%} of wall time"
    if share > COSTLY:
        advice = "" if c.checkpoint.asynchronous else " or save asynchronously"
        s.line(WARN, text + ": save less often (checkpoint.every_steps / every_minutes)"
               + advice)
    else:
        s.line(OK, text)


def _interval_seconds(c: Any, step_seconds: float | None) -> float | None:
    options = []
    if c.checkpoint.every_steps > 0 and step_seconds is not None:
        options.append(c.checkpoint.every_steps * step_seconds)
    if c.checkpoint.every_minutes > 0:
        options.append(c.checkpoint.every_minutes * 60)
    return min(options) if options else None
