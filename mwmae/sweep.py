"""Sweeps end to end: pretrain -> export -> HEAR evaluation per point, then one table of results.

    # every point on this machine, one after another, then the table:
    python -m mwmae.sweep run --config configs/pretrain.py:mwmae-T-4x16 --workdir runs/sweep \
        --tasks-dir TASKS --sweep model.mask_ratio=0.7 --sweep model.mask_ratio=0.8 \
        [--sweep config=configs/pretrain.py:mae-T-4x16 ...] [--set KEY=VALUE ...] \
        [--evaluate "--seeds 10 --preset hear2021"]
    # one point (what each job of xm_launcher.py --hear_tasks=... runs):
    python -m mwmae.sweep point --config CFG --workdir ROOT/POINT --tasks-dir TASKS \
        [--set KEY=VALUE ...] [--evaluate "..."]
    # the table of whatever points have results so far:
    python -m mwmae.sweep collect ROOT

``--sweep KEY=VALUE`` repeated: the values of one key are an axis, the sweep is the product of
the axes (``config`` as the key sweeps config files or model-family variants). Each point lives
in ``ROOT/<point name>`` (its workdir: checkpoints, ``export/``, ``hear/``), so a rerun resumes
each step of each point: training from its newest checkpoint, the evaluation from its finished
embeddings and seeds. ``ROOT/sweep.md`` and ``ROOT/sweep.json``: per task and point the mean ±
95% interval, and per point the mean score and the overall score over the points
(:mod:`mwmae.hear.compare`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from mwmae import cli
from mwmae.hear import compare

RESULTS = ("hear", "results.json")  # under a point's workdir
SHORT = {"model.decoder_window_sizes": "dw", "model.mask_ratio": "mr", "config": ""}


class SweepError(RuntimeError):
    """A sweep that cannot run or a point that failed; the message names the point and step."""


def parse_setting(text: str, flag: str = "--sweep") -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("config.") if key.strip() != "config" else "config"
    if not sep or not key or not value:
        raise SweepError(f"{flag} {text!r}: expected KEY=VALUE, e.g. model.mask_ratio=0.75")
    return key, value


def grid(settings: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The product of the axes; an axis is the values given for one key, in order."""
    axes: dict[str, list[str]] = {}
    for key, value in settings:
        values = axes.setdefault(key, [])
        if value in values:
            raise SweepError(f"--sweep {key}={value} is given twice")
        values.append(value)
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def format_value(value: object) -> str:
    """A config value as ml_collections reads it from the command line (tuples in parentheses)."""
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(str(v) for v in value) + ")"
    return str(value)


def point_name(point: dict[str, object]) -> str:
    """A folder name for a sweep point, e.g. ``dw2-5-0-0_mr0.75`` or ``mwmae-T-4x16_mr0.7``."""
    parts = []
    for key, value in point.items():
        if key == "config":
            text = str(value).rsplit(":", 1)[-1] if ":" in str(value) else \
                pathlib.Path(str(value)).stem
        elif isinstance(value, (tuple, list)):
            text = "-".join(str(v) for v in value)
        else:
            text = str(value).strip("()[] ").replace(",", "-").replace(" ", "")
        parts.append(SHORT.get(key, key.rsplit(".", 1)[-1]) + text)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(parts))


def point_commands(config: str, workdir: str, tasks_dir: str, *,
                   overrides: Sequence[tuple[str, str]] = (), evaluate_args: Sequence[str] = (),
                   name: str | None = None, python: str = sys.executable) -> list[list[str]]:
    """The three steps of a point: pretrain, export the encoder, evaluate it on HEAR."""
    workdir = workdir.rstrip("/")
    train = [python, "-m", "mwmae.train", "--config", config, "--workdir", workdir]
    train += [f"--config.{k}={v}" for k, v in overrides]
    export = [python, "-m", "mwmae.export", "--workdir", workdir, "--out", f"{workdir}/export"]
    evaluate = [python, "-m", "mwmae.hear.evaluate", "--artifact", f"{workdir}/export",
                "--tasks-dir", tasks_dir, "--out", f"{workdir}/hear",
                "--name", name or pathlib.PurePosixPath(workdir).name, *evaluate_args]
    return [train, export, evaluate]


def check_tasks_dir(tasks_dir: str) -> None:
    """Before hours of pretraining: a local tasks folder must hold HEAR task folders (the
    evaluation checks each task fully when it starts)."""
    if "://" in tasks_dir:
        return
    root = pathlib.Path(tasks_dir)
    if not root.is_dir():
        raise SweepError(f"{tasks_dir}: tasks directory not found")
    if not any((p / "task_metadata.json").is_file() for p in root.iterdir()):
        raise SweepError(f"{tasks_dir}: no HEAR task folders (each holds task_metadata.json); "
                         "make them with hear-preprocess or python -m mwmae.hear.tasks")


def run_point(config: str, workdir: str, tasks_dir: str, *,
              overrides: Sequence[tuple[str, str]] = (), evaluate_args: Sequence[str] = (),
              name: str | None = None, log=print) -> None:
    """Runs the point's steps in order; a failed step stops the point with its exit status."""
    check_tasks_dir(tasks_dir)
    for step, argv in zip(("pretrain", "export", "evaluate"),
                          point_commands(config, workdir, tasks_dir, overrides=overrides,
                                         evaluate_args=evaluate_args, name=name)):
        log(f"sweep point {name or workdir}: {step}: {shlex.join(argv[1:])}")
        rc = subprocess.run(argv).returncode
        if rc != 0:
            raise SweepError(f"{workdir}: {step} failed (exit {rc}); fix it and rerun: finished "
                             "steps are kept")


def collect(root: str | os.PathLike) -> dict[str, Any]:
    """The sweep's table from every point under ``root`` (local or gs://) with evaluation
    results; writes ``root/sweep.md`` and ``root/sweep.json``."""
    from etils import epath

    from mwmae.hear.evaluate import PRESETS

    root = epath.Path(root)  # gs:// too: the points of an XManager sweep
    found = sorted(root.glob("/".join(("*", *RESULTS))), key=str)
    if not found:
        raise SweepError(f"{root}: no point has HEAR results yet "
                         f"(<point>/{'/'.join(RESULTS)}); run the sweep first")
    models = [compare.from_results(json.loads(p.read_text()), str(p), p.parent.parent.name)
              for p in found]
    labels = {t: n for preset in PRESETS.values() for t, n in preset.items()}
    text = compare.matrix(models, labels)
    tasks = compare.common_tasks(models)
    summary = {
        "points": {m.name: {t: {"mean": s.mean, "ci95": s.ci95} for t, s in m.scores.items()}
                   for m in models},
        "tasks": tasks, "overall_score": compare.overall_scores(models, tasks),
        "mean_score": compare.mean_scores(models, tasks),
    }
    (root / "sweep.md").write_text(text)
    (root / "sweep.json").write_text(json.dumps(summary, indent=1))
    return {"text": text, **summary}


def _settings(values: Sequence[str], flag: str) -> list[tuple[str, str]]:
    return [parse_setting(v, flag) for v in values]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.sweep",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command in ("run", "point"):
        s = sub.add_parser(command)
        s.add_argument("--config", required=True, help="pretraining config (FILE[:VARIANT])")
        s.add_argument("--workdir", required=True,
                       help="the sweep's root (run) or the point's workdir (point)")
        s.add_argument("--tasks-dir", dest="tasks_dir", required=True,
                       help="folder of HEAR task folders")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config override for every point (--config.KEY=VALUE)")
        s.add_argument("--evaluate", default="",
                       help='extra mwmae.hear.evaluate flags, e.g. "--seeds 10 --preset hear2021"')
        if command == "run":
            s.add_argument("--sweep", action="append", default=[], metavar="KEY=VALUE",
                           help="a value of a swept key (repeat; config=FILE[:VARIANT] sweeps "
                                "configs)")
    c = sub.add_parser("collect")
    c.add_argument("root", help="the sweep's root workdir")
    a = cli.parse_args(p, argv)
    try:
        if a.command == "collect":
            print(collect(a.root)["text"])
            return 0
        fixed = _settings(a.set, "--set")
        evaluate_args = shlex.split(a.evaluate)
        if a.command == "point":
            run_point(a.config, a.workdir, a.tasks_dir, overrides=fixed,
                      evaluate_args=evaluate_args)
            return 0
        check_tasks_dir(a.tasks_dir)
        points = grid(_settings(a.sweep, "--sweep"))
        names = [point_name(pt) or "run" for pt in points]
        if len(set(names)) != len(names):
            raise SweepError(f"two points share a folder name: {names}")
        for point, name in zip(points, names):
            config = point.get("config", a.config)
            overrides = [*fixed, *((k, v) for k, v in point.items() if k != "config")]
            run_point(config, os.path.join(a.workdir, name), a.tasks_dir,
                      overrides=overrides, evaluate_args=evaluate_args, name=name)
        print(collect(a.workdir)["text"])
    except (SweepError, compare.ComparisonError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
