"""A careless rerun never loses, mixes or silently redoes a run's work: the workdir's identity is
its checkpoints' recorded config, what a checkpoint records is verified when read (its JSON items
too), retention keeps what an earlier config promised, and the run's starting weights are what
it really started from."""

import hashlib
import json
import logging
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_helpers import REPO, checkpointing_config, set_key

from mwmae.train import checkpoint as ckpt
from mwmae.train.loop import train
from mwmae.train.pretraining import Pretraining
from mwmae.workdir import ConfigMismatch, DamagedCheckpoint, Workdir


def _quiet(*_):
    pass


def _snapshot(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "writer.lease.lock"}


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. the identity of a workdir is what its checkpoints record --------------------------------

def test_a_workdir_without_config_json_still_refuses_another_config(trained, tmp_path):
    wd = _copy(trained, tmp_path / "wd")
    (wd / "config.json").unlink()
    before = _snapshot(wd)
    config = checkpointing_config(steps=8)
    config.optimizer.base_learning_rate = 0.5
    config.seed = 7
    with pytest.raises(ConfigMismatch) as e:
        train(Pretraining, config, wd, print_fn=_quiet)
    message = str(e.value)
    assert "checkpoints/6 (the config it was trained with)" in message
    assert "seed: 0 -> 7" in message and "optimizer.base_learning_rate" in message
    assert _snapshot(wd) == before and not (wd / "config.json").exists()
    # The same config as the checkpoints' resumes, and config.json is written again.
    lines = []
    train(Pretraining, checkpointing_config(steps=8), wd, print_fn=lines.append)
    assert lines[0].startswith("resumed from step 6")
    assert json.loads((wd / "config.json").read_text())["seed"] == 0


def test_a_model_config_is_read_from_the_checkpoints_when_config_json_is_gone(trained,
                                                                             tmp_path):
    wd = _copy(trained, tmp_path / "wd")
    (wd / "config.json").unlink()
    config, full = Workdir(wd).model_config()
    assert config.embed_dim == 64 and full["num_train_steps"] == 6


# ---- 3. no silent restart from step 0 ------------------------------------------------------------

def _flip_a_byte_in_arrays(step_dir: pathlib.Path) -> None:
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    target = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))


def test_only_damaged_checkpoints_refuse_a_restart_from_step_0(trained, tmp_path):
    """keep_last=1 leaves one checkpoint: when it is damaged, the run must not retrain from
    step 0 without a word."""
    wd = _copy(trained, tmp_path / "wd")
    for step in (2, 4):
        shutil.rmtree(wd / "checkpoints" / str(step))
    _flip_a_byte_in_arrays(wd / "checkpoints" / "6")
    config = checkpointing_config(steps=8)
    config.checkpoint.keep_last = 1
    with pytest.raises(DamagedCheckpoint, match=r"no checkpoint verifies \(set aside: 6.damaged"
                                                r"\); training would start again from step 0"):
        train(Pretraining, config, wd, print_fn=_quiet)
    assert (wd / "checkpoints" / "6.damaged").is_dir() and Workdir(wd).steps() == []
    with pytest.raises(DamagedCheckpoint, match="no checkpoint verifies"):  # and again
        train(Pretraining, config, wd, print_fn=_quiet)
    assert not list((wd / "checkpoints").glob("[0-9]"))
    # Moving the set-aside checkpoint away is the explicit "start over".
    shutil.move(str(wd / "checkpoints" / "6.damaged"), str(tmp_path / "6.damaged"))
    lines = []
    train(Pretraining, config, wd, print_fn=lines.append)
    assert lines[0].startswith("starting at step 0")


# ---- 4 and 5. retention keeps what an earlier config promised -----------------------------------

@pytest.mark.slow  # an integration run over 30 s: it runs in CI's slow group
def test_dropping_keep_every_steps_keeps_the_kept_checkpoints(tmp_path, caplog):
    wd = tmp_path / "wd"
    config = checkpointing_config(steps=8, every=2)
    config.checkpoint.keep_last = 1
    config.checkpoint.keep_every_steps = 4
    train(Pretraining, config, wd, print_fn=_quiet)
    assert Workdir(wd).steps() == [4, 8]
    config = checkpointing_config(steps=12, every=2)
    config.checkpoint.keep_last = 1
    with caplog.at_level(logging.WARNING):
        train(Pretraining, config, wd, print_fn=_quiet)
    assert Workdir(wd).steps() == [4, 8, 12]
    assert "keeping checkpoints an earlier config of this run promised to keep" in caplog.text
    assert "4 (checkpoint.keep_every_steps=4)" in caplog.text
    # Only an explicit release lets them go.
    config = checkpointing_config(steps=14, every=2)
    config.checkpoint.keep_last = 1
    config.checkpoint.release_kept = True
    train(Pretraining, config, wd, print_fn=_quiet)
    assert Workdir(wd).steps() == [14]


def _save(wd, manager, step, top1, promise):
    state = {"x": jax.numpy.full((3,), float(step))}
    ckpt.save_checkpoint(wd, manager, step, state, {"position": step},
                         {"step": step, "keep": promise}, force=True,
                         metrics=None if top1 is None else {"top1": top1})
    manager.wait_until_finished()


def test_a_rerun_without_evaluation_keeps_the_best_checkpoint(tmp_path):
    """A tagger resumed without tagger.eval_shards has no best-of policy: the best checkpoint
    the earlier config kept must survive anyway (a tie kept as Orbax keeps it: the later)."""
    config = checkpointing_config()
    config.checkpoint.keep_last = 1
    wd = Workdir(tmp_path / "wd")
    manager = ckpt.make_manager(wd, config, best_metric="top1")
    promise = ckpt.keep_promise(config, "top1")
    for step, top1 in ((1, 0.5), (2, 0.9), (3, 0.3), (4, 0.9), (5, None)):
        _save(wd, manager, step, top1, promise)
    assert wd.steps() == [4, 5]
    manager.close()
    assert ckpt.promised_steps(wd, ckpt.keep_promise(config, None)) == {4: "the best top1"}
    manager = ckpt.make_manager(wd, config, best_metric=None)
    for step in (6, 7):
        _save(wd, manager, step, None, ckpt.keep_promise(config, None))
    assert wd.steps() == [4, 7]
    manager.close()


# ---- 6. the JSON items are verified too ----------------------------------------------------------

@pytest.mark.parametrize("item,edit", [
    ("data", lambda d: {"hosts": [{**d["hosts"][0], "position": d["hosts"][0]["position"] + 1}]}),
    ("meta", lambda d: {**d, "examples_seen": d["examples_seen"] + 8}),
])
def test_an_edited_input_position_or_counter_is_damage(trained, tmp_path, item, edit):
    wd = _copy(trained, tmp_path / "wd")
    path = wd / "checkpoints" / "6" / item / "metadata"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    lines = []
    train(Pretraining, checkpointing_config(steps=8), wd, print_fn=lines.append)
    assert lines[0].startswith("resumed from step 4")
    assert (wd / "checkpoints" / "6.damaged").is_dir()


def test_checkpoints_record_their_json_checksums(trained):
    from mwmae import checksum

    wd = Workdir(trained)
    meta = wd.read_meta(6)
    assert checksum.META_CHECKSUM in meta and checksum.DATA_CHECKSUM in meta
    assert meta["keep"] == {"keep_every_steps": 0, "best_metric": None}
    assert meta["total_steps"] == 6 and isinstance(meta["learning_rate"], float)


# ---- 7. the initial weights of a run started from pretrained ones -------------------------------

@pytest.mark.slow  # an integration run over 30 s: it runs in CI's slow group
def test_export_initial_of_an_init_from_run_is_what_it_started_from(trained, tmp_path):
    from mwmae import api, export
    from mwmae.model import encoder_keys

    source = tmp_path / "source"
    export.export_workdir(trained, str(source))
    config = checkpointing_config(steps=2, every=2)
    config.seed = 3
    config.init_from = str(source)
    run = tmp_path / "run"
    train(Pretraining, config, run, print_fn=_quiet)
    assert Workdir(run).read_meta(2)["initial"]["init_from"] == str(source)
    export.export_initial(run, str(tmp_path / "initial"))
    initial = api.load(str(tmp_path / "initial")).params
    taken = api.load(str(source)).params
    for key in encoder_keys(api.load(str(source)).config):
        jax.tree.map(np.testing.assert_array_equal, initial[key], taken[key])
    # The source retrained in place after the run began: refused, not silently other weights.
    export.export_workdir(trained, str(tmp_path / "other"), step=4)
    shutil.rmtree(source)
    shutil.copytree(tmp_path / "other", source)
    with pytest.raises(export.ExportError, match="no longer the weights the run started from"):
        export.export_initial(run, str(tmp_path / "initial2"))


# ---- the run's length ----------------------------------------------------------------------------

def test_a_longer_run_says_how_its_schedule_moves(trained, tmp_path):
    wd = _copy(trained, tmp_path / "wd")
    lines = []
    train(Pretraining, checkpointing_config(steps=10), wd, print_fn=lines.append)
    notice = [line for line in lines if line.startswith("run length")]
    assert notice and notice[0].startswith("run length 6 -> 10 steps: the learning-rate "
                                           "schedule is recomputed over 10 steps; the rate "
                                           "after step 6 moves from ")


def test_a_shorter_run_than_the_workdir_trains_nothing_and_writes_nothing(trained, tmp_path):
    wd = _copy(trained, tmp_path / "wd")
    before = _snapshot(wd)
    lines = []
    result = train(Pretraining, checkpointing_config(steps=4), wd, print_fn=lines.append)
    assert result["status"] == "done"
    assert any("step 6 is already at or past this config's 4 steps: nothing to train" in line
               for line in lines)
    after = _snapshot(wd)
    assert {k: v for k, v in after.items() if not k.startswith("goodput")} == {
        k: v for k, v in before.items() if not k.startswith("goodput")}


# ---- nothing written before a refusal ------------------------------------------------------------

def test_shards_matching_nothing_write_nothing(tmp_path):
    config = checkpointing_config()
    config.data.source = "shards"
    config.data.train_shards = str(tmp_path / "nowhere" / "*.tfrecord")
    config.data.num_train_examples = 64
    with pytest.raises(Exception, match="nowhere"):
        train(Pretraining, config, tmp_path / "wd", print_fn=_quiet)
    left = sorted(p.name for p in (tmp_path / "wd").glob("*")) if (tmp_path / "wd").exists() \
        else []
    assert not {"config.json", "checkpoints", "tensorboard"} & set(left), left


# ---- the command line's refusals are one line ----------------------------------------------------

def _cli(*args, workdir):
    return subprocess.run([sys.executable, "-m", "mwmae.train", "--workdir", str(workdir),
                           *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,expect", [
    (["--config", "configs/nope.py"], "error: --config configs/nope.py: no such config file"),
    (["--config", "configs/tiny.py", "--config.batch_size=abc"],
     "error: --config.batch_size=abc: "),
])
def test_cli_config_refusals_are_one_line(tmp_path, args, expect):
    r = subprocess.run([sys.executable, "-m", "mwmae.train", "--workdir", str(tmp_path / "wd"),
                        *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith(expect), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "wd").exists()


def test_a_workdir_that_is_an_artifact_or_a_file_is_refused(trained, tmp_path):
    from mwmae import export
    from mwmae.workdir import WorkdirError

    art = tmp_path / "art"
    export.export_workdir(trained, str(art))
    before = _snapshot(art)
    with pytest.raises(WorkdirError, match="an exported artifact, not a training workdir"):
        train(Pretraining, checkpointing_config(), art, print_fn=_quiet)
    assert _snapshot(art) == before and not (art / "checkpoints").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="a file, not a folder"):
        train(Pretraining, checkpointing_config(), tmp_path / "file", print_fn=_quiet)


def test_a_workdir_inside_an_artifact_or_a_workdir_is_refused(trained, tmp_path):
    from mwmae import export
    from mwmae.workdir import WorkdirError

    art = tmp_path / "art"
    export.export_workdir(trained, str(art))
    with pytest.raises(WorkdirError, match="inside the exported artifact"):
        train(Pretraining, checkpointing_config(), art / "run", print_fn=_quiet)
    wd = _copy(trained, tmp_path / "wd")
    with pytest.raises(WorkdirError, match="inside the training workdir"):
        train(Pretraining, checkpointing_config(), wd / "checkpoints" / "run", print_fn=_quiet)
    assert not (art / "run").exists() and not (wd / "checkpoints" / "run").exists()


def test_preflight_out_never_replaces_a_workdir_file_or_another_file(trained, tmp_path):
    from mwmae.preflight.run import check_out
    from mwmae.workdir import WorkdirError

    for out in (trained / "config.json", trained, trained / "checkpoints" / "r.json"):
        with pytest.raises(WorkdirError, match="a file of the workdir"):
            check_out(str(out), str(trained))
    check_out(str(trained / "preflight.json"), str(trained))   # its own file
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(WorkdirError, match="not a preflight report"):
        check_out(str(tmp_path / "notes.txt"), None)
    (tmp_path / "old.json").write_text(json.dumps({"verdict": "ok"}))
    check_out(str(tmp_path / "old.json"), None)   # an earlier report is replaced
    assert Workdir(trained).owns(trained / "tensorboard" / "x")
    assert not Workdir(trained).owns(trained / "export")


@pytest.mark.parametrize("key,value", [
    ("seed", -1), ("model.mask_ratio", 0.0), ("model.mask_ratio", 1.0),
    ("optimizer.base_learning_rate", -1.0), ("optimizer.base_learning_rate", float("nan")),
    ("optimizer.weight_decay", -0.1), ("optimizer.warmup_epochs", -1.0),
    ("optimizer.grad_clip_norm", -1.0), ("optimizer.b1", 1.5), ("optimizer.eps", 0.0),
])
def test_odd_numeric_settings_are_refused_naming_the_key(key, value):
    from mwmae.train.config import ConfigError, check_config

    config = checkpointing_config()
    set_key(config, key, value)
    with pytest.raises(ConfigError, match=rf"{key}="):
        check_config(config)


@pytest.mark.slow  # an integration run over 30 s: it runs in CI's slow group
def test_export_initial_of_a_tagger_is_the_encoder_it_started_from(tmp_path):
    from tag_helpers import FRAMES, tiny_tag_config, write_split

    from mwmae import api, export
    from mwmae.artifact import save_artifact
    from mwmae.finetune.tagging import Tagging
    from mwmae.model import encoder_keys, init_params
    from mwmae.train.config import model_config_from

    config = tiny_tag_config(write_split(tmp_path / "data", "train", 16, seed=0), "", steps=2)
    config.checkpoint.every_steps = 2
    model = model_config_from(config)
    assert model.img_size == (FRAMES, 80)
    source = tmp_path / "pretrained"
    save_artifact(str(source), model, jax.device_get(init_params(model, jax.random.key(11))),
                  source="test")
    config.init_from = str(source)
    train(Tagging, config, tmp_path / "wd", print_fn=_quiet)
    export.export_initial(tmp_path / "wd", str(tmp_path / "initial"))
    initial, taken = api.load(str(tmp_path / "initial")), api.load(str(source))
    for key in encoder_keys(model):
        jax.tree.map(np.testing.assert_array_equal, initial.params[key], taken.params[key])


def test_convert_never_writes_into_its_source_or_over_another_artifact(original_checkpoint,
                                                                       tmp_path, capsys):
    from mwmae import convert

    src = _copy(original_checkpoint, tmp_path / "orig")
    before = _snapshot(src)
    for dst in (src, src / "art", tmp_path):
        assert convert.main([str(src), str(dst)]) == 2
        assert "overlaps the original checkpoint folder" in capsys.readouterr().err
    assert _snapshot(src) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert convert.main([str(src), str(tmp_path / "other")]) == 2
    assert "choose a new or empty folder" in capsys.readouterr().err
    assert convert.main([str(src), str(tmp_path / "art")]) == 0
    config = json.loads((tmp_path / "art" / "config.json").read_text())
    config["source"] = "edited"
    (tmp_path / "art" / "config.json").write_text(json.dumps(config))
    assert convert.main([str(src), str(tmp_path / "art")]) == 2   # another artifact now
    assert convert.main([str(src), str(tmp_path / "art"), "--overwrite"]) == 0
