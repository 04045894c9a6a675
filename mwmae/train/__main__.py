"""python -m mwmae.train --config configs/tiny.py --workdir DIR [--config.key=value ...]

Multi-host: on TPU VMs pass ``--multihost`` (JAX finds the coordinator itself); elsewhere (GPU
hosts, several processes on one machine) give ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` on every process.
"""

from absl import app, flags, logging
from ml_collections import config_flags

# jax and the trainer are imported in main(): input worker processes start by importing this
# module (Python's "spawn"), and need neither.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go (local or gs://).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "jax.distributed.initialize() with "
                               "auto-detection (TPU pods, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    import jax

    from mwmae.train.loop import train

    # Orbax and JAX log every save at INFO; the loop prints what a user needs.
    logging.set_verbosity(logging.WARNING)
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    elif _MULTIHOST.value:
        jax.distributed.initialize()
    train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
