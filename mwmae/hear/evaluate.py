"""Evaluate an artifact on HEAR tasks with hear-eval-kit, over several predictor seeds.

    python -m mwmae.hear.evaluate --artifact DIR --tasks-dir TASKS --out OUT \
        [--seeds 10] [--grid faster] [--grid-points 8] [--tasks a,b | --preset hear2021]
        [--model-options JSON] [--name NAME] [--compare RESULTS.json ...]

1. Embeddings: hear-eval-kit's embedding step (``heareval.embeddings.task_embeddings``) with the
   HEAR module ``--module`` (default ``mwmae.hear``) and the artifact as ``model_file_path``,
   once per task (embeddings do not depend on the seed) into ``OUT/embeddings/MODULE/TASK``.
   It runs in this process, so JAX compiles once for all tasks.
2. Predictions: hear-eval-kit's downstream predictor (``task_predictions``: grid search over
   its MLP heads, then the test split) once per seed, each in
   ``OUT/predictions/seed_S/TASK`` (links to the embeddings, so seeds never share outputs).
   The predictor seeds everything with a constant; here seed S replaces that constant.
3. ``OUT/results.json`` and ``OUT/results.md``: the primary test score of each task per seed,
   and per task the mean, the sample std and the half-width of the 95% Student-t interval of
   the mean, ``t(0.975, n - 1) * std / sqrt(n)`` (the paper reports the mean over 10 seeds with
   this interval; ``--seeds 10`` is the default, fewer seeds are for smoke runs), and the
   mean score over the tasks.
4. With ``--compare``: ``OUT/comparison.md``, this run beside the models of the given results
   files (other runs' ``results.json``, or published numbers typed into a table): per task the
   difference and whether it lies inside this run's interval, and the overall score
   (:mod:`mwmae.hear.compare` states the formula).

Steps whose outputs are complete are skipped on a rerun (resume after preemption), as long as
they were made from the same weights and task: ``OUT/fingerprint.json`` records the artifact's
weights hash, module and options, and each task's done marker the hash of its label files, so
a re-exported artifact or a regenerated task is evaluated afresh, never mixed with old outputs.
Runs on CPU;
on a GPU host JAX embeds on the GPU and the predictor uses CUDA when torch has it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from mwmae import cli
from mwmae.hear import compare as compare_lib

GRIDS = ("default", "fast", "faster")


class EvaluationError(RuntimeError):
    """Bad inputs to the evaluation (tasks, audio, artifact); the message names the path."""


def find_tasks(tasks_dir: pathlib.Path, names: Sequence[str] | None = None
               ) -> list[pathlib.Path]:
    """Task folders (those with task_metadata.json) under ``tasks_dir``, checked for the layout
    hear-eval-kit reads and for 16 kHz audio."""
    if not tasks_dir.is_dir():
        raise EvaluationError(f"{tasks_dir}: tasks directory not found")
    found = sorted(p for p in tasks_dir.iterdir() if (p / "task_metadata.json").is_file())
    if names:
        by_name = {p.name: p for p in found}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise EvaluationError(f"{tasks_dir}: no task(s) {missing}; found {sorted(by_name)}")
        found = [by_name[n] for n in names]
    if not found:
        raise EvaluationError(f"{tasks_dir}: no task folders (a task folder holds "
                              "task_metadata.json, labelvocabulary.csv, <split>.json and "
                              "audio under 16000/<split>/)")
    for task in found:
        check_task(task)
    return found


def check_task(task: pathlib.Path, sample_rate: int = 16_000) -> None:
    import soundfile as sf

    meta_path = task / "task_metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{meta_path}: not valid JSON ({e})") from e
    for key in ("task_name", "embedding_type", "prediction_type", "split_mode", "evaluation",
                "splits"):
        if key not in meta:
            raise EvaluationError(f"{meta_path}: no {key!r}")
    if not (task / "labelvocabulary.csv").is_file():
        raise EvaluationError(f"{task / 'labelvocabulary.csv'}: missing")
    audio_root = task / str(sample_rate)
    if not audio_root.is_dir():
        rates = sorted(p.name for p in task.iterdir() if p.is_dir() and p.name.isdigit())
        raise EvaluationError(f"{task}: no {sample_rate} Hz audio folder ({audio_root.name}/); "
                              f"found rates {rates}. MW-MAE takes {sample_rate} Hz mono: "
                              "resample the task (hear-preprocess writes one folder per rate)")
    for split in meta["splits"]:
        split_json = task / f"{split}.json"
        if not split_json.is_file():
            raise EvaluationError(f"{split_json}: missing")
        for name in json.loads(split_json.read_text()):
            path = audio_root / split / name
            try:
                info = sf.info(str(path))
            except (RuntimeError, sf.LibsndfileError) as e:
                raise EvaluationError(f"{path}: unreadable audio ({e})") from e
            if info.samplerate != sample_rate:
                raise EvaluationError(f"{path}: {info.samplerate} Hz; expected {sample_rate} Hz "
                                      "in a 16000/ folder")
            if info.channels != 1:
                raise EvaluationError(f"{path}: {info.channels} channels; expected mono")


def artifact_fingerprint(artifact: str, module: str, model_options: dict[str, Any]) -> dict:
    """What the embeddings depend on: the weights (an artifact's SHA-256, else the files' sizes
    and times), the module and its options."""
    path = pathlib.Path(artifact)
    config = path / "config.json"
    weights = None
    if config.is_file():
        with contextlib.suppress(ValueError, AttributeError):
            weights = json.loads(config.read_text()).get("params_sha256")
    if weights is None:
        weights = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in path.rglob("*") if f.is_file())
    return {"weights": weights, "module": module, "model_options": model_options}


def task_fingerprint(task: pathlib.Path) -> str:
    """SHA-256 of the task's metadata and split files (the labels and the file list)."""
    h = hashlib.sha256()
    for f in sorted(task.glob("*.json")) + sorted(task.glob("*.csv")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _forget_stale(out_dir: pathlib.Path, fingerprint: dict, tasks: Sequence[pathlib.Path],
                  module: str, log=print) -> None:
    """Remove outputs made from other weights or an earlier version of a task."""
    import shutil

    stamp = out_dir / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text()) != fingerprint:
        log(f"{out_dir}: made from other weights or options than {fingerprint['weights']!s:.24}"
            "...; evaluating afresh")
        for sub in ("embeddings", "predictions"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    stamp.write_text(json.dumps(fingerprint, indent=1))
    for task in tasks:
        done = out_dir / "embeddings" / module / task.name / ".done.embeddings"
        if done.exists() and done.read_text() != task_fingerprint(task):
            log(f"{task}: changed since its embeddings were made; evaluating it afresh")
            shutil.rmtree(done.parent)
            for seed_dir in (out_dir / "predictions").glob("seed_*"):
                shutil.rmtree(seed_dir / task.name, ignore_errors=True)


def embed_tasks(module: str, artifact: str, tasks: Sequence[pathlib.Path],
                embeddings_dir: pathlib.Path, model_options: dict[str, Any],
                log=print) -> dict[str, pathlib.Path]:
    """hear-eval-kit's embedding step for each task; returns {task name: embedding dir}."""
    from heareval.embeddings.task_embeddings import Embedding, task_embeddings

    out: dict[str, pathlib.Path] = {}
    embedding = None
    for task in tasks:
        embed_dir = embeddings_dir / module / task.name
        out[task.name] = embed_dir
        done = embed_dir / ".done.embeddings"
        if done.exists():
            log(f"embeddings for {task.name}: already done ({embed_dir})")
            continue
        if embedding is None:
            embedding = Embedding(module, artifact, model_options)
        if embed_dir.exists():
            import shutil

            shutil.rmtree(embed_dir)
        start = time.time()
        task_embeddings(embedding, task, embed_dir)
        seconds = time.time() - start
        (embed_dir / "profile.embeddings.json").write_text(json.dumps(
            {"time_elapsed": seconds, "module": module, "artifact": artifact}, indent=1))
        done.write_text(task_fingerprint(task))
        log(f"embeddings for {task.name}: {seconds:.1f} s -> {embed_dir}")
    return out


def _mirror(src: pathlib.Path, dst: pathlib.Path) -> None:
    """``dst`` with a link to every file of ``src`` (the predictor writes its outputs beside
    the embeddings; a folder per seed keeps the seeds apart without copying embeddings)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(".") and not (dst / f.name).exists():
            os.symlink(f.resolve(), dst / f.name)


@contextlib.contextmanager
def _predictor_seed(seed: int) -> Iterator[None]:
    """hear-eval-kit's predictor with ``seed`` instead of its constant, and event tasks working
    under Lightning 1.9."""
    import pytorch_lightning as pl
    from heareval.predictions import task_predictions as tp

    # task_predictions seeds python, numpy and torch with the constant 42; swap in ours.
    original_seed = tp.seed_everything
    tp.seed_everything = lambda _seed, workers=False: pl.seed_everything(seed, workers=workers)
    # Event tasks: the postprocessing chosen at each validation is stored under that epoch, but
    # Lightning 1.9 writes the best checkpoint's epoch one past it when validation is not run
    # every epoch, and the lookup fails (KeyError). Use the latest validated epoch up to it.
    cls = tp.EventPredictionModel
    original_lookup = cls.epoch_best_postprocessing_or_default

    def lookup(self, epoch: int):
        table = self.epoch_best_postprocessing
        if self.use_scoring_for_early_stopping and epoch not in table:
            earlier = [e for e in table if e <= epoch]
            if earlier:
                epoch = max(earlier)
        return original_lookup(self, epoch)

    cls.epoch_best_postprocessing_or_default = lookup
    try:
        yield
    finally:
        tp.seed_everything = original_seed
        cls.epoch_best_postprocessing_or_default = original_lookup


def primary_score(scores: dict[str, Any]) -> float:
    """The predictor's primary test score (the task's first metric), over folds if k-fold."""
    if "aggregated_scores" in scores:
        return float(scores["aggregated_scores"]["test_score_mean"])
    folds = [v for v in scores.values() if isinstance(v, dict) and "test_score" in v]
    if not folds:
        raise EvaluationError(f"no test_score in predictor output: keys {sorted(scores)}")
    return float(statistics.fmean(f["test_score"] for f in folds))


def predict_task(embed_dir: pathlib.Path, work: pathlib.Path, seed: int, *, grid: str,
                 grid_points: int, log=print) -> float:
    """hear-eval-kit's predictor on one task's embeddings with one seed; the primary score."""
    import logging

    import torch
    from heareval.predictions.task_predictions import task_predictions

    scores_file = work / "test.predicted-scores.json"
    if not scores_file.exists():
        _mirror(embed_dir, work)
        meta = json.loads((work / "task_metadata.json").read_text())
        sizes = {json.loads((work / f"{s}.embedding-dimensions.json").read_text())[1]
                 for s in meta["splits"]}
        if len(sizes) != 1:
            raise EvaluationError(f"{embed_dir}: embedding sizes differ between splits: {sizes}")
        logger = logging.getLogger(f"mwmae.hear.evaluate.{work.parent.name}.{work.name}")
        logger.setLevel(logging.INFO)
        handler = logging.FileHandler(work / "prediction.log")
        logger.addHandler(handler)
        try:
            with _predictor_seed(seed):
                task_predictions(
                    embedding_path=work.resolve(), embedding_size=sizes.pop(),
                    grid_points=grid_points, gpus=[0] if torch.cuda.is_available() else None,
                    in_memory=True, deterministic=True, grid=grid, logger=logger)
        finally:
            logger.removeHandler(handler)
            handler.close()
    score = primary_score(json.loads(scores_file.read_text()))
    log(f"predictions for {work.name}, seed {seed}: {score:.4f}")
    return score


# HEAR 2021's tasks as the paper's table names them, by their HEAR task folder names.
# "demo": the one task of the demo (scripts/demo.sh).
PRESETS: dict[str, dict[str, str]] = {"demo": {"mwmae_digits": "Spoken digits"}, "hear2021": {
    "beijing_opera-v1.0-hear2021-full": "Beijing Opera",
    "tfds_crema_d-1.0.0-full": "CREMA-D",
    "esc50-v2.0.0-full": "ESC-50",
    "libricount-v1.0.0-hear2021-full": "LibriCount",
    "mridangam_stroke-v1.5-full": "Mridangam Stroke",
    "mridangam_tonic-v1.5-full": "Mridangam Tonic",
    "nsynth_pitch-v2.2.3-5h": "NSynth Pitch 5h",
    "speech_commands-v0.0.2-5h": "Speech Commands 5h",
    "fsd50k-v1.0-full": "FSD50K",
    "vox_lingua_top10-hear2021-full": "VoxLingua107 top 10",
}}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of the mean of ``values``:
    ``t((1 + confidence) / 2, n - 1) * s / sqrt(n)`` with the sample std ``s``; NaN for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    from scipy import stats

    return float(stats.t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(values)
                 / n ** 0.5)


def summarise(scores: dict[str, list[float]], metrics: dict[str, str]) -> dict[str, Any]:
    out = {}
    for task, values in scores.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out[task] = {"metric": metrics[task], "scores": values,
                     "mean": statistics.fmean(values), "std": std, "ci95": t_interval(values),
                     "n": len(values)}
    return out


def markdown_table(summary: dict[str, Any], title: str) -> str:
    lines = [f"### {title}", "", "| task | metric | mean ± 95% CI | std | seeds |",
             "|---|---|---|---|---|"]
    for task, s in summary.items():
        ci = "n/a" if s["ci95"] != s["ci95"] else f"{s['ci95']:.4f}"  # NaN: one seed
        lines.append(f"| {task} | {s['metric']} | {s['mean']:.4f} ± {ci} | {s['std']:.4f} | "
                     f"{s['n']} |")
    mean = statistics.fmean(s["mean"] for s in summary.values()) * 100
    lines.append(f"| **mean score** (x 100) | | {mean:.1f} | | |")
    return "\n".join(lines) + "\n"


def _labels() -> dict[str, str]:
    return {t: label for preset in PRESETS.values() for t, label in preset.items()}


def evaluate(artifact: str, tasks_dir: str, out: str, *, seeds: int = 10, grid: str = "default",
             grid_points: int = 8, task_names: Sequence[str] | None = None,
             module: str = "mwmae.hear", model_options: dict[str, Any] | None = None,
             name: str | None = None, compare: Sequence[str] = (), log=print
             ) -> dict[str, Any]:
    """Embeddings once, predictions per seed, summary (and the comparison with ``compare``'s
    results files); returns what results.json holds."""
    if seeds < 1:
        raise EvaluationError(f"--seeds must be >= 1, got {seeds}")
    # Read the files to compare with first: a typo there should not cost an evaluation.
    try:
        others = [m for path in compare for m in compare_lib.load(path)]
    except compare_lib.ComparisonError as e:
        raise EvaluationError(str(e)) from e
    if grid not in GRIDS:
        raise EvaluationError(f"--grid {grid!r}: expected one of {GRIDS}")
    # heareval's predictor reloads its own Lightning checkpoints, which torch >= 2.6 refuses
    # under weights_only (the files are this run's own).
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    out_dir = pathlib.Path(out)
    tasks = find_tasks(pathlib.Path(tasks_dir), task_names)
    # Fail on a bad artifact before the slow imports and the tasks' audio.
    from mwmae.artifact import ArtifactError, is_artifact, load_artifact

    if not pathlib.Path(artifact).is_dir():
        raise EvaluationError(f"{artifact}: artifact directory not found")
    if is_artifact(artifact):
        try:
            load_artifact(artifact)
        except ArtifactError as e:
            raise EvaluationError(str(e)) from e
    out_dir.mkdir(parents=True, exist_ok=True)
    _forget_stale(out_dir, artifact_fingerprint(artifact, module, model_options or {}), tasks,
                  module, log=log)
    embed_dirs = embed_tasks(module, artifact, tasks, out_dir / "embeddings",
                             model_options or {}, log=log)
    scores: dict[str, list[float]] = {}
    metrics: dict[str, str] = {}
    for task in tasks:
        meta = json.loads((task / "task_metadata.json").read_text())
        metrics[task.name] = meta["evaluation"][0]
        scores[task.name] = [
            predict_task(embed_dirs[task.name], out_dir / "predictions" / f"seed_{s}" / task.name,
                         s, grid=grid, grid_points=grid_points, log=log)
            for s in range(seeds)]
    summary = summarise(scores, metrics)
    name = name or pathlib.Path(artifact).resolve().name
    result = {"name": name, "artifact": str(pathlib.Path(artifact).resolve()), "module": module,
              "grid": grid, "grid_points": grid_points, "seeds": list(range(seeds)),
              "model_options": model_options or {}, "tasks": summary}
    result["mean_score"] = statistics.fmean(s["mean"] for s in summary.values()) * 100
    table = markdown_table(summary, f"HEAR ({grid} grid, {seeds} seed(s)): {name}")
    if others:
        this = compare_lib.from_results(result, str(out_dir / "results.json"))
        try:
            side_by_side = compare_lib.table(this, others, _labels())
        except compare_lib.ComparisonError as e:
            raise EvaluationError(str(e)) from e
        result["overall_score"] = compare_lib.overall_scores([this, *others])
        (out_dir / "comparison.md").write_text(side_by_side)
        table += "\n" + side_by_side
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "results.md").write_text(table)
    log(table)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.hear.evaluate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="exported artifact directory")
    p.add_argument("--tasks-dir", dest="tasks_dir", required=True,
                   help="folder of HEAR task folders")
    p.add_argument("--out", required=True, help="output folder (embeddings, predictions, "
                   "results.json, results.md)")
    p.add_argument("--seeds", type=int, default=10,
                   help="predictor seeds 0..N-1 (10 as the paper; fewer for smoke runs)")
    p.add_argument("--grid", choices=GRIDS, default="default", help="hear-eval-kit grid")
    p.add_argument("--grid-points", dest="grid_points", type=int, default=8)
    p.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the tasks of a benchmark by their HEAR folder names (hear2021: the "
                        "paper's ten); those missing from --tasks-dir are an error")
    p.add_argument("--module", default="mwmae.hear", help="HEAR module to import")
    p.add_argument("--model-options", dest="model_options", default="{}",
                   help='JSON kwargs for load_model, e.g. \'{"dtype": "bfloat16"}\'')
    p.add_argument("--name", default=None,
                   help="this model's name in the tables (default: the artifact's folder name)")
    p.add_argument("--compare", action="append", default=[], metavar="RESULTS.json",
                   help="results file to put beside this run (another run's results.json or "
                        "a table of published numbers; see mwmae.hear.compare); repeatable")
    a = cli.parse_args(p, argv)
    # Before JAX starts: it must not take all GPU memory from torch.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        options = json.loads(a.model_options)
        if not isinstance(options, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        print(f"error: --model-options {a.model_options!r}: {e}", file=sys.stderr)
        return 2
    names = [t for t in a.tasks.split(",") if t]
    if a.preset and names:
        print("error: --preset and --tasks both name tasks; give one", file=sys.stderr)
        return 2
    if a.preset:
        names = list(PRESETS[a.preset])
    try:
        evaluate(a.artifact, a.tasks_dir, a.out, seeds=a.seeds, grid=a.grid,
                 grid_points=a.grid_points, task_names=names or None,
                 module=a.module, model_options=options, name=a.name, compare=a.compare)
    except (EvaluationError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
