"""Evaluate an artifact on HEAR tasks with hear-eval-kit, over several predictor seeds.

    python -m mwmae.hear.evaluate --artifact DIR --tasks-dir TASKS --out OUT \
        [--seeds 10] [--grid faster] [--grid-points 8] [--tasks a,b | --preset hear2021]
        [--model-options JSON] [--name NAME] [--compare RESULTS.json ...] [--overwrite]

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

What hear-eval-kit prints (its own lines, tqdm bars, Lightning's logs and profiler tables,
warnings, and anything C code or subprocesses write to fds 1 and 2) goes to a log file per step:
``OUT/logs/embeddings-TASK.log`` and ``OUT/logs/predictions-TASK-seed_S.log``. The terminal
shows a progress bar over tasks x seeds, a line per embedded task and per seed (its score), the
logs folder and the results table. A step that fails leaves its traceback at the end of its log;
the command prints that log's last lines, then the error.

Steps whose outputs are complete are skipped on a rerun (resume after preemption), as long as
they were made from the same weights, settings and tasks: ``OUT/fingerprint.json`` records the
artifact's weights hash, module, options and predictor settings, and each task's done marker
the hash of its label files. An ``OUT`` that holds results of another artifact, other settings
or an earlier version of a task is refused (nothing is removed) unless ``--overwrite`` says to
start those outputs afresh. A rerun reads back only files this evaluation wrote: each step
records the SHA-256 of its files in ``OUT/manifest.json`` (:mod:`mwmae.hear.manifest`), and a
finished step whose folder holds a file the manifest does not vouch for is recomputed, with a
warning naming the file, never read; an unfinished one starts from an empty folder. ``OUT``
may not be, contain or lie in the artifact or the tasks folder, nor be a folder of other files.
One evaluation at a time writes an ``OUT``: it holds ``OUT/evaluate.lock`` (pid, host, start
time) while it runs; a lock left by a process that is no longer running on this host is taken
over. Ctrl-C stops it with one line, ``interrupted``, and exit 130; a seed it cut short is not
scored. Runs on CPU; on a GPU host JAX embeds on the GPU and the predictor uses CUDA when torch
has it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mwmae import cli
from mwmae.hear import compare as compare_lib
from mwmae.hear import interrupt, manifest
from mwmae.hear.manifest import FINGERPRINT, MANIFEST
from mwmae.hear.presets import PRESETS, task_labels

GRIDS = ("default", "fast", "faster")
LOCK_FILE = "evaluate.lock"
RESULTS = ("results.json", "results.md", "comparison.md")
LOGS = "logs"
# Everything an evaluation writes in OUT; anything else there belongs to someone else.
OUTPUTS = frozenset({FINGERPRINT, MANIFEST, LOCK_FILE, "embeddings", "predictions", LOGS,
                     *RESULTS})
TAIL_LINES = 20


class EvaluationError(RuntimeError):
    """Bad inputs to the evaluation (tasks, audio, artifact); the message names the path."""


class StepFailed(RuntimeError):
    """A hear-eval-kit step raised (the original exception is ``__cause__``). Its output and
    traceback are in ``log_file``; ``tail`` holds the last lines of it."""

    def __init__(self, message: str, log_file: pathlib.Path, tail: list[str]):
        super().__init__(message)
        self.log_file = log_file
        self.tail = tail


def step_log(out_dir: pathlib.Path, task: str, seed: int | None = None) -> pathlib.Path:
    """The log file of a task's embedding step (``seed`` None) or of one predictor seed."""
    name = f"embeddings-{task}.log" if seed is None else f"predictions-{task}-seed_{seed}.log"
    return out_dir / LOGS / name


def _remove_logs(out_dir: pathlib.Path, tasks: Sequence[str] | None, *,
                 embeddings: bool) -> None:
    """Drop the logs of outputs that are being removed (``tasks`` None: of every task)."""
    folder = out_dir / LOGS
    if not folder.is_dir():
        return
    pattern = re.compile(r"(embeddings-(?P<e>.+)|predictions-(?P<p>.+)-seed_\d+)\.log")
    for f in folder.iterdir():
        m = pattern.fullmatch(f.name)
        if m is None or (m["e"] is not None and not embeddings):
            continue
        if tasks is None or (m["e"] or m["p"]) in tasks:
            f.unlink(missing_ok=True)


def _flush_output() -> None:
    """Flush Python's and C's stdio buffers, so that text written before a switch of fds 1 and
    2 lands where it was meant to go."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    with contextlib.suppress(AttributeError, OSError, TypeError):
        import ctypes

        ctypes.CDLL(None).fflush(None)


def _tail(path: pathlib.Path, n: int = TAIL_LINES, width: int = 300) -> list[str]:
    """The last ``n`` lines of a log as a terminal would have shown them: of a line redrawn
    with carriage returns (tqdm), its last state; escape sequences dropped."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
        text = f.read().decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    lines = []
    for line in text.split("\n"):
        shown = next((part for part in reversed(line.split("\r")) if part.strip()), "")
        if shown.strip():
            lines.append(shown[:width] + (" ..." if len(shown) > width else ""))
    return lines[-n:]


def _on_fd(stream: Any, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def output_to(log_file: pathlib.Path, what: str) -> Iterator[None]:
    """Run the block with fds 1 and 2 sent to ``log_file`` (replaced), so that everything it
    prints goes there, that of C code and subprocesses included; then put them back. Where
    ``sys.stdout`` or ``sys.stderr`` is not on its fd (a notebook's, a test's capture), it is
    replaced by one that is for the block, so that Python's prints follow too.

    An exception from the block is written to the log with its traceback and raised again as
    :class:`StepFailed` (``what`` failed), which names the log and holds its last lines."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _flush_output()
    saved = os.dup(1), os.dup(2)
    streams = sys.stdout, sys.stderr
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        # Never closed: a logging handler made inside the block may keep one; after the block
        # it writes to the restored fd.
        if not _on_fd(sys.stdout, 1):
            sys.stdout = open(1, "w", buffering=1, errors="replace", closefd=False)
        if not _on_fd(sys.stderr, 2):
            sys.stderr = open(2, "w", buffering=1, errors="replace", closefd=False)
        failure: Exception | None = None
        try:
            yield
        except Exception as e:
            failure = e
            _flush_output()
            os.write(2, traceback.format_exc().encode(errors="replace"))
        finally:
            _flush_output()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])
    if failure is not None:
        raise StepFailed(f"{what} failed: {type(failure).__name__}: {failure} (its output and "
                         f"traceback: {log_file})", log_file, _tail(log_file)) from failure


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


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{path}: not valid JSON ({e})") from e


def read_vocabulary(task: pathlib.Path) -> set[str]:
    """The labels of ``labelvocabulary.csv`` as hear-eval-kit reads them (pandas, as strings),
    checked for what its predictor assumes: columns idx and label, idx 0..n-1, no repeats."""
    import pandas as pd

    path = task / "labelvocabulary.csv"
    try:
        vocab = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{path}: unreadable ({e})") from e
    if not {"idx", "label"} <= set(vocab.columns):
        raise EvaluationError(f"{path}: expected the columns idx,label; found "
                              f"{list(vocab.columns)}")
    labels = vocab["label"].astype(str)
    repeated = labels[labels.duplicated()]
    if len(repeated):
        raise EvaluationError(f"{path}: label {repeated.iloc[0]!r} is listed twice")
    try:
        idx = sorted(int(i) for i in vocab["idx"])
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"{path}: idx is not a whole number ({e})") from e
    if idx != list(range(len(vocab))):
        raise EvaluationError(f"{path}: idx must number the labels 0..{len(vocab) - 1}; found "
                              f"{idx[:10]}")
    return set(labels)


def _target_labels(split_json: pathlib.Path, name: str, target: Any, event: bool) -> list:
    """The labels of one clip: a list of labels (scene) or of {label, start, end} (event)."""
    if event:
        if not isinstance(target, list) or not all(
                isinstance(e, dict) and {"label", "start", "end"} <= set(e) for e in target):
            raise EvaluationError(f"{split_json}: {name}: expected a list of events "
                                  f"{{\"label\", \"start\", \"end\"}}, got {target!r:.80}")
        return [e["label"] for e in target]
    if not isinstance(target, list):
        raise EvaluationError(f"{split_json}: {name}: expected a list of labels, got "
                              f"{target!r:.80}")
    return target


def check_task(task: pathlib.Path, sample_rate: int = 16_000) -> None:
    import soundfile as sf

    meta_path = task / "task_metadata.json"
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise EvaluationError(f"{meta_path}: not a JSON object")
    for key in ("task_name", "embedding_type", "prediction_type", "split_mode", "evaluation",
                "splits"):
        if key not in meta:
            raise EvaluationError(f"{meta_path}: no {key!r}")
    if not (task / "labelvocabulary.csv").is_file():
        raise EvaluationError(f"{task / 'labelvocabulary.csv'}: missing")
    vocabulary = read_vocabulary(task)
    event = meta["embedding_type"] == "event"
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
        data = _read_json(split_json)
        if not isinstance(data, dict):
            raise EvaluationError(f"{split_json}: expected {{file name: labels}}")
        # hear-eval-kit looks labels up only after the embeddings and the predictor's
        # training, and then fails with a bare KeyError: check them all first.
        for name, target in data.items():
            for label in _target_labels(split_json, name, target, event):
                if str(label) not in vocabulary:
                    raise EvaluationError(
                        f"{task}: {split_json.name}: label {str(label)!r} of {name} (split "
                        f"{split!r}) is not in labelvocabulary.csv ({len(vocabulary)} labels: "
                        f"{', '.join(sorted(vocabulary)[:8])}"
                        f"{', ...' if len(vocabulary) > 8 else ''})")
        for name in data:
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


def check_model_options(module: str, options: dict[str, Any]) -> None:
    """Refuse options the module's ``load_model`` does not take (hear-eval-kit passes them as
    keywords after the model path), and values mwmae's module would refuse later."""
    import importlib
    import inspect

    try:
        load = importlib.import_module(module).load_model
    except ImportError as e:
        raise EvaluationError(f"--module {module}: cannot import it ({e})") from e
    except AttributeError as e:
        raise EvaluationError(f"--module {module}: no load_model; not a HEAR module") from e
    params = list(inspect.signature(load).parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        # The first parameter receives the model path.
        known = sorted(p.name for p in named[1:])
        for key in sorted(options):
            if key not in known:
                raise EvaluationError(f"--model-options: unknown key {key!r}; {module}'s "
                                      f"load_model takes {', '.join(known) or 'none'}")
    from mwmae.hear import module as ours

    if load is ours.load_model:
        try:
            ours.check_options(**options)
        except ValueError as e:
            raise EvaluationError(f"--model-options: {e}") from e


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


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """A reader (or a rerun after a crash) sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out(out_dir: pathlib.Path, inputs: Sequence[tuple[str, str]],
              compare: Sequence[str] = ()) -> None:
    """Refuse (before anything is written) an ``--out`` that is, holds or lies inside one of
    the ``inputs`` (``(flag, path)``), that is a folder of other files, or whose results file
    is one of the ``compare`` files."""
    mine = os.path.realpath(out_dir)

    def refuse(problem: str) -> EvaluationError:
        return EvaluationError(f"--out {out_dir}{problem}. Nothing was written.")

    for flag, path in inputs:
        theirs = os.path.realpath(path)
        if mine == theirs:
            raise refuse(f" is the {flag}; evaluation outputs would mix with its files")
        if _inside(mine, theirs):
            raise refuse(f" lies inside the {flag} {path}; write the evaluation elsewhere")
        if _inside(theirs, mine):
            raise refuse(f": the {flag} {path} lies inside it; write the evaluation elsewhere")
    for path in compare:
        if path.startswith(compare_lib.PUBLISHED):
            continue
        if os.path.realpath(path) == os.path.join(mine, RESULTS[0]):
            raise refuse(f": --compare {path} is this run's own output; compare with another "
                         "run's results")
    if out_dir.exists() and not out_dir.is_dir():
        raise refuse(": exists and is a file, not a folder")
    if out_dir.is_dir() and not (out_dir / FINGERPRINT).exists():
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUTS
                       and not p.name.startswith("."))
        if other:
            shown = ", ".join(other[:5]) + (", ..." if len(other) > 5 else "")
            raise refuse(f": holds other files ({shown}), not an evaluation's output folder; "
                         "choose a new or empty folder (--overwrite replaces only an "
                         "evaluation's outputs)")


def _finished(out_dir: pathlib.Path, module: str, task_names: Sequence[str] | None = None, *,
              embeddings: bool = True) -> list[pathlib.Path]:
    """The finished outputs in ``out_dir`` (of ``task_names`` only, if given): results files,
    done embeddings (with ``embeddings``) and predictor scores; what a fresh start would lose."""
    names = ["*"] if task_names is None else list(task_names)
    found = [out_dir / n for n in RESULTS if (out_dir / n).exists()]
    for name in names:
        if embeddings:
            found += (out_dir / "embeddings").glob(f"*/{name}/.done.embeddings")
        found += (out_dir / "predictions").glob(f"seed_*/{name}/test.predicted-scores.json")
    return found


def _describe(stamp: Any) -> str:
    if not isinstance(stamp, dict):
        return "an unknown artifact"
    weights = stamp.get("weights")
    what = f"weights {weights[:16]}..." if isinstance(weights, str) else "other weights"
    return f"{stamp['artifact']} ({what})" if stamp.get("artifact") else what


def _claim(out_dir: pathlib.Path, stamp: dict[str, Any], tasks: Sequence[pathlib.Path],
           module: str, *, overwrite: bool, log=print) -> None:
    """Make ``out_dir`` this run's: keep what was made from the same artifact, settings and
    tasks (resume); refuse to drop finished outputs of another artifact, other settings or an
    earlier version of a task unless ``overwrite``, which removes exactly the outputs that no
    longer apply. Call with the lock held."""
    path = out_dir / FINGERPRINT
    same = lambda a, b, keys: all(a.get(k) == b.get(k) for k in keys)  # noqa: E731
    old: Any = None
    problem, scope = "", ""  # scope: "all", "predictions" or "tasks"
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            problem, scope = (f"its {FINGERPRINT} is unreadable ({e}), so its results are of "
                              "unknown origin"), "all"
    elif _finished(out_dir, module):
        problem, scope = (f"it holds results but no {FINGERPRINT}, so they are of unknown "
                          "origin"), "all"
    changed = [t for t in tasks
               if (done := out_dir / "embeddings" / module / t.name / ".done.embeddings").exists()
               and done.read_text() != task_fingerprint(t)]
    if isinstance(old, dict):
        if not same(old, stamp, ("weights", "module", "model_options")):
            problem, scope = ("it holds results of another artifact or options: "
                              f"{_describe(old)}"), "all"
            if old.get("model_options") != stamp["model_options"]:
                problem += f", model options {old.get('model_options')}"
            if old.get("module") != stamp["module"]:
                problem += f", module {old.get('module')}"
        elif not same(old, stamp, ("predictor",)):
            problem, scope = ("it holds results made with other predictor settings "
                              f"({old.get('predictor', 'not recorded')}; this run: "
                              f"{stamp['predictor']})"), "predictions"
        elif changed:
            problem, scope = (f"task {changed[0]} changed since its embeddings there were "
                              f"made ({len(changed)} task(s) changed)"), "tasks"
    if scope:
        doomed = _finished(out_dir, module, [t.name for t in changed] if scope == "tasks"
                           else None, embeddings=scope != "predictions")
        if doomed and not overwrite:
            raise EvaluationError(f"--out {out_dir}: {problem}. Nothing was changed. Use "
                                  "another --out, or pass --overwrite to replace those results.")
        if doomed:
            log(f"{out_dir}: {problem}; --overwrite: evaluating afresh")
        for name in RESULTS:
            (out_dir / name).unlink(missing_ok=True)
        _remove_logs(out_dir, [t.name for t in changed] if scope == "tasks" else None,
                     embeddings=scope != "predictions")
        if scope == "tasks":
            for task in changed:
                shutil.rmtree(out_dir / "embeddings" / module / task.name)
                for seed_dir in (out_dir / "predictions").glob("seed_*"):
                    shutil.rmtree(seed_dir / task.name, ignore_errors=True)
        else:
            shutil.rmtree(out_dir / "predictions", ignore_errors=True)
            if scope == "all":
                shutil.rmtree(out_dir / "embeddings", ignore_errors=True)
    _write_atomic(path, json.dumps(stamp, indent=1))
    manifest.record_file(out_dir, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _holder_text(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, (int, float)) else "an unknown time")
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {when}"


@contextlib.contextmanager
def out_lock(out_dir: pathlib.Path, log: Callable[[str], Any] = print) -> Iterator[None]:
    """Hold ``out_dir``'s lock while the block runs: ``OUT/evaluate.lock`` with this process's
    pid, host and start time, under an exclusive ``flock``. Another holder is refused
    (EvaluationError naming it); a lock file left by a process that is no longer running on
    this host is taken over (said through ``log``); one left from another host, whose
    processes cannot be checked from here, is refused with how to clear it."""
    import fcntl

    path = out_dir / LOCK_FILE
    host = socket.gethostname()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise EvaluationError(
                f"--out {out_dir}: another evaluation is writing here ({_holder_text(holder)}; "
                f"lock {path}); wait for it to finish or choose another --out") from None
        try:
            # A holder that finished removed the file between our open and our lock: lock the
            # file that is there now instead.
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        holder = _read_holder(fd)
        if holder:
            pid = holder.get("pid")
            if holder.get("host") != host:
                raise EvaluationError(
                    f"--out {out_dir}: locked by {_holder_text(holder)} (lock {path}); that "
                    "host's processes cannot be checked from here: if that evaluation is no "
                    "longer running, remove the lock file and rerun")
            if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                raise EvaluationError(
                    f"--out {out_dir}: another evaluation is writing here "
                    f"({_holder_text(holder)}; lock {path}); wait for it to finish or choose "
                    "another --out")
            log(f"{path}: taking over the lock of {_holder_text(holder)}, which is no longer "
                "running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}
                                 ).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}
    return holder if isinstance(holder, dict) else {"pid": "?", "host": "?"}


def embed_tasks(module: str, artifact: str, tasks: Sequence[pathlib.Path],
                embeddings_dir: pathlib.Path, model_options: dict[str, Any],
                log: Callable[[str], Any] = print) -> dict[str, pathlib.Path]:
    """hear-eval-kit's embedding step for each task; returns {task name: embedding dir}.
    What it prints goes to ``OUT/logs/embeddings-TASK.log`` (``OUT``: ``embeddings_dir``'s
    parent); the first task embedded holds the imports and the model's loading too."""
    out: dict[str, pathlib.Path] = {}
    embedding = None
    for task in tasks:
        embed_dir = embeddings_dir / module / task.name
        out[task.name] = embed_dir
        done = embed_dir / ".done.embeddings"
        if done.exists():
            log(f"embeddings for {task.name}: already done ({embed_dir})")
            continue
        manifest.remove(embed_dir)
        with output_to(step_log(embeddings_dir.parent, task.name),
                       f"embeddings for {task.name}"):
            # Imported here: TensorFlow and JAX announce themselves on stderr.
            from heareval.embeddings.task_embeddings import Embedding, task_embeddings

            if embedding is None:
                embedding = Embedding(module, artifact, model_options)
            start = time.time()
            task_embeddings(embedding, task, embed_dir)
            seconds = time.time() - start
        (embed_dir / "profile.embeddings.json").write_text(json.dumps(
            {"time_elapsed": seconds, "module": module, "artifact": artifact}, indent=1))
        done.write_text(task_fingerprint(task))
        # The folder's top level is what the predictor reads; the per-split folders of
        # per-clip files are hear-eval-kit's intermediates, read only while this step runs.
        manifest.record(embeddings_dir.parent, embed_dir, recursive=False)
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
    """hear-eval-kit's predictor with ``seed`` instead of its constant, event tasks working
    under Lightning 1.9, label pickles read as plain data only, and a Ctrl-C that stops it."""
    import pickle
    import types

    import pytorch_lightning as pl
    from heareval.predictions import task_predictions as tp

    # The predictor unpickles the labels it finds beside the embeddings: a loader that builds
    # lists, strings and numbers only, so that no file there can make it run code.
    original_pickle = tp.pickle
    tp.pickle = types.SimpleNamespace(**{**vars(pickle), "load": manifest.load_plain_pickle})
    original_steps = tp.task_predictions_train, tp.task_predictions_test
    # A Ctrl-C that Lightning caught in one grid point's training stops the whole predictor.
    tp.task_predictions_train, tp.task_predictions_test = (
        interrupt.interruptible(step) for step in original_steps)

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
        tp.pickle = original_pickle
        tp.task_predictions_train, tp.task_predictions_test = original_steps


def primary_score(scores: dict[str, Any]) -> float:
    """The predictor's primary test score (the task's first metric), over folds if k-fold."""
    if "aggregated_scores" in scores:
        return float(scores["aggregated_scores"]["test_score_mean"])
    folds = [v for v in scores.values() if isinstance(v, dict) and "test_score" in v]
    if not folds:
        raise EvaluationError(f"no test_score in predictor output: keys {sorted(scores)}")
    return float(statistics.fmean(f["test_score"] for f in folds))


def predict_task(embed_dir: pathlib.Path, work: pathlib.Path, seed: int, *, grid: str,
                 grid_points: int, log: Callable[[str], Any] = print) -> float:
    """hear-eval-kit's predictor on one task's embeddings with one seed; the primary score.
    ``work`` is ``OUT/predictions/seed_S/TASK``; what the predictor prints goes to
    ``OUT/logs/predictions-TASK-seed_S.log``."""
    import logging

    scores_file = work / "test.predicted-scores.json"
    done = scores_file.exists()
    if not done:
        # Whatever an earlier, unfinished try left (or anyone put) here is not read.
        manifest.remove(work)
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
            with interrupt.claims_nothing_if_interrupted(scores_file), output_to(
                    step_log(work.parents[2], work.name, seed),
                    f"predictions for {work.name}, seed {seed}"):
                # Imported here: Lightning warns on stderr as it loads.
                import torch
                from heareval.predictions.task_predictions import task_predictions

                with _predictor_seed(seed):
                    task_predictions(
                        embedding_path=work.resolve(), embedding_size=sizes.pop(),
                        grid_points=grid_points,
                        gpus=[0] if torch.cuda.is_available() else None,
                        in_memory=True, deterministic=True, grid=grid, logger=logger)
        finally:
            logger.removeHandler(handler)
            handler.close()
        manifest.record(work.parents[2], work)
    score = primary_score(json.loads(scores_file.read_text()))
    log(f"predictions for {work.name}, seed {seed}: {score:.4f}"
        + (" (already done)" if done else ""))
    return score


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
    return task_labels()


def _check_model(artifact: str, module: str, backend: str | None = None) -> None:
    """A model the module will load, checked before the slow imports and the tasks' audio."""
    path = pathlib.Path(artifact)
    if not path.is_dir():
        raise EvaluationError(f"{artifact}: artifact directory not found")
    if module in ("mwmae.hear", "hear_mwmae"):
        from mwmae.hear.module import default_backend

        if (backend or default_backend()) == "torch":
            import mwmae.torch

            try:
                mwmae.torch.load(path)
            except (ValueError, FileNotFoundError) as e:
                raise EvaluationError(str(e)) from e
            return
    from mwmae.artifact import ArtifactError, has_weights_file, is_artifact, load_artifact

    try:
        if is_artifact(path) or has_weights_file(path):
            load_artifact(path)
        elif module in ("mwmae.hear", "hear_mwmae"):
            import mwmae

            mwmae.load(path)  # an original checkpoint or a training workdir
    except (ArtifactError, ValueError, FileNotFoundError) as e:
        raise EvaluationError(str(e)) from e


class _Progress:
    """A bar over the predictor runs on the terminal: on a copy of fd 2 taken before any step
    sends fds 1 and 2 to its log. Lines logged through it are printed above the bar."""

    def __init__(self, total: int, log: Callable[[str], Any]):
        import weakref

        from tqdm import tqdm

        class Bar(tqdm):
            # Bars of its own: tqdm would give hear-eval-kit's bars (in the logs) the line
            # below this one, which fills the logs with blank lines and cursor movements.
            _instances = weakref.WeakSet()

        self._log = log
        self._closed = False
        self._stream = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
        self._bar = Bar(total=total, desc="HEAR", unit="seed", file=self._stream,
                        dynamic_ncols=True, leave=True)

    def log(self, text: str) -> None:
        if self._closed:
            self._log(text)
            return
        self._bar.clear()
        self._log(text)
        _flush_output()
        self._bar.refresh()

    def doing(self, what: str) -> None:
        self._bar.set_postfix_str(what)

    def done(self) -> None:
        self._bar.update()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bar.set_postfix_str("", refresh=False)
            self._bar.close()
            self._stream.close()


def evaluate(artifact: str, tasks_dir: str, out: str, *, seeds: int = 10, grid: str = "default",
             grid_points: int = 8, task_names: Sequence[str] | None = None,
             module: str = "mwmae.hear", model_options: dict[str, Any] | None = None,
             name: str | None = None, compare: Sequence[str] = (), overwrite: bool = False,
             log: Callable[[str], Any] = print, progress: bool = False) -> dict[str, Any]:
    """Embeddings once, predictions per seed, summary (and the comparison with ``compare``'s
    results files); returns what results.json holds.

    Every input is checked before anything is written; ``out`` follows the rules of the module
    docstring (``overwrite`` replaces another run's results there). What hear-eval-kit prints
    goes to the log files of ``OUT/logs``; ``log`` gets this module's lines, and ``progress``
    adds a bar over tasks x seeds on the terminal (stderr). A step that raises is re-raised as
    :class:`StepFailed`."""
    if seeds < 1:
        raise EvaluationError(f"--seeds must be >= 1, got {seeds}")
    if grid_points < 1:
        raise EvaluationError(f"--grid-points must be >= 1, got {grid_points}")
    if grid not in GRIDS:
        raise EvaluationError(f"--grid {grid!r}: expected one of {GRIDS}")
    model_options = dict(model_options or {})
    out_dir = pathlib.Path(out)
    check_out(out_dir, [("--artifact", artifact), ("--tasks-dir", tasks_dir)], compare)
    # Read the files to compare with first: a typo there should not cost an evaluation.
    try:
        others = [m for path in compare for m in compare_lib.load(path)]
    except compare_lib.ComparisonError as e:
        raise EvaluationError(str(e)) from e
    check_model_options(module, model_options)
    # heareval's predictor reloads its own Lightning checkpoints, which torch >= 2.6 refuses
    # under weights_only (the files are this run's own).
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    tasks = find_tasks(pathlib.Path(tasks_dir), task_names)
    if others:
        # Known now, not after the evaluation: whether the comparison can be made at all.
        planned = compare_lib.Model(name or "this run", {t.name: compare_lib.Score(0.0)
                                                         for t in tasks}, tasks_dir,
                                    file=tasks_dir)
        try:
            compare_lib.require_common_tasks([planned, *others])
        except compare_lib.ComparisonError as e:
            raise EvaluationError(f"--compare: {e}") from e
    _check_model(artifact, module, model_options.get("backend"))
    stamp = {**artifact_fingerprint(artifact, module, model_options),
             "predictor": {"grid": grid, "grid_points": grid_points},
             "artifact": str(pathlib.Path(artifact).resolve())}
    digest = stamp["weights"] if isinstance(stamp["weights"], str) else None
    out_dir.mkdir(parents=True, exist_ok=True)
    with out_lock(out_dir, log=log), interrupt.noting_interrupts():
        _claim(out_dir, stamp, tasks, module, overwrite=overwrite, log=log)
        manifest.discard_unverified(out_dir, module, [t.name for t in tasks], log=log)
        bar = _Progress(len(tasks) * seeds, log) if progress else None
        try:
            return _run(artifact, tasks, out_dir, seeds=seeds, grid=grid,
                        grid_points=grid_points, module=module, model_options=model_options,
                        name=name, others=others, log=bar.log if bar else log, bar=bar,
                        digest=digest)
        finally:
            if bar:
                bar.close()


def _run(artifact: str, tasks: Sequence[pathlib.Path], out_dir: pathlib.Path, *, seeds: int,
         grid: str, grid_points: int, module: str, model_options: dict[str, Any],
         name: str | None, others: Sequence[compare_lib.Model], log: Callable[[str], Any] = print,
         bar: _Progress | None = None, digest: str | None = None) -> dict[str, Any]:
    log(f"hear-eval-kit's output, per task and seed: {out_dir / LOGS}{os.sep}")
    if bar:
        bar.doing("embeddings")
    embed_dirs = embed_tasks(module, artifact, tasks, out_dir / "embeddings", model_options,
                             log=log)
    scores: dict[str, list[float]] = {}
    metrics: dict[str, str] = {}
    for task in tasks:
        meta = json.loads((task / "task_metadata.json").read_text())
        metrics[task.name] = meta["evaluation"][0]
        scores[task.name] = []
        for s in range(seeds):
            if bar:
                bar.doing(f"{task.name} seed {s}")
            scores[task.name].append(predict_task(
                embed_dirs[task.name], out_dir / "predictions" / f"seed_{s}" / task.name, s,
                grid=grid, grid_points=grid_points, log=log))
            if bar:
                bar.done()
    if bar:
        bar.close()
    summary = summarise(scores, metrics)
    name = name or pathlib.Path(artifact).resolve().name
    # The weights' digest is the model's identity: names repeat (every export is "export").
    result = {"name": name, "artifact": str(pathlib.Path(artifact).resolve()),
              "params_sha256": digest, "module": module,
              "grid": grid, "grid_points": grid_points, "seeds": list(range(seeds)),
              "model_options": model_options, "tasks": summary}
    result["mean_score"] = statistics.fmean(s["mean"] for s in summary.values()) * 100
    table = markdown_table(summary, f"HEAR ({grid} grid, {seeds} seed(s)): {name}")
    if others:
        this = compare_lib.from_results(result, str(out_dir / "results.json"))
        try:
            side_by_side = compare_lib.table(this, others, _labels())
        except compare_lib.ComparisonError as e:
            raise EvaluationError(str(e)) from e
        result["overall_score"] = compare_lib.overall_scores([this, *others])
        _write_atomic(out_dir / "comparison.md", side_by_side)
        table += "\n" + side_by_side
    _write_atomic(out_dir / "results.json", json.dumps(result, indent=1))
    _write_atomic(out_dir / "results.md", table)
    manifest.record_file(out_dir, *(out_dir / n for n in RESULTS if (out_dir / n).exists()))
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
    p.add_argument("--backend", choices=("jax", "torch"), default=None,
                   help="mwmae's module only: compute embeddings with JAX or PyTorch (default: "
                        "JAX where installed, else PyTorch); same as --model-options "
                        "'{\"backend\": ...}'")
    p.add_argument("--name", default=None,
                   help="this model's name in the tables (default: the artifact's folder name)")
    p.add_argument("--compare", action="append", default=[], metavar="RESULTS.json",
                   help="results file to put beside this run (another run's results.json or "
                        "a table of published numbers; see mwmae.hear.compare), or "
                        "published:KEY for a table shipped with mwmae (published:"
                        "mwmae-b-4x16-4l: the paper's MW-MAE-B-4x16-4l); repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds from another artifact, other settings or an "
                        "earlier version of a task (without it such an --out is refused)")
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
    if a.backend is not None:
        if a.module not in ("mwmae.hear", "hear_mwmae"):
            print(f"error: --backend applies to mwmae's module, not --module {a.module}",
                  file=sys.stderr)
            return 2
        if options.setdefault("backend", a.backend) != a.backend:
            print(f"error: --backend {a.backend} and --model-options backend "
                  f"{options['backend']!r} disagree", file=sys.stderr)
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
                 module=a.module, model_options=options, name=a.name, compare=a.compare,
                 overwrite=a.overwrite, progress=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except StepFailed as e:
        print(f"{e.log_file}, its last {len(e.tail)} lines:", file=sys.stderr)
        for line in e.tail:
            print(f"  {line}", file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (EvaluationError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {a.out}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
