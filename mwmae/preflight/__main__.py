"""python -m mwmae.preflight --config CFG [--workdir DIR] [--out FILE] [--config.x=y ...]

Run it first on every new TPU VM or GPU host, with the config and workdir the run will use. It
prints one line per check (``ok`` / ``warn`` / ``fail``) and ends with ``preflight verdict:``;
the report goes to ``--out`` (default ``WORKDIR/preflight.json``, or ``preflight.json`` here
without a workdir), and its attention choices steer the trainer's ``attention_impl="auto"``.

Multi-host exactly as the trainer: ``--multihost`` on TPU VMs; ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`` elsewhere. Every process runs it; process 0 reports.

One preflight at a time per workdir: it holds the workdir's writer lease while it runs, so a
second preflight, or one on a workdir a live trainer is writing, is refused (and a trainer
started meanwhile waits for it to finish). Its scratch files are its own and removed after.

``--help`` lists the flags (exit 0). Exit status: 0 for a verdict of ok or warn, 1 for fail, 2
for bad usage or a refusal before anything ran (a missing or unknown flag, a config or workdir
the trainer would refuse, a workdir in use, an ``--out`` inside a workdir's own files), 130
after Ctrl-C (one line, ``interrupted``; its scratch and lease are cleaned up first). Ctrl-C takes
effect when the current check ends (no report is written); a second Ctrl-C stops at once.
"""

import os
import sys
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from mwmae.cli import absl_flags_parser

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (local or gs://): storage is "
                               "timed there and preflight.json written there.")
_OUT = flags.DEFINE_string("out", None, "Where the JSON report goes (default: "
                           "WORKDIR/preflight.json, else ./preflight.json).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "jax.distributed.initialize() with "
                               "auto-detection (TPU pods, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _usage(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _usage(f"unexpected arguments {argv[1:]}; flags only (see --help)")
    if _CONFIG.value is None:
        _usage("missing --config (e.g. --config configs/mwmae_base_200_4x16.py)")
    from mwmae.preflight.run import run
    from mwmae.train import hosts
    from mwmae.train.refusals import refusals

    logging.set_verbosity(logging.WARNING)
    hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                     _MULTIHOST.value)
    try:
        report = run(_CONFIG.value, _WORKDIR.value, _OUT.value)
    except refusals() as e:
        _usage(str(e))
    except OSError as e:  # e.g. an --out folder that cannot be written
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.stdout.flush()
    sys.exit(1 if report["verdict"] == "fail" else 0)


def run_cli() -> None:
    try:
        from mwmae.finetune.config import tag_config
        from mwmae.train.refusals import missing_config_file, unknown_override

        # The widest schema (the tagger's is the trainer's plus tagger.*): the task's own
        # check refuses a tagger key in a pretraining config once the file is read.
        message = missing_config_file(sys.argv) or unknown_override(sys.argv, tag_config())
        if message:
            _usage(message)
        app.run(main, flags_parser=absl_flags_parser(__doc__, "workdir"))
    except KeyboardInterrupt:
        # run() has removed its scratch and let the lease go on the way out; leaving at once
        # keeps library threads stopped mid-work from printing after the one line.
        sys.stdout.flush()
        print("interrupted", file=sys.stderr, flush=True)
        os._exit(130)


if __name__ == "__main__":
    run_cli()
