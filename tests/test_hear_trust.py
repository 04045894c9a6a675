"""What a HEAR evaluation may read back from its output folder (only what it wrote, by digest),
how results name their models (by the weights' digest, so two models of one name never merge),
and the comparison's and the driver's edges: short refusals, bad intervals, an --out that is an
evaluation's own file, Ctrl-C."""

import json
import os
import pathlib
import pickle
import signal
import time

import jax
import numpy as np
import pytest
from train_helpers import load_config

from mwmae.artifact import save_artifact
from mwmae.hear import compare, manifest, tasks
from mwmae.hear import evaluate as ev
from mwmae.model import init_params, param_shapes
from mwmae.train.config import model_config_from

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
TASK = "mwmae_noise"


def _artifact(path: pathlib.Path, seed: int = 0, *, real: bool = False) -> pathlib.Path:
    """A tiny encoder-only artifact: initialised weights with ``real`` (the model runs), else
    random numbers (no compilation; for tests that never run the model)."""
    config = model_config_from(load_config("tiny"))
    if real:
        params = init_params(config, jax.random.key(seed))
    else:
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                              param_shapes(config, encoder_only=True))
    save_artifact(path, config, params, encoder_only=True)
    return path


class _Touch:
    """A pickle that creates ``path`` when loaded: what a planted file could do."""

    def __init__(self, path: pathlib.Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


# ---- the output folder: only files the evaluation wrote are read back ------------------------

@pytest.mark.slow  # ~90 s: an evaluation of a tiny task, then two reruns that recompute
def test_planted_or_edited_files_in_out_are_never_loaded_and_are_recomputed(tmp_path):
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=1.0, seed=0)
    art = _artifact(tmp_path / "art", real=True)
    out = tmp_path / "out"
    logs: list[str] = []

    def run() -> dict:
        return ev.evaluate(str(art), str(tmp_path / "tasks"), str(out), seeds=1, grid="faster",
                           grid_points=1, log=logs.append)

    first = run()
    emb = out / "embeddings" / "mwmae.hear" / TASK
    work = out / "predictions" / "seed_0" / TASK
    legit = (emb / "test.target-labels.pkl").read_bytes()
    marker = tmp_path / "code-ran"

    # A seed cut short (no scores yet) in whose folder someone left a pickle of their own.
    (work / "test.predicted-scores.json").unlink()
    (work / "valid.target-labels.pkl").unlink()
    (work / "valid.target-labels.pkl").write_bytes(pickle.dumps(_Touch(marker)))
    logs.clear()
    second = run()
    assert not marker.exists()
    assert second["tasks"][TASK]["scores"] == first["tasks"][TASK]["scores"]
    assert (work / "valid.target-labels.pkl").is_symlink()

    # Finished embeddings: one pickle swapped for a malicious one, one edited with labels.
    (emb / "train.target-labels.pkl").write_bytes(pickle.dumps(_Touch(marker)))
    labels = pickle.loads(legit)
    (emb / "test.target-labels.pkl").write_bytes(pickle.dumps([labels[0]] * len(labels)))
    logs.clear()
    third = run()
    assert not marker.exists()
    warned = [line for line in logs if "recomput" in line]
    assert warned and "target-labels.pkl" in warned[0] and "not loaded" in warned[0], logs
    assert not any("already done" in line for line in logs), logs
    assert (emb / "test.target-labels.pkl").read_bytes() == legit
    assert third["tasks"][TASK]["scores"] == first["tasks"][TASK]["scores"]
    recorded = json.loads((out / manifest.MANIFEST).read_text())["files"]
    assert recorded[f"embeddings/mwmae.hear/{TASK}/train.target-labels.pkl"] == \
        manifest.sha256_file(emb / "train.target-labels.pkl")
    assert recorded[f"predictions/seed_0/{TASK}/test.predicted-scores.json"] == \
        manifest.sha256_file(work / "test.predicted-scores.json")


def test_the_predictor_unpickles_plain_data_only_even_with_a_forged_manifest(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "train.target-labels.pkl"
    evil.write_bytes(pickle.dumps(_Touch(marker)))
    plain = tmp_path / "test.target-labels.pkl"
    plain.write_bytes(pickle.dumps([["a"], ["b", "c"], [1, 2.5]]))
    from heareval.predictions import task_predictions as tp

    with ev._predictor_seed(0):
        with open(plain, "rb") as f:
            assert tp.pickle.load(f) == [["a"], ["b", "c"], [1, 2.5]]
        with open(evil, "rb") as f, pytest.raises(
                pickle.UnpicklingError, match="train.target-labels.pkl: it names io.open"):
            tp.pickle.load(f)
    assert not marker.exists()
    assert tp.pickle is pickle


def test_manifest_problems_name_the_file(tmp_path):
    out = tmp_path / "out"
    step = out / "embeddings" / "m" / "t"
    step.mkdir(parents=True)
    (step / "a.pkl").write_bytes(b"a")
    manifest.record(out, step)
    files = manifest.read(out)
    assert manifest.problem(out, files, step) is None
    (step / "b.pkl").write_bytes(b"b")
    assert manifest.problem(out, files, step) == f"{step / 'b.pkl'}: not written by this " \
                                                 "evaluation (not in manifest.json)"
    (step / "b.pkl").unlink()
    (step / "a.pkl").write_bytes(b"A")
    assert "a.pkl: changed since" in manifest.problem(out, files, step)
    (step / "a.pkl").unlink()
    assert "a.pkl: missing" in manifest.problem(out, files, step)
    (out / manifest.MANIFEST).write_text("[1]")
    with pytest.raises(manifest.ManifestError, match="manifest.json: not a manifest"):
        manifest.read(out)


# ---- identity: two models of one name stay two models ----------------------------------------

@pytest.fixture
def scored_steps(monkeypatch):
    """Stand-ins for hear-eval-kit's steps whose score is ``score[0]`` (the tests set it per
    run); they record their outputs as the real steps do."""
    score = [0.5]

    def embed(module, artifact, task_list, embeddings_dir, model_options, log=print):
        out = {}
        for task in task_list:
            d = embeddings_dir / module / task.name
            d.mkdir(parents=True, exist_ok=True)
            (d / ".done.embeddings").write_text(ev.task_fingerprint(task))
            manifest.record(embeddings_dir.parent, d, recursive=False)
            out[task.name] = d
        return out

    def predict(embed_dir, work, seed, *, grid, grid_points, log=print):
        work.mkdir(parents=True, exist_ok=True)
        (work / "test.predicted-scores.json").write_text(
            json.dumps({"test": {"test_score": score[0]}}))
        manifest.record(work.parents[2], work)
        return score[0]

    monkeypatch.setattr(ev, "embed_tasks", embed)
    monkeypatch.setattr(ev, "predict_task", predict)
    return score


def _two_runs(tmp_path: pathlib.Path, score: list[float]) -> tuple[pathlib.Path, pathlib.Path]:
    """Two evaluations of two models whose artifacts are both called ``export`` (the guides'
    WORKDIR/export); A scores 0.875, B 0.625."""
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=0.5)
    results = []
    for run, seed, value in (("A", 0, 0.875), ("B", 1, 0.625)):
        score[0] = value
        art = _artifact(tmp_path / run / "export", seed)
        ev.evaluate(str(art), str(tmp_path / "tasks"), str(tmp_path / run / "ev"), seeds=2,
                    grid="faster", grid_points=1, log=lambda _: None)
        results.append(tmp_path / run / "ev" / "results.json")
    return results[0], results[1]


def _row(text: str, first_cell: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_compare_of_two_runs_whose_artifacts_share_a_folder_name_shows_each_runs_scores(
        tmp_path, scored_steps, capsys):
    a, b = _two_runs(tmp_path, scored_steps)
    digests = [json.loads((tmp_path / r / "export" / "config.json").read_text())["params_sha256"]
               for r in "AB"]
    assert [json.loads(p.read_text())["params_sha256"] for p in (a, b)] == digests
    capsys.readouterr()
    assert compare.main([str(a), str(b)]) == 0
    text = capsys.readouterr().out
    head = _row(text, "task")
    assert head[1] == f"export ({digests[0][:8]})" and head[2] == f"export ({digests[1][:8]})"
    assert _row(text, TASK)[1:3] == ["0.8750 ± 0.0000", "0.6250 ± 0.0000"]
    assert _row(text, "**mean score**")[1:3] == ["87.5", "62.5"]
    assert _row(text, "**overall score s(m)**")[1:3] == ["100.0", "0.0"]
    assert "named export" in text  # the note says why the columns carry digests


def test_a_typed_in_table_with_the_runs_name_is_another_column(tmp_path, scored_steps, capsys):
    a, _ = _two_runs(tmp_path, scored_steps)
    table = tmp_path / "paper.json"
    table.write_text(json.dumps({"source": "a paper", "models": {"export": {TASK: 0.625}}}))
    assert compare.main([str(a), str(table)]) == 0
    text = capsys.readouterr().out
    assert _row(text, "**mean score**")[1:3] == ["87.5", "62.5"]
    head = _row(text, "task")
    assert head[1] != head[2] and head[1].startswith("export (") and "paper.json" in head[2]
    # The same through --compare: overall_score keeps both models.
    scored_steps[0] = 0.75
    result = ev.evaluate(str(tmp_path / "A" / "export"), str(tmp_path / "tasks"),
                         str(tmp_path / "C"), seeds=2, grid="faster", grid_points=1,
                         compare=[str(table)], log=lambda _: None)
    assert sorted(result["overall_score"].values()) == [0.0, 100.0]
    assert len(result["overall_score"]) == 2


def test_matrix_and_scores_keep_same_named_models_apart():
    models = [compare.Model("export", {"t": compare.Score(0.9)}, "a", digest="1" * 64),
              compare.Model("export", {"t": compare.Score(0.5)}, "b", digest="2" * 64)]
    assert compare.mean_scores(models) == {"export (11111111)": 90.0, "export (22222222)": 50.0}
    text = compare.matrix(models)
    assert _row(text, "**mean score**")[1:3] == ["90.0", "50.0"]


# ---- the comparison's edges -------------------------------------------------------------------

def _results(path: pathlib.Path, tasks_: dict[str, float], name: str = "mine") -> pathlib.Path:
    path.write_text(json.dumps({"name": name, "tasks": {
        t: {"mean": m, "ci95": 0.01} for t, m in tasks_.items()}}))
    return path


def test_no_task_in_common_is_one_short_line(tmp_path, capsys):
    mine = _results(tmp_path / "results.json", {TASK: 0.5})
    assert compare.main([str(mine), "published:mwmae-b-4x16-4l"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and len(err) < 300, err
    assert err.startswith("error: no task in common") and "published:mwmae-b-4x16-4l" in err


def test_compare_without_a_task_in_common_is_refused_before_embedding(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setattr(ev, "embed_tasks", lambda *a, **k: pytest.fail("embedded"))
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=0.5)
    art = _artifact(tmp_path / "art")
    rc = ev.main(["--artifact", str(art), "--tasks-dir", str(tmp_path / "tasks"), "--out",
                  str(tmp_path / "out"), "--seeds", "1", "--compare",
                  "published:mwmae-b-4x16-4l"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no task in common" in err and len(err) < 300, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ci", [-0.2, float("inf")])
def test_a_negative_or_infinite_interval_is_refused_naming_the_file(tmp_path, ci):
    table = tmp_path / "paper.json"
    table.write_text(json.dumps({"source": "s", "models": {"m": {TASK: {"mean": 0.5,
                                                                        "ci95": ci}}}}))
    with pytest.raises(compare.ComparisonError, match=f"{table}: m / {TASK}: ci95"):
        compare.load(table)


def test_compare_out_may_not_be_an_evaluations_own_file(tmp_path, scored_steps, capsys):
    a, b = _two_runs(tmp_path, scored_steps)
    for name in ("results.md", "fingerprint.json", "logs/x.md", "comparison.md"):
        target = a.parent / name
        before = target.read_bytes() if target.exists() else None
        assert compare.main([str(a), str(b), "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert "evaluation's output folder" in err and "Nothing was written" in err, err
        assert (target.read_bytes() if target.exists() else None) == before
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "table.md")]) == 0


# ---- Ctrl-C ------------------------------------------------------------------------------------

@pytest.mark.parametrize("then", ["fails", "writes scores"])
def test_ctrl_c_in_the_predictor_is_one_line_exit_130_and_claims_nothing(tmp_path, capsys,
                                                                         monkeypatch, then):
    """Lightning catches KeyboardInterrupt and stops training; hear-eval-kit then either fails
    ("No score None for this model") or goes on to score the cut-short model."""
    def embed(module, artifact, task_list, embeddings_dir, model_options, log=print):
        out = {}
        for task in task_list:
            d = embeddings_dir / module / task.name
            d.mkdir(parents=True, exist_ok=True)
            meta = json.loads((task / "task_metadata.json").read_text())
            (d / "task_metadata.json").write_text(json.dumps(meta))
            for split in meta["splits"]:
                (d / f"{split}.embedding-dimensions.json").write_text("[3, 8]")
            (d / ".done.embeddings").write_text(ev.task_fingerprint(task))
            manifest.record(embeddings_dir.parent, d, recursive=False)
            out[task.name] = d
        return out

    def predictor(embedding_path, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass  # Lightning's "attempting graceful shutdown"
        if then == "fails":
            raise ValueError("No score None for this model")
        (embedding_path / "test.predicted-scores.json").write_text(
            json.dumps({"test": {"test_score": 0.1}}))

    from heareval.predictions import task_predictions as tp

    monkeypatch.setattr(ev, "embed_tasks", embed)
    monkeypatch.setattr(tp, "task_predictions", predictor)
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=0.5)
    art = _artifact(tmp_path / "art")
    out = tmp_path / "out"
    rc = ev.main(["--artifact", str(art), "--tasks-dir", str(tmp_path / "tasks"), "--out",
                  str(out), "--seeds", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err[-1] == "interrupted", err[-3:]
    assert not any("No score" in line for line in err)
    assert not (out / "results.json").exists()
    assert not list(out.glob("predictions/*/*/test.predicted-scores.json"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_results_path_that_is_a_folder_or_holds_no_task_is_one_line(tmp_path):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(compare.ComparisonError, match="folder.json: cannot read it"):
        compare.load(tmp_path / "folder.json")
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"name": "a", "tasks": {}}))
    with pytest.raises(compare.ComparisonError, match='empty.json: the evaluation\'s "tasks" is '
                                                      "empty"):
        compare.load(empty)
