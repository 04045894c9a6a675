"""Joining a multi-host job, the one way every multi-host command does it."""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, multihost: bool) -> None:
    """``jax.distributed.initialize`` with an explicit coordinator (GPU hosts, several processes
    on one machine), or with auto-detection (``multihost``: TPU pods, SLURM, Open MPI); nothing
    for a single process."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif multihost:
        jax.distributed.initialize()
