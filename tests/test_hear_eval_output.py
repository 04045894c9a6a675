"""What the HEAR evaluation prints: hear-eval-kit's output in a log file per step (fd-level, so
C code and subprocesses too), a short terminal, and a failing step shown by its log's tail."""

import contextlib
import ctypes
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from test_hear_eval import _random_artifact
from test_hear_safety import _artifact as _numpy_artifact

from mwmae.hear import evaluate as ev
from mwmae.hear import tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
SEEDS = 2


# ---- the redirection ------------------------------------------------------------------------

def test_output_to_sends_every_kind_of_output_to_the_log_and_restores_the_terminal(
        tmp_path, capfd):
    log = tmp_path / "logs" / "step.log"
    print("before")
    with ev.output_to(log, "the step"):
        print("python stdout")
        print("python stderr", file=sys.stderr)
        os.write(1, b"fd 1\n")
        os.write(2, b"fd 2\n")
        subprocess.run(["sh", "-c", "echo subprocess stdout; echo subprocess stderr >&2"],
                       check=True)
        ctypes.CDLL(None).puts(b"C stdio")  # buffered in C: flushed by the switch back
    print("after")
    terminal = capfd.readouterr()
    text = log.read_text()
    for line in ("python stdout", "python stderr", "fd 1", "fd 2", "subprocess stdout",
                 "subprocess stderr", "C stdio"):
        assert line in text, (line, text)
        assert line not in terminal.out + terminal.err
    assert terminal.out.split() == ["before", "after"] and "before" not in text


def test_a_failing_step_leaves_its_traceback_in_the_log_and_its_tail_in_the_error(
        tmp_path, capfd):
    log = tmp_path / "step.log"
    with pytest.raises(ev.StepFailed) as info:
        with ev.output_to(log, "predictions for t, seed 3"):
            for i in range(40):
                print(f"working {i}")
            raise KeyError("no such label")
    print("terminal again")
    assert capfd.readouterr().out == "terminal again\n"
    e = info.value
    assert isinstance(e.__cause__, KeyError) and e.log_file == log
    assert str(e).startswith("predictions for t, seed 3 failed: KeyError: 'no such label'")
    assert str(log) in str(e)
    assert len(e.tail) == ev.TAIL_LINES and e.tail[-1] == "KeyError: 'no such label'"
    assert "working 39" in e.tail and "working 10" not in e.tail
    assert "Traceback (most recent call last):" in log.read_text()


def test_tail_shows_the_last_state_of_redrawn_lines(tmp_path):
    log = tmp_path / "bars.log"
    log.write_text("first\n 10%|#  | 1/10\r 100%|###| 10/10\r\n\x1b[Aepoch 1\n\n")
    assert ev._tail(log) == ["first", " 100%|###| 10/10", "epoch 1"]


def test_a_rerun_with_overwrite_drops_the_logs_of_replaced_outputs_only(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    names = ["embeddings-a.log", "embeddings-a_b.log", "predictions-a-seed_0.log",
             "predictions-a_b-seed_1.log", "notes.txt"]
    for name in names:
        (logs / name).write_text("x")
    ev._remove_logs(tmp_path, ["a"], embeddings=True)
    assert sorted(p.name for p in logs.iterdir()) == [
        "embeddings-a_b.log", "notes.txt", "predictions-a_b-seed_1.log"]
    ev._remove_logs(tmp_path, None, embeddings=False)
    assert sorted(p.name for p in logs.iterdir()) == ["embeddings-a_b.log", "notes.txt"]


# ---- the command ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One evaluation through the command line: a tiny task, 2 seeds, a few predictor epochs."""
    root = tmp_path_factory.mktemp("hear_output")
    art = _random_artifact(root / "art")
    task = tasks.make_task(root / "tasks", "noise", per_class=5, duration_s=1.0, log=lambda _: 0)
    meta = json.loads((task / "task_metadata.json").read_text())
    meta["evaluation_params"]["task_specific_param_grid"].update(
        max_epochs=[4], check_val_every_n_epoch=[1], patience=[2])
    (task / "task_metadata.json").write_text(json.dumps(meta))
    args = ["--artifact", str(art), "--tasks-dir", str(root / "tasks"), "--seeds", str(SEEDS),
            "--grid", "faster", "--grid-points", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "mwmae.hear.evaluate", *args, "--out",
                        str(root / "out")], env=env, capture_output=True, text=True,
                       timeout=600, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root, args, r


def _resume_from(root: pathlib.Path, out: pathlib.Path) -> None:
    """A new --out that reuses the command's embeddings (same artifact and settings)."""
    out.mkdir()
    shutil.copy(root / "out" / ev.FINGERPRINT, out / ev.FINGERPRINT)
    shutil.copytree(root / "out" / "embeddings", out / "embeddings")


@pytest.mark.slow  # ~60 s with the next test: the command on a tiny task end to end
def test_the_terminal_shows_progress_scores_and_the_table_and_the_logs_the_rest(cli_run):
    root, _, r = cli_run
    out = root / "out"
    printed = r.stdout + r.stderr
    assert printed.count("\n") < 100, printed
    for s in range(SEEDS):
        assert f"predictions for mwmae_noise, seed {s}: " in r.stdout
    assert "| mwmae_noise | top1_acc |" in r.stdout and "embeddings for mwmae_noise" in r.stdout
    assert r.stdout.count(str(out / "logs")) == 1
    assert f"{SEEDS}/{SEEDS}" in r.stderr  # the bar, finished
    assert "Profiler Report" not in printed and "Epoch" not in printed
    embedding_log = ev.step_log(out, "mwmae_noise").read_text()
    assert "Getting embeddings for split: train" in embedding_log
    for s in range(SEEDS):
        text = ev.step_log(out, "mwmae_noise", s).read_text()
        assert "FIT Profiler Report" in text and "Epoch 0" in text, text[:3000]
    # A rerun reuses every step and says so.
    rerun = subprocess.run([sys.executable, "-m", "mwmae.hear.evaluate", *cli_run[1], "--out",
                            str(out)], env={**os.environ, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=600, cwd=root)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("already done") == 1 + SEEDS, rerun.stdout


@pytest.mark.slow
def test_the_figures_are_those_of_the_predictor_printing_to_the_terminal(cli_run, tmp_path,
                                                                          monkeypatch):
    root, args, _ = cli_run
    out = tmp_path / "plain"
    _resume_from(root, out)
    monkeypatch.setattr(ev, "output_to", lambda *_: contextlib.nullcontext())
    assert ev.main([*args, "--out", str(out)]) == 0
    assert not (out / "logs").exists()
    logged = json.loads((root / "out" / "results.json").read_text())
    plain = json.loads((out / "results.json").read_text())
    assert plain["tasks"] == logged["tasks"]


def test_a_failing_predictor_shows_its_log_tail_then_the_error(tmp_path, monkeypatch, capfd):
    from heareval.predictions import task_predictions as tp

    def embed(module, artifact, task_list, embeddings_dir, model_options, log=print):
        """What the predictor step reads before hear-eval-kit's predictor starts."""
        out = {}
        for task in task_list:
            d = out[task.name] = embeddings_dir / module / task.name
            d.mkdir(parents=True)
            shutil.copy(task / "task_metadata.json", d)
            for split in ("train", "valid", "test"):
                (d / f"{split}.embedding-dimensions.json").write_text("[12, 8]")
        return out

    def failing(**kwargs):
        for i in range(30):
            print(f"predictor line {i}")
        raise RuntimeError("the predictor broke")

    monkeypatch.setattr(ev, "embed_tasks", embed)
    monkeypatch.setattr(tp, "task_predictions", failing)
    art = _numpy_artifact(tmp_path / "art")  # never run: the embeddings are stand-ins
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=0.5, log=lambda _: 0)
    out = tmp_path / "out"
    assert ev.main(["--artifact", str(art), "--tasks-dir", str(tmp_path / "tasks"), "--out",
                    str(out), "--seeds", "2", "--grid", "faster", "--grid-points", "1"]) == 1
    printed = capfd.readouterr()
    err = printed.err.strip().splitlines()
    log = ev.step_log(out, "mwmae_noise", 0)
    assert err[-1].startswith("error: predictions for mwmae_noise, seed 0 failed: "
                              "RuntimeError: the predictor broke") and str(log) in err[-1]
    assert any(line.startswith(f"{log}, its last {ev.TAIL_LINES} lines") for line in err)
    assert "  predictor line 29" in err and "  RuntimeError: the predictor broke" in err
    assert "predictor line" not in printed.out
    assert "predictor line 0" in log.read_text()
    assert not (out / "results.json").exists()
    assert not ev.step_log(out, "mwmae_noise", 1).exists()  # the evaluation stopped there
