"""The closed loop of a sweep: points as the product of swept values, each pretrained, exported
and evaluated on HEAR tasks in its own workdir, then one table with the overall score."""

import json
import re
import subprocess
import sys

import pytest

from mwmae import sweep
from mwmae.hear import tasks


def test_the_sweep_is_the_product_of_its_axes_and_names_each_point():
    settings = [sweep.parse_setting(t) for t in (
        "config=configs/pretrain.py:mwmae-T-4x16", "model.mask_ratio=0.7",
        "config=configs/pretrain.py:mae-T-4x16", "config.model.mask_ratio=0.8")]
    points = sweep.grid(settings)
    assert points == [
        {"config": "configs/pretrain.py:mwmae-T-4x16", "model.mask_ratio": "0.7"},
        {"config": "configs/pretrain.py:mwmae-T-4x16", "model.mask_ratio": "0.8"},
        {"config": "configs/pretrain.py:mae-T-4x16", "model.mask_ratio": "0.7"},
        {"config": "configs/pretrain.py:mae-T-4x16", "model.mask_ratio": "0.8"}]
    assert [sweep.point_name(p) for p in points] == [
        "mwmae-T-4x16_mr0.7", "mwmae-T-4x16_mr0.8", "mae-T-4x16_mr0.7", "mae-T-4x16_mr0.8"]
    assert sweep.point_name({"model.decoder_window_sizes": "(2,5,0,0)"}) == "dw2-5-0-0"
    assert sweep.point_name({"model.decoder_window_sizes": (2, 5, 0, 0)}) == "dw2-5-0-0"
    assert sweep.grid([]) == [{}]
    with pytest.raises(sweep.SweepError, match="expected KEY=VALUE"):
        sweep.parse_setting("model.mask_ratio")
    with pytest.raises(sweep.SweepError, match="given twice"):
        sweep.grid([("a", "1"), ("a", "1")])


def test_a_point_is_pretrain_then_export_then_evaluate_in_its_workdir():
    train, export, evaluate = sweep.point_commands(
        "configs/tiny.py", "runs/s/mr0.7/", "TASKS", overrides=[("model.mask_ratio", "0.7")],
        evaluate_args=["--seeds", "10"], python="py")
    assert train == ["py", "-m", "mwmae.train", "--config", "configs/tiny.py", "--workdir",
                     "runs/s/mr0.7", "--config.model.mask_ratio=0.7"]
    assert export == ["py", "-m", "mwmae.export", "--workdir", "runs/s/mr0.7", "--out",
                      "runs/s/mr0.7/export", "--overwrite"]
    assert evaluate == ["py", "-m", "mwmae.hear.evaluate", "--artifact", "runs/s/mr0.7/export",
                        "--tasks-dir", "TASKS", "--out", "runs/s/mr0.7/hear", "--name", "mr0.7",
                        "--overwrite", "--seeds", "10"]


def _results(root, name, scores):
    path = root / name / "hear" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"tasks": {t: {"mean": m, "ci95": 0.01}
                                          for t, m in scores.items()}}))


def test_collect_makes_one_table_with_the_overall_score(tmp_path, capsys):
    _results(tmp_path, "mr0.7", {"esc50-v2.0.0-full": 0.80, "t2": 0.40, "only_here": 0.5})
    _results(tmp_path, "mr0.8", {"esc50-v2.0.0-full": 0.70, "t2": 0.60})
    (tmp_path / "unfinished").mkdir()  # a point still training: no results yet
    assert sweep.main(["collect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| task | mr0.7 | mr0.8 |"
    assert "| ESC-50 | 0.8000 ± 0.0100 | 0.7000 ± 0.0100 |" in out
    assert "| **overall score s(m)** | 50.0 | 50.0 |" in out
    assert "| **mean score** | 60.0 | 65.0 |" in out and "left out: only_here" in out
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["overall_score"] == {"mr0.7": 50.0, "mr0.8": 50.0}
    assert (tmp_path / "sweep.md").read_text() in out
    assert sweep.main(["collect", str(tmp_path / "unfinished")]) == 2
    assert "no point has HEAR results yet" in capsys.readouterr().err


def test_a_failed_step_stops_the_point_and_names_it(tmp_path, capsys):
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=0.5, seed=0)
    # Shards that do not exist pass every check the sweep can make; the trainer refuses them.
    code = sweep.main(["run", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "s"),
                       "--tasks-dir", str(tmp_path / "tasks"), "--sweep", "model.mask_ratio=0.7",
                       "--set", "data.source=shards",
                       "--set", f"data.train_shards={tmp_path / 'nowhere' / 'x.tfrecord'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(re.escape(f"error: {tmp_path / 's' / 'mr0.7'}: pretrain failed (exit ")
                        + r"\d\); fix it and rerun: finished steps are kept", err), err
    assert sweep.main(["run", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "s"),
                       "--tasks-dir", str(tmp_path / "none")]) == 2
    assert "tasks directory not found" in capsys.readouterr().err
    # A folder without tasks is refused before any pretraining starts.
    (tmp_path / "empty").mkdir()
    assert sweep.main(["point", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "p"),
                       "--tasks-dir", str(tmp_path / "empty")]) == 2
    assert "no HEAR task folders" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.slow  # ~3 min: two points trained, exported and evaluated in subprocesses
def test_a_sweep_runs_every_point_end_to_end_and_resumes(tmp_path):
    tasks.make_task(tmp_path / "tasks", "noise", per_class=5, duration_s=1.0, seed=0)
    cmd = [sys.executable, "-m", "mwmae.sweep", "run", "--config", "configs/tiny.py",
           "--workdir", str(tmp_path / "s"), "--tasks-dir", str(tmp_path / "tasks"),
           "--sweep", "model.mask_ratio=0.7", "--sweep", "model.mask_ratio=0.85",
           "--set", "num_train_steps=4", "--set", "checkpoint.every_steps=4",
           "--evaluate", "--seeds 2 --grid faster --grid-points 1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sorted(summary["points"]) == ["mr0.7", "mr0.85"]
    assert summary["tasks"] == ["mwmae_noise"]
    for name in ("mr0.7", "mr0.85"):
        config = json.loads((tmp_path / "s" / name / "export" / "config.json").read_text())
        assert config["model"]["mask_ratio"] == float(name[2:])
        result = json.loads((tmp_path / "s" / name / "hear" / "results.json").read_text())
        assert result["name"] == name and result["tasks"]["mwmae_noise"]["n"] == 2
    assert "| **overall score s(m)** |" in first.stdout
    # A rerun finds every step done: training at its last step, embeddings and seeds reused.
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("already done") >= 2
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["points"] == summary["points"]


def _fake_steps(monkeypatch, scores=None):
    """The point's subprocesses replaced by a recorder; the evaluation writes a results file."""
    ran = []

    def fake_run(argv, *args, **kwargs):
        ran.append(argv)
        if "mwmae.hear.evaluate" in argv:
            out = argv[argv.index("--out") + 1]
            path = f"{out}/results.json"
            import os

            os.makedirs(out, exist_ok=True)
            with open(path, "w") as f:
                json.dump({"tasks": {"t": {"mean": 0.5, "ci95": 0.01}}}, f)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    return ran


def _tasks_dir(path):
    (path / "t").mkdir(parents=True)
    (path / "t" / "task_metadata.json").write_text("{}")
    return str(path)


def test_a_rerun_with_other_training_settings_is_refused_before_any_step(
        tmp_path, monkeypatch, capsys):
    ran = _fake_steps(monkeypatch)
    tasks_dir = _tasks_dir(tmp_path / "tasks")
    base = ["run", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "s"),
            "--tasks-dir", tasks_dir, "--sweep", "model.mask_ratio=0.7",
            "--sweep", "model.mask_ratio=0.8"]
    assert sweep.main([*base, "--set", "num_train_steps=4"]) == 0
    assert len(ran) == 6
    # The same recipe again reuses every point; progress flags may differ.
    assert sweep.main([*base, "--set", "num_train_steps=4", "--set", "progress_bar=False",
                       "--evaluate", "--seeds 2"]) == 0
    capsys.readouterr()
    ran.clear()
    assert sweep.main([*base, "--set", "num_train_steps=8"]) == 2
    assert ran == []                       # refused before the first point's first step
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tmp_path / 's' / 'mr0.7'}: trained by an earlier sweep "
                          "with other settings (num_train_steps=4 there, 8 now)"), err
    assert "new --workdir" in err
    assert sweep.main(["run", "--config", "configs/pretrain.py:mae-T-4x16", *base[3:],
                       "--set", "num_train_steps=4"]) == 2
    assert "config=configs/tiny.py there, configs/pretrain.py:mae-T-4x16 now" in \
        capsys.readouterr().err
    assert ran == []


def test_the_table_of_a_run_holds_its_own_points_only(tmp_path, monkeypatch):
    _fake_steps(monkeypatch)
    _results(tmp_path / "s", "mr0.6", {"t": 0.9})   # an earlier sweep's point, other settings
    assert sweep.main(["run", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "s"),
                       "--tasks-dir", _tasks_dir(tmp_path / "tasks"),
                       "--sweep", "model.mask_ratio=0.7"]) == 0
    assert list(json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]) == ["mr0.7"]


def test_sweep_outputs_inside_the_tasks_folder_are_refused(tmp_path, monkeypatch, capsys):
    ran = _fake_steps(monkeypatch)
    tasks_dir = _tasks_dir(tmp_path / "tasks")
    for command, workdir in (("run", tmp_path / "tasks" / "sweep"), ("point", tmp_path / "tasks"),
                             ("run", tmp_path)):
        assert sweep.main([command, "--config", "configs/tiny.py", "--workdir", str(workdir),
                           "--tasks-dir", tasks_dir]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: --workdir {workdir} and --tasks-dir {tasks_dir} "
                              "overlap"), err
    assert ran == []
    assert not (tmp_path / "tasks" / "sweep").exists()


def test_two_sweeps_never_run_one_point_at_once(tmp_path, monkeypatch, capsys):
    import fcntl

    ran = _fake_steps(monkeypatch)
    point = tmp_path / "s" / "run"
    point.mkdir(parents=True)
    with open(point / sweep.LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep.main(["point", "--config", "configs/tiny.py", "--workdir", str(point),
                           "--tasks-dir", _tasks_dir(tmp_path / "tasks")]) == 2
    assert ran == []
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {point}: another sweep is running this point now; wait for it", err


def test_a_damaged_results_file_is_named_not_a_traceback(tmp_path, capsys):
    _results(tmp_path, "mr0.7", {"t": 0.5})
    for text in ('{"tasks": {"t": {"mean": 0.5,', "[1, 2]", '{"name": "x"}'):
        _write = tmp_path / "mr0.8" / "hear" / "results.json"
        _write.parent.mkdir(parents=True, exist_ok=True)
        _write.write_text(text)
        assert sweep.main(["collect", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: {_write}: not a HEAR results file ("), err
        assert err.endswith("rerun that point's evaluation"), err


@pytest.mark.parametrize("argv,says", [
    (["--sweep", "model.=.."], "'model.' is not a config key"),
    (["--sweep", "model.mask_ratoi=0.7"], "unknown config key 'model.mask_ratoi'"),
    (["--sweep", "model.mask_ratio=0.999"], "model.mask_ratio=0.999: keeps 0 of the 250"),
    (["--sweep", "config=.."], "makes the point folder name '..'"),
    (["--set", "batch_size=many"], "batch_size=many: not a value of batch_size"),
])
def test_a_bad_key_value_or_point_folder_is_refused_before_anything_is_written(
        tmp_path, monkeypatch, capsys, argv, says):
    ran = _fake_steps(monkeypatch)
    tasks_dir = _tasks_dir(tmp_path / "tasks")
    root = tmp_path / "sweeps" / "s"
    root.parent.mkdir()
    assert sweep.main(["run", "--config", "configs/tiny.py", "--workdir", str(root),
                       "--tasks-dir", tasks_dir, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert ran == []
    # Neither the root nor its parent holds anything of the sweep.
    assert sorted(p.name for p in root.parent.iterdir()) == []


def test_a_set_of_the_configs_own_value_is_no_change(tmp_path, monkeypatch, capsys):
    ran = _fake_steps(monkeypatch)
    tasks_dir = _tasks_dir(tmp_path / "tasks")
    base = ["run", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "s"),
            "--tasks-dir", tasks_dir, "--sweep", "model.mask_ratio=0.7"]
    assert sweep.main(base) == 0
    # tiny's seed is 0 and its step count 40: saying so again changes nothing.
    assert sweep.main([*base, "--set", "seed=0", "--set", "num_train_steps=40"]) == 0, \
        capsys.readouterr().err
    assert sweep.main(base) == 0, capsys.readouterr().err
    assert len(ran) == 9
    assert sweep.main([*base, "--set", "seed=1"]) == 2
    assert "seed=unset there, 1 now" in capsys.readouterr().err
