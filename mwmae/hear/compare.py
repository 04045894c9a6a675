"""HEAR results side by side: per-task differences, whether they fall in the interval, and the
overall score.

A *results file* is either what ``mwmae.hear.evaluate`` writes (``OUT/results.json``: one model,
per task the scores of every seed, their mean and 95% interval) or a table of several models
typed in from a publication::

    {"source": "Author et al., Title, Venue Year, Table N",
     "models": {"MODEL": {"TASK_FOLDER": {"mean": 0.961, "ci95": 0.004}, ...}, ...}}

with TASK_FOLDER a HEAR task folder name (as in ``presets.PRESETS``), scores on the scale the
predictor reports (0-1, not percent) and ``ci95`` optional. Tables shipped with the package
(``mwmae/hear/published/``) are named ``published:KEY``, e.g. ``published:mwmae-b-4x16-4l``: the
original repository's published scores of MW-MAE-B-4x16-4l.

The overall score of model m over the tasks T that every compared model has is the min-max
normalised mean

    s(m) = 100 / |T| * sum_t (x_t(m) - min_m' x_t(m')) / (max_m' x_t(m') - min_m' x_t(m'))

with x_t the mean test score on task t and the min and max taken over the models in the
comparison (a task on which they all tie counts 100 for each). It ranks models within one table;
its values depend on which models are in the table, so scores of different tables do not compare.
The plain mean of the task scores (x 100) is reported beside it and needs no other model.

A model of an evaluation is known by its weights: ``results.json`` records the artifact's
``params_sha256``. Every results file given is a column of its own, whatever its name; where
names repeat (every export is ``WORKDIR/export`` by default), a column's label adds the start of
the weights' digest, or the results file's name when none is recorded, and the scores of
:func:`overall_scores` and :func:`mean_scores` are keyed by those labels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from mwmae.hear.manifest import evaluation_folder


class ComparisonError(ValueError):
    """A results file that cannot be compared; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Score:
    mean: float
    ci95: float = math.nan  # half-width; NaN when unknown (one seed, or not published)


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    scores: dict[str, Score]  # by HEAR task folder name
    source: str
    digest: str | None = None  # SHA-256 of the weights (an evaluation's); None for typed tables
    file: str = ""  # the results file as given (``published:KEY`` included)


def _score(path: str, where: str, entry: Any) -> Score:
    if isinstance(entry, (int, float)):
        entry = {"mean": entry}
    if not isinstance(entry, Mapping) or "mean" not in entry:
        raise ComparisonError(f"{path}: {where}: expected a number or {{\"mean\": ...}}, got "
                              f"{entry!r}")
    try:
        mean = float(entry["mean"])
        ci = float(entry.get("ci95", math.nan))
    except (TypeError, ValueError) as e:
        raise ComparisonError(f"{path}: {where}: not a number ({e})") from e
    # NaN is "not known" (one seed, not published); anything else must be a half-width.
    if ci < 0 or math.isinf(ci):
        raise ComparisonError(f"{path}: {where}: ci95 {ci} is not the half-width of an interval "
                              "(a number >= 0; leave it out when it is not known)")
    if not 0.0 <= mean <= 1.0:
        raise ComparisonError(f"{path}: {where}: mean {mean} is outside [0, 1] (scores are on "
                              "the predictor's scale: a percentage must be divided by 100)")
    return Score(mean, ci)


PUBLISHED = "published:"


def published_tables() -> dict[str, pathlib.Path]:
    """{key: file} of the published tables shipped with the package (``mwmae/hear/published``),
    named on the command line as ``published:KEY``."""
    folder = pathlib.Path(__file__).with_name("published")
    return {p.stem: p for p in sorted(folder.glob("*.json"))}


def resolve(spec: str | pathlib.Path) -> str:
    """A results file's path: ``published:KEY`` names a shipped table, anything else is a
    path."""
    spec = str(spec)
    if not spec.startswith(PUBLISHED):
        return spec
    tables = published_tables()
    key = spec[len(PUBLISHED):]
    if key not in tables:
        raise ComparisonError(f"{spec}: no such published table; known: "
                              + ", ".join(PUBLISHED + k for k in tables))
    return str(tables[key])


def load(path: str | pathlib.Path) -> list[Model]:
    """The models of a results file (an evaluation's ``results.json`` or a published table;
    ``published:KEY`` names one shipped with the package)."""
    given = str(path)
    path = resolve(path)
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError as e:
        raise ComparisonError(f"{path}: results file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ComparisonError(f"{path}: not a JSON results file ({e})") from e
    except OSError as e:  # a folder, no permission, ...: the file named, no traceback
        raise ComparisonError(f"{path}: cannot read it as a results file "
                              f"({e.strerror or type(e).__name__})") from e
    if isinstance(data, Mapping) and isinstance(data.get("tasks"), Mapping):
        if not data["tasks"]:
            raise ComparisonError(f"{path}: the evaluation's \"tasks\" is empty")
        return [dataclasses.replace(from_results(data, path), file=given)]
    if isinstance(data, Mapping) and isinstance(data.get("models"), Mapping):
        source = str(data.get("source") or path)
        models = []
        for name, tasks in data["models"].items():
            if not isinstance(tasks, Mapping) or not tasks:
                raise ComparisonError(f"{path}: model {name!r}: expected its tasks' scores")
            models.append(Model(str(name), {t: _score(path, f"{name} / {t}", s)
                                            for t, s in tasks.items()}, source, file=given))
        if not models:
            raise ComparisonError(f"{path}: \"models\" is empty")
        return models
    raise ComparisonError(f"{path}: neither an evaluation's results.json (with \"tasks\") nor "
                          "a table of published results (with \"models\")")


def from_results(result: Mapping[str, Any], source: str, name: str | None = None) -> Model:
    """One evaluation's results (what ``results.json`` holds) as a model of the comparison."""
    name = name or result.get("name") or pathlib.Path(str(result.get("artifact", source))).name
    digest = result.get("params_sha256")
    return Model(str(name), {t: _score(source, t, s) for t, s in result["tasks"].items()},
                 str(source), digest=digest if isinstance(digest, str) and digest else None,
                 file=str(source))


def common_tasks(models: Sequence[Model]) -> list[str]:
    """Tasks every model has, in the first model's order."""
    return [t for t in models[0].scores if all(t in m.scores for m in models[1:])]


def require_common_tasks(models: Sequence[Model]) -> list[str]:
    """:func:`common_tasks`, or a one-line ComparisonError naming each results file once with
    a few of its tasks."""
    tasks = common_tasks(models)
    if tasks:
        return tasks
    by_file: dict[str, set[str]] = {}
    for m in models:
        by_file.setdefault(m.file or m.source, set()).update(m.scores)
    parts = []
    for where, names in by_file.items():
        shown = sorted(names)
        parts.append(f"{where} has {', '.join(shown[:2])}"
                     + (f" and {len(shown) - 2} more" if len(shown) > 2 else ""))
    raise ComparisonError("no task in common: " + "; ".join(parts))


def _file_tag(m: Model) -> str:
    path = pathlib.PurePath(m.file or m.source)
    # Every evaluation's file is results.json: its folder is what tells them apart.
    return f"{path.parent.name}/{path.name}" if path.name == "results.json" else path.name


def column_labels(models: Sequence[Model]) -> list[str]:
    """One distinct label per model: its name, plus the start of its weights' digest (or its
    results file's name) when another model of the table has the same name, plus ``#k`` when
    that still does not tell them apart (the same results given twice)."""
    names = Counter(m.name for m in models)
    labels = [m.name if names[m.name] == 1 else
              f"{m.name} ({m.digest[:8] if m.digest else _file_tag(m)})" for m in models]
    repeated = Counter(labels)
    seen: Counter[str] = Counter()
    for i, label in enumerate(labels):
        if repeated[label] > 1:
            seen[label] += 1
            labels[i] = f"{label} #{seen[label]}"
    return labels


def _name_note(models: Sequence[Model]) -> str:
    shared = sorted(n for n, k in Counter(m.name for m in models).items() if k > 1)
    if not shared:
        return ""
    return (f"Several models named {', '.join(shared)}: each is a column of its own, labelled "
            "with the start of its weights' SHA-256 (or its results file where none is "
            "recorded).")


def overall_scores(models: Sequence[Model], tasks: Sequence[str] | None = None
                   ) -> dict[str, float]:
    """The min-max normalised overall score of each model (see the module docstring)."""
    tasks = common_tasks(models) if tasks is None else list(tasks)
    labels = column_labels(models)
    if not tasks:
        return {label: math.nan for label in labels}
    out = {}
    for label, m in zip(labels, models):
        parts = []
        for t in tasks:
            values = [o.scores[t].mean for o in models]
            lo, hi = min(values), max(values)
            parts.append(1.0 if hi == lo else (m.scores[t].mean - lo) / (hi - lo))
        out[label] = 100.0 * statistics.fmean(parts)
    return out


def mean_scores(models: Sequence[Model], tasks: Sequence[str] | None = None
                ) -> dict[str, float]:
    """Plain mean of each model's task scores over ``tasks``, x 100, by column label."""
    tasks = common_tasks(models) if tasks is None else list(tasks)
    return {label: 100.0 * statistics.fmean(m.scores[t].mean for t in tasks) if tasks
            else math.nan for label, m in zip(column_labels(models), models)}


def _fmt(s: Score) -> str:
    return f"{s.mean:.4f}" if math.isnan(s.ci95) else f"{s.mean:.4f} ± {s.ci95:.4f}"


def table(this: Model, others: Sequence[Model], labels: Mapping[str, str] | None = None) -> str:
    """Markdown: per task this run's mean ± 95% interval, each other model's score, the
    difference (this - other) and whether the other's mean lies inside this run's interval;
    then the overall and mean scores over the tasks all have."""
    labels = labels or {}
    models = [this, *others]
    tasks = require_common_tasks(models)
    columns = column_labels(models)
    head = f"| task | {columns[0]} |"
    rule = "|---|---|"
    for column in columns[1:]:
        head += f" {column} | diff | inside |"
        rule += "---|---|---|"
    lines = [head, rule]
    for t in tasks:
        mine = this.scores[t]
        row = f"| {labels.get(t, t)} | {_fmt(mine)} |"
        for o in others:
            theirs = o.scores[t]
            diff = mine.mean - theirs.mean
            inside = "n/a" if math.isnan(mine.ci95) else (
                "yes" if abs(diff) <= mine.ci95 else "no")
            row += f" {_fmt(theirs)} | {diff:+.4f} | {inside} |"
        lines.append(row)
    overall, mean = overall_scores(models, tasks), mean_scores(models, tasks)
    for title, values in (("overall score s(m)", overall), ("mean score", mean)):
        mine_value = values[columns[0]]
        row = f"| **{title}** | {mine_value:.1f} |"
        for column in columns[1:]:
            row += f" {values[column]:.1f} | {mine_value - values[column]:+.1f} | |"
        lines.append(row)
    skipped = sorted({t for m in models for t in m.scores} - set(tasks))
    notes = [f"Tasks in common: {len(tasks)}."]
    if _name_note(models):
        notes.append(_name_note(models))
    if skipped:
        notes.append(f"Not in every results file, so left out: {', '.join(skipped)}.")
    notes.append("inside: the other model's mean lies within this run's 95% interval.")
    sources = sorted({o.source for o in others})
    notes.append("Compared with: " + "; ".join(sources) + ".")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def matrix(models: Sequence[Model], labels: Mapping[str, str] | None = None) -> str:
    """Markdown: a row per task, a column per model (mean ± 95% interval), then each model's
    overall and mean score over the tasks all have (a sweep's table)."""
    labels = labels or {}
    tasks = require_common_tasks(models)
    columns = column_labels(models)
    lines = ["| task | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(models)]
    for t in tasks:
        lines.append(f"| {labels.get(t, t)} | " + " | ".join(_fmt(m.scores[t]) for m in models)
                     + " |")
    for title, values in (("overall score s(m)", overall_scores(models, tasks)),
                          ("mean score", mean_scores(models, tasks))):
        lines.append(f"| **{title}** | " + " | ".join(f"{values[c]:.1f}" for c in columns)
                     + " |")
    skipped = sorted({t for m in models for t in m.scores} - set(tasks))
    note = f"{len(models)} models, {len(tasks)} tasks in common."
    if _name_note(models):
        note += " " + _name_note(models)
    if skipped:
        note += f" Not in every results file, so left out: {', '.join(skipped)}."
    return "\n".join(lines) + "\n\n" + note + "\n"


def check_out(out: str, results: Sequence[str]) -> None:
    """Refuse (ComparisonError) a table file that would replace one of the ``results`` files
    or any other results file, that lies in an evaluation's output folder (all of whose files
    are that evaluation's: results.md, comparison.md, its logs), or that is a folder."""
    path = pathlib.Path(out)
    where = f"--out {out}"
    if path.is_dir():
        raise ComparisonError(f"{where}: is a folder; give the table's file name (e.g. "
                              "comparison.md). Nothing was written.")
    if any(os.path.realpath(out) == os.path.realpath(resolve(r)) for r in results):
        raise ComparisonError(f"{where}: is one of the results files this table reads; write "
                              "the table to another file. Nothing was written.")
    folder = evaluation_folder(path)
    if folder is not None:
        raise ComparisonError(f"{where}: lies in an evaluation's output folder ({folder}), "
                              "whose files are that evaluation's own; write the table "
                              "elsewhere. Nothing was written.")
    if path.is_file():
        try:
            load(path)
        except ComparisonError:
            return  # not results: an earlier table, which a new one may replace
        raise ComparisonError(f"{where}: holds results (a results file); write the table to "
                              "another file. Nothing was written.")


def main(argv: list[str] | None = None) -> int:
    """``python -m mwmae.hear.compare THIS.json OTHER.json ...``: the table of an existing run."""
    import argparse
    import sys

    from mwmae import cli

    p = argparse.ArgumentParser(prog="python -m mwmae.hear.compare",
                                description="HEAR results side by side with the overall score")
    p.add_argument("results", nargs="+", metavar="RESULTS.json",
                   help="the first file's (first) model is compared with all the others'; "
                        "published:KEY names a table shipped with mwmae")
    p.add_argument("--out", default=None, help="also write the table to this file")
    a = cli.parse_args(p, argv)
    try:
        if a.out:
            check_out(a.out, a.results)
        models = [m for path in a.results for m in load(path)]
        if len(models) < 2:
            raise ComparisonError(f"{a.results[0]}: one model; give at least two to compare")
        from mwmae.hear.presets import task_labels

        text = table(models[0], models[1:], task_labels())
    except ComparisonError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out:
        out = pathlib.Path(a.out)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(f"error: --out {a.out}: {e}", file=sys.stderr)
            return 1
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
