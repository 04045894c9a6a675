"""Checkpoint contents, damaged checkpoints, other meshes, gs://, policies, divergence guard."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from train_helpers import checkpointing_config, nan_at

from mwmae.data.sources import SyntheticSource
from mwmae.train import checkpoint as ckpt
from mwmae.train.engine import Engine
from mwmae.train.loop import train
from mwmae.train.pretraining import Pretraining
from mwmae.workdir import Workdir

_config = checkpointing_config


def _params_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_holds_state_input_position_and_counters(trained):
    meta = json.loads((trained / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["step"] == 6 and meta["examples_seen"] == 48 and meta["skipped_steps"] == 0
    assert meta["config"]["model"]["decoder_window_sizes"] == [5, 25, 0, 0]
    data = json.loads((trained / "checkpoints" / "6" / "data" / "metadata").read_text())
    assert data == {"hosts": [{"position": 6}]}
    assert sorted(int(p.name) for p in (trained / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4, 6]


def test_damaged_checkpoint_is_set_aside_with_a_warning(trained, tmp_path, caplog):
    run = pathlib.Path(shutil.copytree(trained, tmp_path / "wd"))
    # truncate the newest checkpoint's array data, as a crash during a copy would
    for f in (run / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and "d" == f.parent.name:
            f.write_bytes(f.read_bytes()[:10])
    t = Engine(Pretraining(_config()), run)
    wd = Workdir(run)
    with caplog.at_level("WARNING"):
        state, data, meta = ckpt.restore_latest(wd, ckpt.make_manager(wd, t.config),
                                                t.abstract_state())
    assert int(state.step) == 4 and meta["step"] == 4 and data == {"position": 4}
    assert any("checkpoints/6: unreadable" in r.getMessage() for r in caplog.records)
    assert (run / "checkpoints" / "6.damaged").is_dir() and wd.steps() == [2, 4]


def test_restore_onto_another_mesh_gives_identical_parameters(tmp_path):
    config = _config(steps=2)
    config.mesh.preset = "fsdp_tp"
    t8 = Engine(Pretraining(config), tmp_path, devices=jax.devices()[:8])
    state = t8.initial_state()
    wd = Workdir(tmp_path)
    manager = ckpt.make_manager(wd, config)
    ckpt.save_checkpoint(wd, manager, 1, state, {"position": 1}, {"step": 1}, force=True)
    manager.wait_until_finished()

    other = _config(steps=2)
    other.mesh.preset = "dp"
    t4 = Engine(Pretraining(other), tmp_path, devices=jax.devices()[:4])
    restored, _, _ = ckpt.restore_latest(wd, ckpt.make_manager(wd, other),
                                         t4.abstract_state())
    _params_equal(restored.params, state.params)
    kernel = restored.params["encoder"]["layers"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.devices.size == 4
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None)


def test_keep_last_and_keep_every(tmp_path):
    config = _config(steps=12, every=2)
    config.checkpoint.keep_last = 2
    config.checkpoint.keep_every_steps = 4
    train(Pretraining, config, tmp_path, print_fn=lambda _: None)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [4, 8, 10, 12]


def test_a_new_emulator_is_empty_through_orbaxs_path_layer_too():
    """Orbax lists checkpoints through etils' epath, which keeps its own gcsfs instance: a
    listing left from an earlier emulator must not make a fresh bucket hold old steps."""
    import gcs_emulator
    from etils import epath

    run = epath.Path("gs://ckpt-bucket/run/checkpoints")
    with gcs_emulator.emulated_gcs(("ckpt-bucket",)):
        (run / "2").mkdir(parents=True)
        (run / "2" / "meta").write_text("{}")
        assert [p.name for p in run.iterdir()] == ["2"]
    with gcs_emulator.emulated_gcs(("ckpt-bucket",)):
        assert not run.exists()


def test_save_and_restore_on_gs_through_the_emulator(tmp_path):
    import gcs_emulator

    with gcs_emulator.emulated_gcs(("ckpt-bucket",)):
        config = _config(steps=2)
        t = Engine(Pretraining(config), "gs://ckpt-bucket/run")
        state = t.initial_state()
        wd = Workdir("gs://ckpt-bucket/run")
        manager = ckpt.make_manager(wd, config)
        ckpt.save_checkpoint(wd, manager, 2, state, {"position": 2}, {"step": 2}, force=True)
        manager.wait_until_finished()
        assert manager.all_steps() == [2] and wd.steps() == [2]
        again = ckpt.make_manager(wd, config)
        restored, data, meta = ckpt.restore_latest(wd, again, t.abstract_state())
        _params_equal(restored.params, state.params)
        assert data == {"position": 2} and meta["step"] == 2 and meta["checksums"]


def test_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(SyntheticSource, "next_local", nan_at(3))
    config = _config(steps=5)
    config.nonfinite_policy = "skip"
    config.log_every_steps = 1
    metrics = train(Pretraining, config, tmp_path, print_fn=lambda _: None)
    assert metrics["skipped_steps"] == 1 and np.isfinite(metrics["loss"])
    meta = json.loads((tmp_path / "checkpoints" / "5" / "meta" / "metadata").read_text())
    assert meta["skipped_steps"] == 1


def test_nonfinite_step_stops_naming_the_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(SyntheticSource, "next_local", nan_at(3))
    config = _config(steps=6)
    config.log_every_steps = 1
    with pytest.raises(FloatingPointError, match=r"at step 3 .*Last verified checkpoint: .*"
                                                 r"checkpoints/2"):
        train(Pretraining, config, tmp_path, print_fn=lambda _: None)


def test_inspect_cli_lists_checkpoints(tmp_path, capsys):
    from mwmae.checkpoint import main

    train(Pretraining, _config(steps=4), tmp_path, print_fn=lambda _: None)
    shutil.copytree(tmp_path / "checkpoints" / "4", tmp_path / "checkpoints" /
                    "6.orbax-checkpoint-tmp-123")
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4  complete" in out and "2  complete" in out
    assert "6.orbax-checkpoint-tmp-123  incomplete" in out
    assert "decoder_window_sizes" in out


def test_ctrl_c_saves_at_the_end_of_the_step_and_reports_interrupted(tmp_path, monkeypatch):
    import os
    import signal

    original = SyntheticSource.next_local

    def next_local(self):
        if self.position == 3:
            os.kill(os.getpid(), signal.SIGINT)   # as a terminal's Ctrl-C during step 4
        return original(self)
    monkeypatch.setattr(SyntheticSource, "next_local", next_local)
    config = _config(steps=50, every=0)
    lines = []
    before = signal.getsignal(signal.SIGINT)  # a background CI job may inherit SIG_IGN
    result = train(Pretraining, config, tmp_path, print_fn=lines.append)
    assert result["status"] == "interrupted"
    assert "interrupted: saving step 4 and stopping" in lines
    assert Workdir(tmp_path).steps() == [4]
    assert signal.getsignal(signal.SIGINT) is before  # handler put back


def test_checksums_detect_a_flipped_bit_on_gs(tmp_path):
    import gcs_emulator
    import gcsfs

    with gcs_emulator.emulated_gcs(("ckpt-bucket",)):
        config = _config(steps=2)
        t = Engine(Pretraining(config), "gs://ckpt-bucket/run")
        wd = Workdir("gs://ckpt-bucket/run")
        manager = ckpt.make_manager(wd, config)
        for step in (1, 2):
            ckpt.save_checkpoint(wd, manager, step, t.initial_state(), {"position": step},
                                 {"step": step}, force=True)
        manager.wait_until_finished()
        fs = gcsfs.GCSFileSystem()
        files = [f for f in fs.find("ckpt-bucket/run/checkpoints/2/state") if "/d/" in f]
        target = max(files, key=lambda f: fs.size(f))
        data = bytearray(fs.cat_file(target))
        data[len(data) // 2] ^= 0x10
        fs.pipe_file(target, bytes(data))
        state, _, meta = ckpt.restore_latest(wd, ckpt.make_manager(wd, config),
                                             t.abstract_state())
        assert meta["step"] == 1 and wd.steps() == [1]
        assert fs.isdir("ckpt-bucket/run/checkpoints/2.damaged")
