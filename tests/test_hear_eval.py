"""hear-eval-kit end to end: generated HEAR-format tasks, the evaluation driver (embedding runner
+ predictor over seeds + summary) and its wrapper script. Pretrained vs initial weights on a
downstream task: tests/test_demo.py."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
from train_helpers import load_config

from mwmae.artifact import save_artifact
from mwmae.hear import evaluate as ev
from mwmae.hear import tasks
from mwmae.model import init_params
from mwmae.train.config import model_config_from

REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def _random_artifact(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
    config = model_config_from(load_config("tiny"))
    save_artifact(path, config, init_params(config, jax.random.key(seed)), encoder_only=True)
    return path


# ---- generated tasks ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", tasks.KINDS)
def test_generated_task_has_the_layout_heareval_reads(tmp_path, kind):
    task = tasks.make_task(tmp_path, kind, per_class=5, duration_s=1.0, seed=3)
    meta = json.loads((task / "task_metadata.json").read_text())
    for key in ("task_name", "embedding_type", "prediction_type", "split_mode", "evaluation",
                "splits", "sample_duration"):
        assert key in meta
    vocab = (task / "labelvocabulary.csv").read_text().splitlines()
    assert vocab[0] == "idx,label"
    labels = {line.split(",")[1] for line in vocab[1:]}
    for split in meta["splits"]:
        data = json.loads((task / f"{split}.json").read_text())
        assert data
        seen = set()
        for name, target in data.items():
            x, rate = sf.read(task / "16000" / split / name, dtype="float32")
            assert rate == 16000 and x.shape == (16000,) and np.abs(x).max() <= 1.0
            if meta["embedding_type"] == "scene":
                assert len(target) == 1
                seen |= set(target)
            else:
                assert all(0 <= e["start"] < e["end"] <= 1000 for e in target)
                seen |= {e["label"] for e in target}
        assert seen <= labels
        if kind != "events":
            assert seen == labels, (split, seen)
    ev.check_task(task)


def test_tasks_are_reproducible_and_the_cli_writes_one(tmp_path, capsys):
    a = tasks.make_task(tmp_path / "a", "order", per_class=5, seed=7)
    b = tasks.make_task(tmp_path / "b", "order", per_class=5, seed=7)
    wav = "rising_0000.wav"
    np.testing.assert_array_equal(sf.read(a / "16000/train" / wav)[0],
                                  sf.read(b / "16000/train" / wav)[0])
    assert tasks.main([str(tmp_path / "c"), "--kind", "noise", "--per-class", "5"]) == 0
    assert "mwmae_noise" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown task kind"):
        tasks.make_task(tmp_path, "speech")


# ---- driver: bad inputs ---------------------------------------------------------------------

def test_driver_refuses_bad_tasks_and_artifacts(tmp_path):
    art = _random_artifact(tmp_path / "art")
    with pytest.raises(ev.EvaluationError, match="tasks directory not found"):
        ev.evaluate(str(art), str(tmp_path / "none"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.EvaluationError, match="no task folders"):
        ev.evaluate(str(art), str(tmp_path / "empty"), str(tmp_path / "out"))
    task = tasks.make_task(tmp_path / "t", "noise", per_class=5, duration_s=0.5)
    with pytest.raises(ev.EvaluationError, match="no task.*'other'"):
        ev.evaluate(str(art), str(tmp_path / "t"), str(tmp_path / "out"), task_names=["other"])
    with pytest.raises(ev.EvaluationError, match="artifact directory not found"):
        ev.evaluate(str(tmp_path / "no_art"), str(tmp_path / "t"), str(tmp_path / "out"))
    # 44.1 kHz audio where 16 kHz is expected.
    first = sorted((task / "16000" / "train").iterdir())[0]
    sf.write(first, np.zeros(22050, np.float32), 44100)
    with pytest.raises(ev.EvaluationError, match=f"{first.name}: 44100 Hz; expected 16000"):
        ev.evaluate(str(art), str(tmp_path / "t"), str(tmp_path / "out"))
    (task / "16000").rename(task / "48000")
    with pytest.raises(ev.EvaluationError, match=r"no 16000 Hz audio folder.*\['48000'\]"):
        ev.evaluate(str(art), str(tmp_path / "t"), str(tmp_path / "out"))
    (task / "48000").rename(task / "16000")
    sf.write(first, np.zeros((16000, 2), np.float32), 16000)
    with pytest.raises(ev.EvaluationError, match="2 channels; expected mono"):
        ev.evaluate(str(art), str(tmp_path / "t"), str(tmp_path / "out"))
    # A corrupt artifact fails before any embedding work.
    good = tasks.make_task(tmp_path / "g", "noise", per_class=5, duration_s=0.5)
    blob = bytearray((art / "model.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (art / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ev.EvaluationError, match="checksum"):
        ev.evaluate(str(art), str(good.parent), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "embeddings").exists()


def test_wrapper_script_checks_its_arguments(tmp_path):
    script = REPO / "launch" / "hear_eval.sh"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage:" in r.stderr
    r = subprocess.run(["bash", str(script), str(tmp_path / "no_art"), str(tmp_path), "out"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no_art: no such directory" in r.stderr


# ---- end to end -----------------------------------------------------------------------------

@pytest.mark.slow  # ~75 s: two HEAR tasks end to end in subprocesses
def test_driver_cli_event_and_scene_tasks_through_the_wrapper(tmp_path):
    """The wrapper -> python -m mwmae.hear.evaluate -> hear-eval-kit, on a scene and an event
    task (timestamp embeddings, onset F-measure), 2 seeds, with resume on a rerun."""
    art = _random_artifact(tmp_path / "art")
    for kind, seconds in (("noise", 1.0), ("events", 2.0)):
        task = tasks.make_task(tmp_path / "tasks", kind, per_class=5, duration_s=seconds)
        # A few predictor epochs suffice to exercise the pipeline.
        meta = json.loads((task / "task_metadata.json").read_text())
        meta["evaluation_params"]["task_specific_param_grid"].update(
            max_epochs=[4], check_val_every_n_epoch=[1], patience=[2])
        (task / "task_metadata.json").write_text(json.dumps(meta))
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    cmd = ["bash", str(REPO / "launch" / "hear_eval.sh"), str(art), str(tmp_path / "tasks"),
           str(tmp_path / "out"), "--seeds", "2", "--grid", "faster", "--grid-points", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["tasks"]) == {"mwmae_noise", "mwmae_events"}
    assert results["tasks"]["mwmae_events"]["metric"] == "event_onset_200ms_fms"
    for s in results["tasks"].values():
        assert s["n"] == 2 and len(s["scores"]) == 2 and 0.0 <= s["mean"] <= 1.0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| mwmae_noise | top1_acc |" in table and "±" in table
    emb_dir = tmp_path / "out" / "embeddings" / "mwmae.hear" / "mwmae_events"
    ts = json.loads(next((emb_dir / "test").glob("*.timestamps.json")).read_text())
    np.testing.assert_allclose(ts, 15 + 40 * np.arange(len(ts)))
    # A rerun reuses the embeddings and the predictions.
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0 and "already done" in r.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["tasks"] == \
        results["tasks"]


@pytest.mark.slow  # an integration run over 30 s: it runs in CI's slow group
def test_rerun_with_other_weights_or_a_changed_task_never_reuses_old_outputs(tmp_path):
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=1.0, seed=0)
    out = tmp_path / "out"
    logs: list[str] = []
    run = lambda art: ev.evaluate(str(art), str(tmp_path / "tasks"), str(out), seeds=1,  # noqa: E731
                                  grid="faster", grid_points=1, log=logs.append)
    run(_random_artifact(tmp_path / "a", seed=0))
    first = json.loads((out / "embeddings" / "mwmae.hear" / "mwmae_noise" /
                        "profile.embeddings.json").read_text())
    run(tmp_path / "a")
    assert any("already done" in line for line in logs)
    logs.clear()
    (tmp_path / "a.json").write_text((out / "results.json").read_text())
    # other weights, same output folder: refused, nothing lost
    kept = (out / "results.json").read_text()
    with pytest.raises(ev.EvaluationError, match="another artifact.*--overwrite"):
        ev.evaluate(str(_random_artifact(tmp_path / "b", seed=1)), str(tmp_path / "tasks"),
                    str(out), seeds=2, grid="faster", grid_points=1, log=logs.append)
    assert (out / "results.json").read_text() == kept
    # ... unless asked to replace them; beside the first run's results
    result = ev.evaluate(str(tmp_path / "b"), str(tmp_path / "tasks"),
                         str(out), seeds=2, grid="faster", grid_points=1, log=logs.append,
                         compare=[str(tmp_path / "a.json")], overwrite=True)
    assert any("--overwrite: evaluating afresh" in line for line in logs), logs
    assert sorted(result["overall_score"]) == ["a", "b"]
    assert sorted(result["overall_score"].values()) == [0.0, 100.0] or \
        result["overall_score"]["a"] == result["overall_score"]["b"] == 100.0
    comparison = (out / "comparison.md").read_text()
    assert comparison.startswith("| task | b | a | diff | inside |"), comparison
    assert "**overall score s(m)**" in comparison and comparison in logs[-1]
    assert not any("already done" in line for line in logs)
    second = json.loads((out / "embeddings" / "mwmae.hear" / "mwmae_noise" /
                         "profile.embeddings.json").read_text())
    assert first["artifact"].endswith("/a") and second["artifact"].endswith("/b")
    assert json.loads((out / "fingerprint.json").read_text())["weights"] == json.loads(
        (tmp_path / "b" / "config.json").read_text())["params_sha256"]
    # The same weights on a regenerated task (other clips): that task is embedded again.
    logs.clear()
    tasks.make_task(tmp_path / "tasks", "noise", per_class=6, duration_s=1.0, seed=5,
                    overwrite=True)
    with pytest.raises(ev.EvaluationError, match="mwmae_noise changed since"):
        run(tmp_path / "b")
    ev.evaluate(str(tmp_path / "b"), str(tmp_path / "tasks"), str(out), seeds=1, grid="faster",
                grid_points=1, log=logs.append, overwrite=True)
    assert any("changed since its embeddings there were made" in line for line in logs), logs
    train_json = json.loads((out / "embeddings" / "mwmae.hear" / "mwmae_noise" /
                             "train.json").read_text())
    assert len(train_json) == len(json.loads(
        (tmp_path / "tasks" / "mwmae_noise" / "train.json").read_text()))
