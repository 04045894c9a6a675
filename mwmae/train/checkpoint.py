"""Orbax checkpoints of a run: state, input position, counters; policies; preemption.

One checkpoint (``WORKDIR/checkpoints/<step>/``) holds three items:
  * ``state``: the TrainState as sharded arrays (every host writes its own shards, OCDBT);
  * ``data``: the input pipeline's position (JSON), so a resume neither repeats nor skips data;
  * ``meta``: counters (step, examples seen, wall time, skipped steps) and the config (JSON).
The mask RNG is derived from (seed, step), so the step restores it.

Saves are asynchronous: the step after a save blocks only for the device-to-host copy. Orbax
writes each checkpoint under a temporary name and renames it when every host has committed, so
a crash mid-write leaves no directory that looks complete; a finished one damaged later is
skipped on restore, with a warning naming it, in favour of the previous one.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")


class PreemptionWatch:
    """True once SIGTERM (what TPU VMs and GKE send before eviction) has arrived.

    Multi-host runs use JAX's preemption sync point instead: its coordination service catches
    the signal and tells every host the same step at which to save.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._multihost = jax.process_count() > 1
        if not self._multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint at the end of this step")
        self._event.set()

    def reached(self, step: int, manager: ocp.CheckpointManager) -> bool:
        if self._multihost:
            return manager.reached_preemption(step)
        return self._event.is_set()


def make_manager(directory: str | epath.Path, config: ml_collections.ConfigDict
                 ) -> ocp.CheckpointManager:
    c = config.checkpoint
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
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save.AnySavePolicy(policies),
        preservation_policy=keep.AnyPreservationPolicy(keepers),
        enable_async_checkpointing=c.asynchronous, cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(epath.Path(directory), item_names=ITEMS, options=options)


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


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any, data: dict,
                    meta: dict, *, force: bool = False) -> bool:
    """Save (if the policies or ``force`` say so; all hosts call it) and return whether a save
    started. ``data`` is this host's input position; the checkpoint keeps every host's."""
    hosts = gather_host_states(data)
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"hosts": hosts}),
        meta=ocp.args.JsonSave(meta)), force=force)


def host_data_state(data: dict, where: str) -> dict:
    """This host's input position out of a checkpoint's ``data`` item."""
    hosts = data["hosts"]
    if len(hosts) != jax.process_count():
        raise ValueError(f"{where} was written by {len(hosts)} hosts; this run has "
                         f"{jax.process_count()}. The input position is per host, so resume "
                         "with the same number of hosts (the model state alone restores on any "
                         "mesh: see mwmae.train.checkpoint.restore_latest)")
    return hosts[jax.process_index()]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict, dict] | None:
    """(state, data, meta) of the newest checkpoint that restores, onto ``abstract_state``'s
    shardings (any mesh). Damaged checkpoints are reported and skipped; None if there is none."""
    for step in sorted(manager.all_steps(), reverse=True):
        path = manager.directory / str(step)
        try:
            r = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
            log.warning("checkpoint %s is damaged or incomplete, skipping it: %s: %s",
                        path, type(e).__name__, str(e).splitlines()[0][:300])
            continue
        return r.state, host_data_state(r.data, str(path)), r.meta
    return None


def counters(step: int, examples: int, started: float, previous_seconds: float, skipped: int,
             config: ml_collections.ConfigDict) -> dict:
    return {"step": step, "examples_seen": examples, "skipped_steps": skipped,
            "train_seconds": previous_seconds + time.time() - started,
            "config": json.loads(config.to_json_best_effort())}
