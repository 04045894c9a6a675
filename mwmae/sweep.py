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
(:mod:`mwmae.hear.compare`); ``run`` tables its own points, ``collect`` every point under ROOT.

A point is reused only for the settings it was trained with (``ROOT/<point>/sweep-point.json``:
the config and every ``--set``/``--sweep`` value but those of ``RECIPE_FREE``, such as logging
and checkpoint cadence): a rerun that asks for other ones (another config, more steps, other
data) is refused before any point runs, naming the point and the settings. ``--evaluate`` may
change (the evaluation redoes what its options change). Every key and value is checked against
the config, and every point's folder name, before anything is written; a ``--set`` of the
config's own value is no change. A point runs under a lock, so two sweeps
never run one point at once, and ``--workdir`` may not overlap ``--tasks-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from mwmae import cli
from mwmae.hear import compare

RESULTS = ("hear", "results.json")  # under a point's workdir
SHORT = {"model.decoder_window_sizes": "dw", "model.mask_ratio": "mr", "config": ""}
RECIPE = "sweep-point.json"  # under a point's workdir: the settings it was trained with
LOCK = ".sweep-lock"         # under a point's workdir: held while a sweep runs its steps
# Keys that change how a point is trained or watched, not what it learns: a rerun may set
# them differently and still reuse the point.
RECIPE_FREE = ("log_every_steps", "progress_bar", "image_every_steps", "num_images",
               "profile_steps", "trace_batches", "lease_seconds", "checkpoint.*", "mesh.*",
               "model.attention_impl", "model.attention_guard", "model.scan_unroll")


class SweepError(RuntimeError):
    """A sweep that cannot run or a point that failed; the message names the point and step."""


_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_setting(text: str, flag: str = "--sweep") -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("config.") if key.strip() != "config" else "config"
    if not sep or not key or not value:
        raise SweepError(f"{flag} {text!r}: expected KEY=VALUE, e.g. model.mask_ratio=0.75")
    # A key part that is empty or not a name ("model." or "a..b") is no config key, and its
    # value would name the point's folder.
    if not all(_KEY_PART.fullmatch(part) for part in key.split(".")):
        raise SweepError(f"{flag} {text!r}: {key!r} is not a config key (dot-separated names, "
                         "e.g. model.mask_ratio)")
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


def check_point_name(name: str, point: dict[str, object]) -> None:
    """A point's folder lies inside the sweep's root: never the root itself, its parent or a
    path of several parts."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        given = " ".join(f"{k}={v}" for k, v in point.items())
        raise SweepError(f"--sweep {given}: makes the point folder name {name!r}, which is not "
                         "a folder inside --workdir; give values that name a folder")


def load_config(spec: str) -> Any:
    """The training config ``FILE[:VARIANT]`` names, as the trainer loads it; a SweepError
    naming the file when it is missing or does not load."""
    import importlib.util

    path, _, variant = spec.partition(":")
    if "://" in path or not os.path.isfile(path):
        raise SweepError(f"--config {spec}: no such config file ({os.path.abspath(path)})")
    try:
        module_spec = importlib.util.spec_from_file_location("sweep_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(variant) if variant else module.get_config()
    except Exception as e:  # noqa: BLE001 - any failure: the file is not a config
        raise SweepError(f"--config {spec}: does not load ({type(e).__name__}: {e})") from e


def _parsed(value: str) -> Any:
    """A command-line value as a Python value (numbers, booleans, tuples), else the string."""
    import ast

    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    return tuple(parsed) if isinstance(parsed, list) else parsed


def _config_value(config: Any, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def check_settings(config: Any, spec: str, overrides: Sequence[tuple[str, str]]) -> None:
    """Refuse, before anything is written, an override whose key the config lacks or whose
    value the trainer would refuse (one line naming the key)."""
    from mwmae.train.config import ConfigError, check_config, unknown_key_message

    trial = config.copy_and_resolve_references()
    for key, value in overrides:
        try:
            old = _config_value(trial, key)
        except (KeyError, AttributeError, TypeError):
            raise SweepError(f"--config {spec}: {unknown_key_message(key, config)}") from None
        new = _parsed(value)
        if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
            new = float(new)
        parent, _, leaf = key.rpartition(".")
        try:
            (_config_value(trial, parent) if parent else trial)[leaf] = new
        except (TypeError, ValueError) as e:
            if isinstance(old, str):
                continue  # a string field takes the text as given (the trainer checks it)
            raise SweepError(f"{key}={value}: not a value of {key} "
                             f"({type(old).__name__} in {spec})") from e
    try:
        check_config(trial)
    except ConfigError as e:
        raise SweepError(f"--config {spec} with {', '.join(f'{k}={v}' for k, v in overrides)}: "
                         f"{e}") from e


def effective(config: Any, overrides: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The overrides that change the config: one equal to the config's own value is not a
    change (``--set seed=0`` over a seed of 0), so it is no part of the point's recipe."""
    kept = []
    for key, value in overrides:
        try:
            same = _same(_parsed(value), _config_value(config, key))
        except (KeyError, AttributeError, TypeError):
            same = False
        if not same:
            kept.append((key, value))
    return kept


def point_commands(config: str, workdir: str, tasks_dir: str, *,
                   overrides: Sequence[tuple[str, str]] = (), evaluate_args: Sequence[str] = (),
                   name: str | None = None, python: str = sys.executable) -> list[list[str]]:
    """The three steps of a point: pretrain, export the encoder, evaluate it on HEAR."""
    workdir = workdir.rstrip("/")
    train = [python, "-m", "mwmae.train", "--config", config, "--workdir", workdir]
    train += [f"--config.{k}={v}" for k, v in overrides]
    # A point resumed after more training replaces its export and evaluation (the point's
    # settings are pinned by sweep-point.json, so what is replaced is this point's own output).
    export = [python, "-m", "mwmae.export", "--workdir", workdir, "--out", f"{workdir}/export",
              "--overwrite"]
    evaluate = [python, "-m", "mwmae.hear.evaluate", "--artifact", f"{workdir}/export",
                "--tasks-dir", tasks_dir, "--out", f"{workdir}/hear",
                "--name", name or pathlib.PurePosixPath(workdir).name, "--overwrite",
                *evaluate_args]
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


def check_apart(workdir: str, tasks_dir: str) -> None:
    """The sweep's outputs never go among its inputs (nor the inputs among its points)."""
    if "://" in workdir or "://" in tasks_dir:
        return
    a, b = pathlib.Path(workdir).resolve(), pathlib.Path(tasks_dir).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise SweepError(f"--workdir {workdir} and --tasks-dir {tasks_dir} overlap: the sweep "
                         "would write among its inputs; give them folders apart")


def recipe(config: str, overrides: Sequence[tuple[str, str]]) -> dict[str, str]:
    """What a point is trained with: the config and its overrides (the last of a key wins),
    the keys of RECIPE_FREE left out."""
    settings = {"config": config}
    for key, value in overrides:
        if not any(key == k or (k.endswith(".*") and key.startswith(k[:-1]))
                   for k in RECIPE_FREE):
            settings[key] = value
    return settings


def check_recipe(workdir: str, config: str, overrides: Sequence[tuple[str, str]],
                 loaded: Any = None) -> None:
    """Refuse to reuse a point that an earlier sweep trained with other settings: its
    checkpoints, export and results would stand in this sweep's table for settings they were
    not made with (the trainer lets a resumed run change its length and data, so it would not
    say so itself)."""
    from etils import epath

    path = epath.Path(workdir) / RECIPE
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text())
        if not isinstance(earlier, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise SweepError(f"{path}: damaged ({e}); it records the settings this point was "
                         "trained with: restore it, or use a new --workdir") from e
    now = recipe(config, overrides)
    if loaded is not None and earlier.get("config") == config:
        # An earlier --set of the config's own value was no change either.
        earlier = {"config": config, **dict(effective(loaded, [
            (k, str(v)) for k, v in earlier.items() if k != "config"]))}
    diffs = [f"{k}={earlier.get(k, 'unset')} there, {now.get(k, 'unset')} now"
             for k in sorted(set(earlier) | set(now), key=lambda k: (k != "config", k))
             if earlier.get(k) != now.get(k)]
    if diffs:
        raise SweepError(f"{workdir}: trained by an earlier sweep with other settings "
                         f"({'; '.join(diffs)}); its results would not be this sweep's: use a new "
                         f"--workdir for these settings, or rerun with the earlier ones ({path})")


@contextlib.contextmanager
def point_lock(workdir: str) -> Iterator[None]:
    """Held while this process runs the point's steps: a second sweep on the same point would
    export over the artifact the first one is evaluating. Released when the process ends,
    however it ends."""
    if "://" in workdir:
        yield  # jobs on a bucket are one per point (the launcher's)
        return
    import fcntl

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, LOCK), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise SweepError(f"{workdir}: another sweep is running this point now; wait for "
                             "it") from e
        yield


def run_point(config: str, workdir: str, tasks_dir: str, *,
              overrides: Sequence[tuple[str, str]] = (), evaluate_args: Sequence[str] = (),
              name: str | None = None, log=print) -> None:
    """Runs the point's steps in order; a failed step stops the point with its exit status."""
    from etils import epath

    check_tasks_dir(tasks_dir)
    check_apart(workdir, tasks_dir)
    loaded = load_config(config)
    check_settings(loaded, config, overrides)
    overrides = effective(loaded, overrides)
    check_recipe(workdir, config, overrides, loaded)
    with point_lock(workdir):
        # Again: another sweep may have just begun it.
        check_recipe(workdir, config, overrides, loaded)
        path = epath.Path(workdir) / RECIPE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(recipe(config, overrides), indent=1))
        for step, argv in zip(("pretrain", "export", "evaluate"),
                              point_commands(config, workdir, tasks_dir, overrides=overrides,
                                             evaluate_args=evaluate_args, name=name)):
            log(f"sweep point {name or workdir}: {step}: {shlex.join(argv[1:])}")
            rc = subprocess.run(argv).returncode
            if rc != 0:
                raise SweepError(f"{workdir}: {step} failed (exit {rc}); fix it and rerun: "
                                 "finished steps are kept")


def collect(root: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The sweep's table from every point under ``root`` (local or gs://) with evaluation
    results, or from the points ``names`` only; writes ``root/sweep.md`` and
    ``root/sweep.json``."""
    from etils import epath

    from mwmae.hear.evaluate import PRESETS

    root = epath.Path(root)  # gs:// too: the points of an XManager sweep
    if names is None:
        found = sorted(root.glob("/".join(("*", *RESULTS))), key=str)
    else:
        found = [p for p in (root.joinpath(n, *RESULTS) for n in names) if p.exists()]
    if not found:
        raise SweepError(f"{root}: no point has HEAR results yet "
                         f"(<point>/{'/'.join(RESULTS)}); run the sweep first")
    models = [compare.from_results(_read_results(p), str(p), p.parent.parent.name)
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


def _read_results(path: Any) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or not isinstance(result.get("tasks"), dict):
            raise ValueError("no 'tasks' object")
    except ValueError as e:
        raise SweepError(f"{path}: not a HEAR results file ({e}); rerun that point's "
                         "evaluation") from e
    return result


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
        check_apart(a.workdir, a.tasks_dir)
        points = grid(_settings(a.sweep, "--sweep"))
        names = [point_name(pt) or "run" for pt in points]
        for point, name in zip(points, names):
            check_point_name(name, point)
        if len(set(names)) != len(names):
            raise SweepError(f"two points share a folder name: {names}")
        plan = [(point.get("config", a.config), os.path.join(a.workdir, name),
                 [*fixed, *((k, v) for k, v in point.items() if k != "config")], name)
                for point, name in zip(points, names)]
        for config, workdir, overrides, _ in plan:  # every point, before the first step
            loaded = load_config(config)
            check_settings(loaded, config, overrides)
            check_recipe(workdir, config, effective(loaded, overrides), loaded)
        for config, workdir, overrides, name in plan:
            run_point(config, workdir, a.tasks_dir, overrides=overrides,
                      evaluate_args=evaluate_args, name=name)
        # This run's points: a point of an earlier sweep in the same folder was made with
        # other settings (`collect ROOT` tables every point there).
        print(collect(a.workdir, names)["text"])
    except (SweepError, compare.ComparisonError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
