"""Checkpoint policies, preemption and interruption, for the trainer.

What a checkpoint holds, where it lives and how it is verified belong to
:class:`mwmae.workdir.Workdir`; this module decides *when* to save (policies from the config),
keeps every host's input position, and turns SIGTERM / SIGINT into "save at the end of this
step". Saves are asynchronous: the step after a save blocks only for the device-to-host copy.
Orbax writes each checkpoint under a temporary name and renames it when every host has
committed, so a crash mid-write leaves no directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save

from mwmae.workdir import Workdir

log = logging.getLogger(__name__)


class PreemptionWatch:
    """Notes SIGTERM (what TPU VMs and GKE send before eviction) and Ctrl-C (SIGINT): the loop
    saves at the end of the step and stops. A second Ctrl-C exits at once, without saving.

    Multi-host runs use JAX's preemption sync point for SIGTERM instead: its coordination
    service catches the signal and tells every host the same step at which to save. SIGINT
    keeps its default there (one host cannot decide a step for all).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None
        self._multihost = jax.process_count() > 1
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            wanted = [signal.SIGINT] if self._multihost else [signal.SIGTERM, signal.SIGINT]
            for sig in wanted:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._multihost:
            raise KeyboardInterrupt
        if self._event.is_set() and signum == signal.SIGINT:
            sys.stderr.write("\nsecond Ctrl-C: stopping now, without saving\n")
            sys.stderr.flush()
            os._exit(130)
        self.signal = signum
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
        log.warning("%s received: saving a checkpoint at the end of this step "
                    "(Ctrl-C again to stop at once)", name)
        self._event.set()

    @property
    def interrupted(self) -> bool:
        """True when the stop came from Ctrl-C (the process should exit 130)."""
        return self.signal == signal.SIGINT

    def reached(self, step: int, manager: ocp.CheckpointManager) -> bool:
        if self._event.is_set():
            return True
        return self._multihost and manager.reached_preemption(step)

    def restore(self) -> None:
        """Put the previous handlers back (the run is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def keep_promise(config: ml_collections.ConfigDict, best_metric: str | None) -> dict:
    """What this config's retention keeps beyond the latest checkpoints; recorded in every
    checkpoint's meta, so that a later config cannot silently break the promise."""
    return {"keep_every_steps": int(config.checkpoint.keep_every_steps),
            "best_metric": best_metric}


def _recorded_promise(meta: dict) -> dict:
    """A checkpoint's keep promise; for checkpoints written before promises were recorded, read
    from the config it records (a tagger's evaluation holds its main metric alone)."""
    if isinstance(meta.get("keep"), dict):
        return meta["keep"]
    config = meta.get("config") or {}
    every = int((config.get("checkpoint") or {}).get("keep_every_steps", 0) or 0)
    evaluation = meta.get("evaluation")
    best = None
    if (isinstance(evaluation, dict) and len(evaluation) == 1
            and (config.get("tagger") or {}).get("keep_best")):
        best = next(iter(evaluation))
    return {"keep_every_steps": every, "best_metric": best}


def promised_steps(workdir: Workdir, promise: dict) -> dict[int, str]:
    """Checkpoints an earlier config of this run promised to keep and ``promise`` (this
    config's) would not: step -> why it is kept. Every finished checkpoint's meta is read."""
    steps = workdir.steps()
    if not steps:
        return {}
    manager = workdir.manager(read_only=True)
    held: dict[int, str] = {}
    best: dict[str, list[tuple[float, int]]] = {}
    for step in steps:
        try:
            meta = workdir.read_meta(step, manager)
        except Exception:  # noqa: BLE001 - damaged: the restore deals with it
            continue
        earlier = _recorded_promise(meta)
        every = int(earlier.get("keep_every_steps") or 0)
        now = promise["keep_every_steps"]
        if every > 0 and step % every == 0 and not (now > 0 and step % now == 0):
            held[step] = f"checkpoint.keep_every_steps={every}"
        metric = earlier.get("best_metric")
        value = (meta.get("evaluation") or {}).get(metric) if metric else None
        if metric and metric != promise["best_metric"] and isinstance(value, (int, float)) \
                and not math.isnan(value):
            best.setdefault(metric, []).append((float(value), step))
    for metric, scored in best.items():
        # Orbax's BestN keeps the later of equal values: so does this.
        _, step = max(scored)
        held.setdefault(step, f"the best {metric}")
    return held


def make_manager(workdir: Workdir, config: ml_collections.ConfigDict,
                 best_metric: str | None = None) -> ocp.CheckpointManager:
    """The run's manager. With ``best_metric``, the checkpoint saved with the highest value of
    that metric (see :func:`save_checkpoint`'s ``metrics``) is kept beside the latest ones.

    Checkpoints an earlier config of the run promised to keep (its ``keep_every_steps``, its
    best checkpoint) stay kept although this config would not keep them, unless
    ``checkpoint.release_kept`` says to let them go."""
    c = config.checkpoint
    held = promised_steps(workdir, keep_promise(config, best_metric))
    if held:
        listing = ", ".join(f"{s} ({why})" for s, why in sorted(held.items()))
        if c.release_kept:
            log.warning("%s: checkpoint.release_kept: checkpoints an earlier config of this run "
                        "kept are now subject to this config's retention and may be deleted: "
                        "%s", workdir.checkpoints, listing)
            held = {}
        else:
            log.warning("%s: keeping checkpoints an earlier config of this run promised to "
                        "keep, which this config would delete: %s (set "
                        "checkpoint.release_kept=True to let them go)", workdir.checkpoints,
                        listing)
    policies: list[Any] = [save.PreemptionCheckpointingPolicy()]
    if c.every_steps > 0:
        policies.append(save.FixedIntervalPolicy(c.every_steps))
    if c.every_minutes > 0:
        # Decided on the primary host and broadcast, so all hosts save the same steps.
        policies.append(save.ContinuousCheckpointingPolicy(
            minimum_interval_secs=int(c.every_minutes * 60)))
    keepers: list[Any] = [keep.LatestN(c.keep_last)]
    if c.keep_every_steps > 0:
        keepers.append(keep.EveryNSteps(c.keep_every_steps))
    if best_metric:
        keepers.append(keep.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                  keep_checkpoints_without_metrics=False))
    if held:
        keepers.append(keep.CustomSteps(sorted(held)))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save.AnySavePolicy(policies),
        preservation_policy=keep.AnyPreservationPolicy(keepers),
        # best_fn makes Orbax write each save's metrics beside it (and read them back on a
        # restart), which is what BestN ranks by; the keeping itself is the policy's.
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode="max",
        enable_async_checkpointing=c.asynchronous, cleanup_tmp_directories=True, create=True)
    return workdir.manager(options)


def gather_host_states(local: dict) -> list[dict]:
    """Every host's input-pipeline position, on every host (JSON items are written by the
    primary host only, and each host reads different shards)."""
    if jax.process_count() == 1:
        return [local]
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([blob.size], np.int32))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:blob.size] = blob
    every = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(every, sizes.reshape(-1))]


def save_checkpoint(workdir: Workdir, manager: ocp.CheckpointManager, step: int, state: Any,
                    data: dict, meta: dict, *, force: bool = False,
                    metrics: dict | None = None) -> bool:
    """Save (if the policies or ``force`` say so; all hosts call it) and return whether a save
    started. ``data`` is this host's input position; the checkpoint keeps every host's.
    ``metrics``: the step's evaluation, kept with the checkpoint for the best-of policy."""
    if not force and not manager.should_save(step):
        return False
    return workdir.save(manager, step, state, gather_host_states(data), meta, force=True,
                        metrics=metrics)


def host_data_state(data: dict, where: str) -> dict:
    """This host's input position out of a checkpoint's ``data`` item."""
    hosts = data["hosts"]
    if len(hosts) != jax.process_count():
        raise ValueError(f"{where} was written by {len(hosts)} hosts; this run has "
                         f"{jax.process_count()}. The input position is per host, so resume "
                         "with the same number of hosts (the model state alone restores on any "
                         "mesh: see mwmae.workdir.Workdir.restore_latest)")
    return hosts[jax.process_index()]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore_latest(workdir: Workdir, manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict, dict] | None:
    """(state, this host's data position, meta) of the newest verified checkpoint; damaged ones
    are set aside. None if there is none."""
    r = workdir.restore_latest(manager, abstract_state, is_primary=jax.process_index() == 0,
                               sync=lambda: _sync("mwmae-set-aside"))
    if r is None:
        return None
    state, data, meta = r
    return state, host_data_state(data, str(workdir.checkpoint_path(int(state.step)))), meta


def counters(step: int, examples: int, started: float, previous_seconds: float, skipped: int,
             config: ml_collections.ConfigDict, skipped_records: int = 0) -> dict:
    return {"step": step, "examples_seen": examples, "skipped_steps": skipped,
            "skipped_records": skipped_records,
            "train_seconds": previous_seconds + time.time() - started,
            "config": json.loads(config.to_json_best_effort())}
