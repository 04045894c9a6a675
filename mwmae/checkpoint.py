"""Look inside a training workdir's checkpoints.

  python -m mwmae.checkpoint inspect WORKDIR      (local or gs://)

Lists every checkpoint with its step, size and state: ``complete`` (finished; restore and
export may use it), ``incomplete`` (a crash mid-write; restore ignores it) or ``damaged`` (it
failed verification and was set aside; never used), with its counters, then the architecture
of the run's config, the run's goodput over its restarts (see :mod:`mwmae.goodput`) and who
holds the workdir's writer lease.
"""

from __future__ import annotations

import argparse
import sys

from mwmae import cli, goodput
from mwmae.lease import Lease
from mwmae.workdir import CheckpointInfo, Workdir, WorkdirError

_STATUS = {"complete": "complete", "incomplete": "incomplete (ignored on restore)",
           "damaged": "damaged (set aside, never restored)"}
_LEASE_STATE = {"live": "live",
                "stale": "stale: the next run takes it over",
                "dead": "dead: its process is gone on this host; the next run takes it over"}


def inspect(workdir: str) -> list[CheckpointInfo]:
    return Workdir(workdir).inspect()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.checkpoint")
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("inspect", help="list checkpoints of a workdir").add_argument("workdir")
    a = cli.parse_args(p, argv)
    wd = Workdir(a.workdir)
    try:
        rows = wd.inspect()
        config = wd.read_config()
    except (FileNotFoundError, WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        extra = ""
        m = r.meta or {}
        if m.get("step") is not None:
            extra = (f"  step {m['step']}  examples {m.get('examples_seen')}  "
                     f"skipped {m.get('skipped_steps')}  {m.get('train_seconds', 0):.0f}s trained"
                     f"{'  checksummed' if m.get('checksums') else ''}")
        elif m.get("error"):
            extra = f"  {m['error'][:200]}"
        print(f"{r.name}  {_STATUS[r.status]}  {r.bytes / 2**20:.1f} MiB{extra}")
    if config is not None:
        model = config.get("model", {})
        print("model: " + ", ".join(f"{k}={v}" for k, v in model.items()))
    lines, skipped = goodput.read(wd.goodput_path)
    if lines or skipped:
        print(goodput.describe(goodput.summarise(lines, skipped)))
    holder = Lease(wd.lease_path).holder()
    if holder is not None:
        print(f"writer lease ({_LEASE_STATE[holder.state()]}): {holder.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
