"""HEAR evaluation, comparison and task tools: bad inputs are refused before any embedding, an
output folder never mixes or loses another run's results, two evaluations never write one folder
at once. The embedding and predictor steps are replaced by fast stand-ins where a test is about
what happens around them (tests/test_hear_eval.py runs them for real)."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_helpers import load_config

from mwmae.artifact import save_artifact
from mwmae.hear import compare, manifest, tasks
from mwmae.hear import evaluate as ev
from mwmae.model import param_shapes
from mwmae.train.config import model_config_from

REPO = pathlib.Path(__file__).resolve().parents[1]


def _artifact(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A tiny encoder-only artifact of random weights (numpy: no compilation, these tests
    never run the model)."""
    config = model_config_from(load_config("tiny"))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          param_shapes(config, encoder_only=True))
    save_artifact(path, config, params, encoder_only=True)
    return path


def _last_err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


@pytest.fixture
def no_embedding(monkeypatch):
    """Fails the test if an evaluation gets as far as embedding."""
    def embed(*args, **kwargs):
        raise AssertionError("embeddings started before the inputs were checked")

    monkeypatch.setattr(ev, "embed_tasks", embed)


@pytest.fixture
def fast_steps(monkeypatch):
    """Stand-ins for hear-eval-kit's steps: a done marker per task, a score per seed. They
    write where the real ones do and record what they wrote in the manifest as they do, so
    what the driver keeps or removes can be seen."""
    calls: list[tuple[str, str]] = []

    def embed(module, artifact, task_list, embeddings_dir, model_options, log=print):
        out = {}
        for task in task_list:
            d = embeddings_dir / module / task.name
            d.mkdir(parents=True, exist_ok=True)
            done = d / ".done.embeddings"
            if not done.exists():
                calls.append(("embed", task.name))
                done.write_text(ev.task_fingerprint(task))
                manifest.record(embeddings_dir.parent, d, recursive=False)
            out[task.name] = d
        return out

    def predict(embed_dir, work, seed, *, grid, grid_points, log=print):
        work.mkdir(parents=True, exist_ok=True)
        scores = work / "test.predicted-scores.json"
        if not scores.exists():
            calls.append(("predict", f"{work.name}/{seed}"))
            scores.write_text(json.dumps({"test": {"test_score": 0.5 + seed / 100}}))
            manifest.record(work.parents[2], work)
        return ev.primary_score(json.loads(scores.read_text()))

    monkeypatch.setattr(ev, "embed_tasks", embed)
    monkeypatch.setattr(ev, "predict_task", predict)
    return calls


@pytest.fixture
def task_dir(tmp_path) -> pathlib.Path:
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=0.5)
    return tmp_path / "tasks"


def _args(art, tasks_dir, out, *extra) -> list[str]:
    return ["--artifact", str(art), "--tasks-dir", str(tasks_dir), "--out", str(out),
            "--seeds", "2", "--grid", "faster", "--grid-points", "1", *extra]


# ---- labels and options checked before any embedding ------------------------------------------

def test_a_test_label_missing_from_the_vocabulary_is_refused_before_embedding(
        tmp_path, task_dir, capsys, no_embedding):
    art = _artifact(tmp_path / "art")
    task = task_dir / "mwmae_noise"
    test = json.loads((task / "test.json").read_text())
    first = sorted(test)[0]
    test[first] = ["purple"]
    (task / "test.json").write_text(json.dumps(test))
    assert ev.main(_args(art, task_dir, tmp_path / "out")) == 2
    last = _last_err(capsys)
    assert str(task) in last and "test.json" in last and "'purple'" in last, last
    assert "split 'test'" in last and "labelvocabulary.csv" in last and first in last, last
    assert not (tmp_path / "out").exists()


def test_an_event_label_missing_from_the_vocabulary_is_refused(tmp_path):
    task = tasks.make_task(tmp_path / "tasks", "events", per_class=5, duration_s=1.0)
    valid = json.loads((task / "valid.json").read_text())
    name = sorted(valid)[0]
    valid[name][0]["label"] = "middle"
    (task / "valid.json").write_text(json.dumps(valid))
    with pytest.raises(ev.EvaluationError, match=r"valid\.json.*'middle'.*split 'valid'"):
        ev.check_task(task)


def test_a_malformed_vocabulary_is_refused(tmp_path):
    task = tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=0.5)
    vocab = task / "labelvocabulary.csv"
    vocab.write_text("index,name\n0,white\n")
    with pytest.raises(ev.EvaluationError, match="labelvocabulary.csv: expected the columns"):
        ev.check_task(task)
    vocab.write_text("idx,label\n0,white\n1,white\n2,pink\n3,brown\n4,blue\n")
    with pytest.raises(ev.EvaluationError, match="'white' is listed twice"):
        ev.check_task(task)


@pytest.mark.parametrize("options, message", [
    ('{"dtyp": "bfloat16"}', "unknown key 'dtyp'; mwmae.hear's load_model takes "
                             "backend, batch_size, dtype"),
    ('{"dtype": "float16"}', "dtype 'float16'"),
    ('{"batch_size": 0}', "batch_size 0"),
    ('{"batch_size": "8"}', "batch_size '8'"),
])
def test_bad_model_options_are_one_line(tmp_path, task_dir, capsys, no_embedding, options,
                                        message):
    art = _artifact(tmp_path / "art")
    assert ev.main(_args(art, task_dir, tmp_path / "out", "--model-options", options)) == 2
    last = _last_err(capsys)
    assert last.startswith("error: --model-options") and message in last, last
    assert not (tmp_path / "out").exists()


def test_the_hear_module_refuses_bad_options_itself(tmp_path):
    """What hear-eval-kit's own runner passes on from its --model-options."""
    from mwmae.hear import module

    art = _artifact(tmp_path / "art")
    with pytest.raises(ValueError, match="batch_size 0: expected a whole number >= 1"):
        module.load_model(str(art), batch_size=0)
    with pytest.raises(ValueError, match="unknown key 'dtyp'; mwmae.hear's load_model takes "
                                         "backend, batch_size, dtype"):
        module.load_model(str(art), dtyp="bfloat16")


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--seeds", "-3"], "--seeds must be >= 1"),
    (["--grid-points", "0"], "--grid-points must be >= 1"),
    (["--grid-points", "-1"], "--grid-points must be >= 1"),
])
def test_odd_numbers_are_refused(tmp_path, task_dir, capsys, no_embedding, flags, message):
    art = _artifact(tmp_path / "art")
    assert ev.main(_args(art, task_dir, tmp_path / "out") + flags) == 2
    assert message in _last_err(capsys)
    assert not (tmp_path / "out").exists()


# ---- the output folder -----------------------------------------------------------------------

def test_another_artifact_into_an_out_is_refused_unless_overwrite(tmp_path, task_dir, capsys,
                                                                  fast_steps):
    a, b = _artifact(tmp_path / "a", seed=0), _artifact(tmp_path / "b", seed=1)
    out = tmp_path / "out"
    assert ev.main(_args(a, task_dir, out)) == 0
    kept = _snapshot(out)
    assert json.loads((out / "results.json").read_text())["name"] == "a"
    capsys.readouterr()
    assert ev.main(_args(b, task_dir, out)) == 2
    last = _last_err(capsys)
    assert last.startswith(f"error: --out {out}") and "another artifact" in last, last
    assert str(a) in last and "--overwrite" in last, last
    assert _snapshot(out) == kept
    # Same artifact, other predictor settings: the predictions would mix.
    assert ev.main(_args(a, task_dir, out)[:-1] + ["2"]) == 2
    assert "grid_points" in _last_err(capsys)
    assert _snapshot(out) == kept
    # Same artifact and settings: resumed, nothing recomputed.
    fast_steps.clear()
    assert ev.main(_args(a, task_dir, out)) == 0
    assert fast_steps == []
    # An explicit --overwrite starts afresh.
    assert ev.main(_args(b, task_dir, out, "--overwrite")) == 0
    assert json.loads((out / "results.json").read_text())["name"] == "b"
    assert ("embed", "mwmae_noise") in fast_steps
    assert json.loads((out / "fingerprint.json").read_text())["weights"] == json.loads(
        (b / "config.json").read_text())["params_sha256"]


def test_a_changed_task_needs_overwrite(tmp_path, task_dir, capsys, fast_steps):
    art = _artifact(tmp_path / "a")
    out = tmp_path / "out"
    assert ev.main(_args(art, task_dir, out)) == 0
    kept = _snapshot(out)
    tasks.make_task(task_dir, "noise", per_class=6, duration_s=0.5, seed=5, overwrite=True)
    assert ev.main(_args(art, task_dir, out)) == 2
    last = _last_err(capsys)
    assert "mwmae_noise" in last and "changed" in last and "--overwrite" in last, last
    assert _snapshot(out) == kept
    fast_steps.clear()
    assert ev.main(_args(art, task_dir, out, "--overwrite")) == 0
    assert ("embed", "mwmae_noise") in fast_steps


def test_an_out_of_unknown_origin_or_a_corrupt_stamp(tmp_path, task_dir, capsys, fast_steps):
    art = _artifact(tmp_path / "a")
    out = tmp_path / "out"
    assert ev.main(_args(art, task_dir, out)) == 0
    (out / "fingerprint.json").write_text("{trunc")
    kept = _snapshot(out)
    assert ev.main(_args(art, task_dir, out)) == 2
    last = _last_err(capsys)
    assert "fingerprint.json" in last and "--overwrite" in last, last
    assert _snapshot(out) == kept
    assert ev.main(_args(art, task_dir, out, "--overwrite")) == 0
    assert json.loads((out / "fingerprint.json").read_text())["module"] == "mwmae.hear"


def test_outputs_pointed_at_inputs_or_other_files_are_refused(tmp_path, task_dir, capsys,
                                                              no_embedding):
    art = _artifact(tmp_path / "art")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    before = {p: _snapshot(p) for p in (art, task_dir, mine)}
    cases = [(art, "is the --artifact"), (art / "hear", "inside the --artifact"),
             (task_dir, "is the --tasks-dir"), (task_dir / "out", "inside the --tasks-dir"),
             (tmp_path, "lies inside it"), (mine, "not an evaluation's output folder")]
    for out, message in cases:
        for extra in ([], ["--overwrite"]):
            assert ev.main(_args(art, task_dir, out, *extra)) == 2, out
            last = _last_err(capsys)
            assert last.startswith(f"error: --out {out}") and message in last, last
    assert {p: _snapshot(p) for p in (art, task_dir, mine)} == before
    assert not (art / "hear").exists() and not (task_dir / "out").exists()


def test_compare_with_this_runs_own_results_is_refused(tmp_path, task_dir, capsys, fast_steps):
    art = _artifact(tmp_path / "a")
    out = tmp_path / "out"
    assert ev.main(_args(art, task_dir, out)) == 0
    assert ev.main(_args(art, task_dir, out, "--compare", str(out / "results.json"))) == 2
    assert "this run's own output" in _last_err(capsys)


# ---- one evaluation at a time per output folder ------------------------------------------------

_HOLD = """
import sys, pathlib
from mwmae.hear import evaluate as ev
with ev.out_lock(pathlib.Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_evaluation_into_a_busy_out_is_refused(tmp_path, task_dir, capsys,
                                                        fast_steps):
    art = _artifact(tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert ev.main(_args(art, task_dir, out)) == 2
        last = _last_err(capsys)
        assert f"pid {holder.pid}" in last and socket.gethostname() in last, last
        assert "another evaluation is writing" in last and "evaluate.lock" in last, last
        assert fast_steps == [] and not (out / "results.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (out / "evaluate.lock").exists()
    assert ev.main(_args(art, task_dir, out)) == 0
    assert not (out / "evaluate.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, task_dir, capsys, fast_steps):
    art = _artifact(tmp_path / "a")
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60}
    (out / "evaluate.lock").write_text(json.dumps(lock))
    assert ev.main(_args(art, task_dir, out)) == 0
    printed = capsys.readouterr().out
    assert f"pid {dead.pid}" in printed and "no longer running" in printed, printed
    assert json.loads((out / "results.json").read_text())["name"] == "a"
    # A holder on another host cannot be checked from here: refused, with how to clear it.
    (out / "evaluate.lock").write_text(json.dumps({**lock, "host": "elsewhere"}))
    assert ev.main(_args(art, task_dir, out)) == 2
    last = _last_err(capsys)
    assert "host elsewhere" in last and "remove" in last and "evaluate.lock" in last, last


# ---- compare ---------------------------------------------------------------------------------

def _results(path: pathlib.Path, name: str, mean: float) -> pathlib.Path:
    path.write_text(json.dumps({"name": name, "tasks": {"t": {"mean": mean, "ci95": 0.01}}}))
    return path


def test_compare_never_writes_over_a_results_file(tmp_path, capsys):
    a = _results(tmp_path / "a.json", "a", 0.6)
    b = _results(tmp_path / "b.json", "b", 0.7)
    c = _results(tmp_path / "c.json", "c", 0.8)
    kept = {p: p.read_bytes() for p in (a, b, c)}
    for out, message in ((a, "is one of the results files"), (c, "holds results"),
                         (tmp_path, "is a folder")):
        assert compare.main([str(a), str(b), "--out", str(out)]) == 2
        last = _last_err(capsys)
        assert last.startswith(f"error: --out {out}") and message in last, last
    assert {p: p.read_bytes() for p in (a, b, c)} == kept
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "table.md")]) == 0
    assert "| t |" in (tmp_path / "table.md").read_text()
    # The table a previous compare wrote is its own to replace.
    assert compare.main([str(b), str(a), "--out", str(tmp_path / "table.md")]) == 0
    assert (tmp_path / "table.md").read_text().startswith("| task | b | a |")


# ---- synthetic tasks -------------------------------------------------------------------------

def test_tasks_rerun_is_kept_other_settings_need_overwrite(tmp_path, capsys):
    root = tmp_path / "tasks"
    assert tasks.main([str(root), "--kind", "noise", "--per-class", "5", "--duration",
                       "0.5"]) == 0
    task = root / "mwmae_noise"
    first = _snapshot(task)
    # The same settings again (a rerun of the demo): nothing to do.
    assert tasks.main([str(root), "--kind", "noise", "--per-class", "5", "--duration",
                       "0.5"]) == 0
    assert "already" in capsys.readouterr().out and _snapshot(task) == first
    assert tasks.main([str(root), "--kind", "noise", "--per-class", "6", "--duration",
                       "0.5"]) == 2
    last = _last_err(capsys)
    assert str(task) in last and "--overwrite" in last, last
    assert _snapshot(task) == first
    assert tasks.main([str(root), "--kind", "noise", "--per-class", "6", "--duration", "0.5",
                       "--overwrite"]) == 0
    train = json.loads((task / "train.json").read_text())
    assert len(train) == 4 * 4
    assert sorted(p.name for p in (task / "16000" / "train").iterdir()) == sorted(train)
    assert sorted(p.name for p in root.iterdir()) == ["mwmae_noise"]
    # A folder this tool did not write is never replaced.
    other = root / "real_task"
    other.mkdir()
    (other / "task_metadata.json").write_text('{"task_name": "real"}')
    assert tasks.main([str(root), "--kind", "noise", "--per-class", "5", "--name", "real_task",
                       "--overwrite"]) == 2
    assert "not a task this tool wrote" in _last_err(capsys)
    assert (other / "task_metadata.json").read_text() == '{"task_name": "real"}'


@pytest.mark.parametrize("flags, message", [
    (["--per-class", "0"], "--per-class 0"),
    (["--duration", "0"], "--duration 0"),
    (["--duration", "-1"], "--duration -1"),
    (["--seed", "-1"], "--seed -1"),
    (["--name", "../escape"], "--name '../escape'"),
])
def test_tasks_odd_flags_are_one_line(tmp_path, capsys, flags, message):
    assert tasks.main([str(tmp_path / "tasks"), "--kind", "noise", *flags]) == 2
    last = _last_err(capsys)
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "tasks").exists() and not (tmp_path / "escape").exists()


def test_tasks_are_not_written_into_an_artifact_or_an_evaluation(tmp_path, capsys):
    art = _artifact(tmp_path / "art")
    assert tasks.main([str(art), "--kind", "noise", "--per-class", "5"]) == 2
    assert "is an mwmae artifact" in _last_err(capsys)
    assert sorted(p.name for p in art.iterdir()) == ["config.json", "model.safetensors"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "fingerprint.json").write_text("{}")
    assert tasks.main([str(out), "--kind", "noise", "--per-class", "5"]) == 2
    assert "is an evaluation's output folder" in _last_err(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["fingerprint.json"]
