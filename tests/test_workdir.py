"""The workdir: refusing a changed config, verified checkpoints, config checks, one layout owner."""

import hashlib
import json
import pathlib
import re

import jax
import numpy as np
import pytest
from train_helpers import REPO, checkpointing_config, nan_at

from mwmae import checksum
from mwmae.data.sources import SyntheticSource
from mwmae.train import checkpoint as ckpt
from mwmae.train.config import ConfigError, check_config
from mwmae.train.engine import Engine
from mwmae.train.loop import train
from mwmae.train.pretraining import Pretraining
from mwmae.workdir import ConfigMismatch, Workdir

_config = checkpointing_config


def _quiet(*_):
    pass


def _snapshot(root: pathlib.Path) -> dict[str, str]:
    """Every file under root with its content hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- 1. another architecture on the same workdir ------------------------------------------------

def test_changed_architecture_is_refused_and_the_workdir_left_byte_identical(trained, tmp_path):
    wd = _copy(trained, tmp_path / "wd")
    before = _snapshot(wd)
    config = _config(steps=10)
    config.model.embed_dim = 128
    config.optimizer.weight_decay = 0.1
    with pytest.raises(ConfigMismatch) as e:
        train(Pretraining, config, wd, print_fn=_quiet)
    message = str(e.value)
    assert "model.embed_dim: 64 -> 128" in message and "optimizer.weight_decay" in message
    assert "new --workdir" in message and "Nothing was written" in message
    assert _snapshot(wd) == before
    assert Workdir(wd).steps() == [2, 4, 6]


def test_settings_that_may_change_on_resume_are_accepted(trained, tmp_path):
    wd = _copy(trained, tmp_path / "wd")
    config = _config(steps=8, every=4)
    config.log_every_steps = 3
    config.checkpoint.keep_last = 5
    config.mesh.preset = "fsdp"
    lines = []
    train(Pretraining, config, wd, print_fn=lines.append)
    assert lines[0].startswith("resumed from step 6")
    assert json.loads((wd / "config.json").read_text())["num_train_steps"] == 8
    assert Workdir(wd).steps() == [2, 4, 6, 8]


def test_a_checkpoint_of_another_shape_is_a_mismatch_not_damage(trained, tmp_path):
    """Even without config.json (so no comparison), a shape difference never sets aside."""
    wd = _copy(trained, tmp_path / "wd")
    (wd / "config.json").unlink()
    config = _config()
    config.model.embed_dim = 128
    t = Engine(Pretraining(config), wd)
    w = Workdir(wd)
    with pytest.raises(ConfigMismatch, match=r"checkpoints/6: the checkpoint holds another"):
        ckpt.restore_latest(w, ckpt.make_manager(w, config), t.abstract_state())
    assert w.steps() == [2, 4, 6] and not list((wd / "checkpoints").glob("*.damaged"))


# ---- 2 and 5. config validation ------------------------------------------------------------------

@pytest.mark.parametrize("key,value,expect", [
    ("checkpoint.keep_last", 0, "checkpoint.keep_last=0: must be >= 1"),
    ("num_train_steps", 0, "num_train_steps=0: must be >= 1, or -1"),
    ("num_train_steps", -5, "num_train_steps=-5"),
    ("num_epochs", -1, "num_epochs=-1: must be >= 1"),
    ("batch_size", -8, "batch_size=-8: must be >= 1"),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps=-1"),
    ("log_every_steps", 0, "log_every_steps=0"),
    ("data.on_error", "ignore", "data.on_error='ignore': must be one of 'raise', 'skip'"),
    ("nonfinite_policy", "halt", "nonfinite_policy='halt'"),
    ("lease_seconds", 0.0, "lease_seconds=0.0"),
])
def test_bad_values_are_rejected_before_anything_is_built(key, value, expect, tmp_path):
    config = _config()
    if key == "num_epochs":
        config.num_train_steps = -1
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as e:
        train(Pretraining, config, tmp_path / "wd", print_fn=_quiet)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "wd").exists()


def test_unknown_keys_name_the_nearest_valid_ones():
    config = _config()
    with config.unlocked():
        config.checkpoint.keep_lst = 2
    with pytest.raises(ConfigError, match=r"unknown config key 'checkpoint.keep_lst'; nearest "
                                          r"valid: checkpoint.keep_last"):
        check_config(config)


def test_cli_unknown_override_is_one_line(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mwmae.train", "--config",
                        str(REPO / "configs/tiny.py"), "--workdir", str(tmp_path / "wd"),
                        "--config.num_train_step=5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: unknown config key 'num_train_step'; nearest valid: "
                               "num_train_steps"), r.stderr
    assert not (tmp_path / "wd").exists()


# ---- 4. verified checkpoints ---------------------------------------------------------------------

def _flip_a_byte_in_arrays(step_dir: pathlib.Path) -> None:
    """Flip one bit in the middle of the largest array-data file, as bad storage would."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    target = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))


def test_checksums_are_mesh_independent_and_match_numpy():
    x = np.random.default_rng(0).standard_normal((8, 6, 4)).astype(np.float32)
    mesh = jax.make_mesh((4,), ("a",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a")))
    on_device = checksum.tree_checksums({"w": sharded, "i": np.arange(5, dtype=np.int32)})
    assert on_device["w"] == checksum.array_checksum_np(x)
    assert on_device["i"] == checksum.array_checksum_np(np.arange(5, dtype=np.int32))
    flipped = x.copy()
    flipped.view(np.uint32)[3, 2, 1] ^= 1 << 7
    assert checksum.array_checksum_np(flipped) != checksum.array_checksum_np(x)


def test_a_flipped_bit_is_caught_set_aside_and_the_run_resumes_from_the_previous(trained,
                                                                                 tmp_path):
    wd = _copy(trained, tmp_path / "wd")
    _flip_a_byte_in_arrays(wd / "checkpoints" / "6")
    lines = []
    config = _config(steps=8)
    train(Pretraining, config, wd, print_fn=lines.append)
    assert lines[0].startswith("resumed from step 4")
    assert (wd / "checkpoints" / "6.damaged").is_dir()
    assert Workdir(wd).steps() == [4, 6, 8]   # 6 rewritten by the resumed run; keep_last 3
    rows = {r.name: r.status for r in Workdir(wd).inspect()}
    assert rows["6.damaged"] == "damaged" and rows["6"] == "complete"


def test_export_and_load_refuse_a_flipped_checkpoint(trained, tmp_path, capsys):
    import mwmae
    from mwmae import export

    wd = _copy(trained, tmp_path / "wd")
    # Parameters are a third of the state: flips spread over every data file hit them surely.
    for f in (wd / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            data = bytearray(f.read_bytes())
            for i in range(1, 64):
                data[i * len(data) // 64] ^= 0x10
            f.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"checkpoints/6: .*(checksum|unreadable)"):
        mwmae.load(wd)
    assert export.main(["--workdir", str(wd), "--with_decoder", "--out",
                        str(tmp_path / "x")]) == 2
    assert "checkpoints/6" in capsys.readouterr().err
    assert export.main(["--workdir", str(wd), "--step", "4", "--out", str(tmp_path / "x")]) == 0


def test_divergence_guard_names_the_newest_verified_checkpoint(trained, tmp_path, monkeypatch):
    wd = _copy(trained, tmp_path / "wd")
    _flip_a_byte_in_arrays(wd / "checkpoints" / "6")
    monkeypatch.setattr(SyntheticSource, "next_local", nan_at(6))
    config = _config(steps=10)
    config.log_every_steps = 1
    with pytest.raises(FloatingPointError, match=r"Last verified checkpoint: .*checkpoints/4\."):
        train(Pretraining, config, wd, print_fn=_quiet)


# ---- one owner of the layout ---------------------------------------------------------------------

def test_no_other_module_spells_the_workdir_layout():
    # Path pieces joined by hand (`/ "checkpoints"`, `"trace" /`), and Orbax's internal names.
    pieces = ["checkpoints", "tensorboard", "trace", "writer.lease", "config.json", "state",
              "meta", "metadata"]
    joined = re.compile(r'/\s*f?"(?:{})\b|f?"(?:{})"\s*/'.format("|".join(map(re.escape, pieces)),
                                                          "|".join(map(re.escape, pieces))))
    internals = ["commit_success", "_CHECKPOINT_METADATA", "orbax-checkpoint-tmp", ".damaged"]
    offenders = []
    for path in sorted((REPO / "mwmae").rglob("*.py")):
        if path.name == "workdir.py" or path.parent.name == "hear" or path.name == "convert.py":
            continue  # the owner; the HEAR and original-format folders are not workdirs
        code = re.sub(r'"""[\s\S]*?"""', "", path.read_text())  # docstrings may describe it
        offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in joined.finditer(code)]
        offenders += [f"{path.relative_to(REPO)}: {n}" for n in internals if n in code]
    assert not offenders, offenders


@pytest.mark.parametrize("entry", ["mwmae.train.loop", "mwmae.export", "mwmae.checkpoint",
                                   "hear_mwmae"])
def test_every_entry_point_uses_the_tested_gs_client(entry):
    """Without EPATH_USE_TF in the environment (a real TPU VM), gs:// workdir paths still go
    through fsspec/gcsfs, the client the emulator tests exercise, not TensorFlow's."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}
    code = (f"import {entry}; from etils import epath; "
            "print(type(epath.Path('gs://bucket/run')._backend).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "_FileSystemSpecBackend", r.stdout
