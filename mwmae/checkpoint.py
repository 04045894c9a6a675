"""Look inside a training workdir's checkpoints.

  python -m mwmae.checkpoint inspect WORKDIR      (local or gs://)

Lists every checkpoint with its step, size, completeness (a crash mid-write leaves a
``<step>.orbax-checkpoint-tmp-*`` directory; restore ignores it) and counters, then the
architecture of the run's config.
"""

from __future__ import annotations

import argparse
import json
import sys

from etils import epath


def _size(path: epath.Path) -> int:
    # A walk by hand: recursive globs are refused on gs:// paths.
    if not path.is_dir():
        return int(path.stat().length)
    return sum(_size(p) for p in path.iterdir())


def _complete(path: epath.Path) -> bool:
    return "tmp" not in path.name and ((path / "commit_success.txt").exists()
                                        or (path / "_CHECKPOINT_METADATA").exists())


def inspect(workdir: str) -> list[dict]:
    root = epath.Path(workdir)
    ckpts = root / "checkpoints"
    if not ckpts.exists():
        raise FileNotFoundError(f"{ckpts}: no checkpoints directory (is {root} a workdir?)")
    rows = []
    for path in sorted(ckpts.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not path.is_dir():
            continue
        row = {"name": path.name, "complete": _complete(path), "bytes": _size(path)}
        meta = path / "meta" / "metadata"
        if row["complete"] and meta.exists():
            m = json.loads(meta.read_text())
            row.update({k: m.get(k) for k in ("step", "examples_seen", "skipped_steps",
                                              "train_seconds")})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.checkpoint")
    sub = p.add_subparsers(dest="verb", required=True)
    sub.add_parser("inspect", help="list checkpoints of a workdir").add_argument("workdir")
    a = p.parse_args(argv)
    try:
        rows = inspect(a.workdir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        status = "complete" if r["complete"] else "incomplete (ignored on restore)"
        extra = ""
        if r.get("step") is not None:
            extra = (f"  step {r['step']}  examples {r['examples_seen']}  "
                     f"skipped {r['skipped_steps']}  {r['train_seconds']:.0f}s trained")
        print(f"{r['name']}  {status}  {r['bytes'] / 2**20:.1f} MiB{extra}")
    cfg = epath.Path(a.workdir) / "config.json"
    if cfg.exists():
        model = json.loads(cfg.read_text()).get("model", {})
        print("model: " + ", ".join(f"{k}={v}" for k, v in model.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
