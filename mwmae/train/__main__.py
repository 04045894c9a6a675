"""python -m mwmae.train --config configs/tiny.py --workdir DIR [--config.key=value ...]

Multi-host: on TPU VMs pass ``--multihost`` (JAX finds the coordinator itself); elsewhere (GPU
hosts, several processes on one machine) give ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` on every process.

``--help`` lists the flags (exit 0). Exit status: 0 done or preempted (SIGTERM; a checkpoint
was saved), 130 after Ctrl-C (saved likewise), 2 for a config or workdir the run refuses (one
line on stderr saying why), 1 for anything else.
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from mwmae.cli import absl_flags_parser
from mwmae.train.refusals import missing_config_file, refusals, unknown_override

# jax, the trainer, the workdir and the config schema are imported in functions: input worker
# processes start by importing this module (Python's "spawn"), and need none of them.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go (local or gs://).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "jax.distributed.initialize() with "
                               "auto-detection (TPU pods, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


# The task this entry point trains: None is pretraining; mwmae.finetune sets the tagger's.
_TASK = None


def main(argv: list[str]) -> None:
    del argv
    from mwmae.train import hosts
    from mwmae.train.loop import train
    from mwmae.train.pretraining import Pretraining

    # Orbax and JAX log every save at INFO; the loop prints what a user needs.
    logging.set_verbosity(logging.WARNING)
    hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                     _MULTIHOST.value)
    try:
        result = train(_TASK or Pretraining, _CONFIG.value, _WORKDIR.value)
    except Exception as e:  # noqa: BLE001 - the traceback, then the error as the last line
        if isinstance(e, refusals()):
            _exit_with(f"error: {e}", 1 if isinstance(e, FloatingPointError) else 2)
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _exit_with(f"error: {type(e).__name__}: {first}", 1)
    if result["status"] == "interrupted":
        sys.exit(130)


def _exit_with(message: str, code: int) -> None:
    """Print the error last and leave at once: train() has already waited for its saves and
    closed its writers, and interpreter shutdown would only let library threads (Grain's
    traceback notes, futures refused after shutdown) print after it."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def run(task: type | None = None, doc: str | None = None) -> None:
    """The command line of ``task`` (a :class:`mwmae.train.task.Task` class; pretraining when
    None); ``doc`` is what ``--help`` prints above the flags (this module's by default)."""
    global _TASK
    _TASK = task
    message = missing_config_file(sys.argv) or unknown_override(
        sys.argv, task.schema() if task is not None else None)
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    app.run(main, flags_parser=absl_flags_parser(doc or __doc__, "workdir"))


if __name__ == "__main__":
    run()
