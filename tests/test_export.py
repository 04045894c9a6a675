"""Export: original checkpoints and (multi-host, sharded) training checkpoints -> artifacts that
mwmae.load and the HEAR module read; encoder-only artifacts; clear errors."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
from flax.traverse_util import flatten_dict
from train_helpers import load_config

import mwmae
from mwmae import export
from mwmae.artifact import ArtifactError, load_artifact
from mwmae.model import encoder_keys, init_params
from mwmae.train.config import model_config_from
from mwmae.train.loop import train
from mwmae.train.pretraining import Pretraining
from mwmae.workdir import Workdir

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tiny(steps: int):
    config = load_config("tiny")
    config.num_train_steps = steps
    config.checkpoint.every_steps = 2
    config.image_every_steps = 0
    config.log_every_steps = 100
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    """4 steps of the tiny model, FSDP over the 8 test devices (params sharded): steps 2, 4."""
    config = _tiny(4)
    config.mesh.preset = "fsdp"
    out = tmp_path_factory.mktemp("run")
    train(Pretraining, config, out, print_fn=lambda s: None)
    return out


# ---- original checkpoints --------------------------------------------------------------------

def test_export_from_original_is_encoder_only_and_matches(original_checkpoint, tmp_path, fixtures,
                                                          capsys):
    out = tmp_path / "art"
    assert export.main(["--from-original", str(original_checkpoint), "--out", str(out)]) == 0
    assert "encoder only" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())
    assert meta["encoder_only"] is True and meta["version"] == 3
    assert meta["sample_rate"] == 16000 and meta["front_end"]["hop_length"] == 160
    assert meta["embedding_size"] == 960 and meta["model"]["embed_dim"] == 192
    assert meta["params_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()
                                                   ).hexdigest()
    config, params, _ = load_artifact(out)
    assert set(params) == set(encoder_keys(config)) and "decoder" not in params
    model = mwmae.load(out)
    assert not model.has_decoder
    np.testing.assert_allclose(np.asarray(model.features(fixtures["input"])),
                               fixtures["features"], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no decoder weights.*--with-decoder"):
        model.reconstruct(fixtures["input"], noise=fixtures["mae_noise"])


def test_export_with_decoder_reconstructs(original_checkpoint, tmp_path, fixtures):
    out = tmp_path / "full"
    assert export.main(["--from_original", str(original_checkpoint), "--out", str(out),
                        "--with_decoder"]) == 0
    assert json.loads((out / "config.json").read_text())["encoder_only"] is False
    model = mwmae.load(out)
    assert model.has_decoder
    rec = model.reconstruct(fixtures["input"], noise=fixtures["mae_noise"])
    np.testing.assert_allclose(np.asarray(rec.pred), fixtures["mae_pred"], atol=1e-5, rtol=0)


# ---- training workdirs -----------------------------------------------------------------------

def test_export_latest_and_chosen_step(workdir, tmp_path):
    assert Workdir(workdir).steps() == [2, 4]
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "latest")]) == 0
    assert export.main(["--workdir", str(workdir), "--step", "2",
                        "--out", str(tmp_path / "s2")]) == 0
    latest, s2 = mwmae.load(tmp_path / "latest"), mwmae.load(tmp_path / "s2")
    assert json.loads((tmp_path / "latest" / "config.json").read_text())["step"] == 4
    assert not latest.has_decoder
    # The full training state, restored by mwmae.load from the workdir (latest step).
    full = mwmae.load(workdir)
    assert full.has_decoder
    for k, v in flatten_dict(latest.params).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten_dict(full.params)[k]))
    x = np.random.default_rng(0).standard_normal((2, 200, 80, 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(latest.features(x)), np.asarray(full.features(x)))
    assert not np.allclose(np.asarray(s2.features(x)), np.asarray(latest.features(x)))


def test_export_of_a_relative_workdir(workdir, tmp_path, monkeypatch):
    """Orbax finds no item metadata under a relative path; export makes local paths absolute."""
    monkeypatch.chdir(workdir.parent)
    assert export.main(["--workdir", workdir.name, "--out", str(tmp_path / "rel")]) == 0
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["step"] == 4
    assert mwmae.load(workdir.name).has_decoder


def test_export_initial_is_the_trainers_starting_point(workdir, tmp_path, capsys):
    """--initial: the run's untrained weights (the baseline), equal to the trainer's step 0."""
    from mwmae.train.engine import Engine
    from mwmae.train.pretraining import Pretraining

    assert export.main(["--workdir", str(workdir), "--initial",
                        "--out", str(tmp_path / "init")]) == 0
    meta = json.loads((tmp_path / "init" / "config.json").read_text())
    assert meta["step"] == 0 and meta["encoder_only"]
    config = _tiny(4)
    config.mesh.preset = "fsdp"
    engine = Engine(Pretraining(config), tmp_path / "t")
    start = flatten_dict(jax.device_get(engine.initial_state().params))
    initial = flatten_dict(mwmae.load(tmp_path / "init").params)
    keys = encoder_keys(model_config_from(config))
    assert set(initial) == {k for k in start if k[0] in keys}
    for k, v in initial.items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(start[k]), err_msg=str(k))
    trained = flatten_dict(mwmae.load(workdir).params)
    assert not np.allclose(np.asarray(trained[("patch_embed", "kernel")]),
                           np.asarray(initial[("patch_embed", "kernel")]))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        export.main(["--workdir", str(workdir), "--initial", "--step", "2", "--out", "x"])
    assert "--initial needs --workdir and no --step" in capsys.readouterr().err


def test_export_errors_name_the_problem(workdir, tmp_path, capsys):
    assert export.main(["--workdir", str(workdir), "--step", "3", "--out",
                        str(tmp_path / "x")]) == 2
    assert "no checkpoint for step 3; finished steps: [2, 4]" in capsys.readouterr().err
    assert export.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    # A workdir whose config.json disagrees with its checkpoint (config/weights mismatch).
    other = tmp_path / "mismatch"
    other.mkdir()
    (other / "checkpoints").symlink_to(workdir / "checkpoints")
    cfg = json.loads((workdir / "config.json").read_text())
    cfg["model"]["embed_dim"] = 96
    (other / "config.json").write_text(json.dumps(cfg))
    assert export.main(["--workdir", str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "patch_embed/kernel" in err
    assert not (tmp_path / "x").exists()


def test_corrupt_or_mismatched_artifacts_fail_clearly(workdir, tmp_path):
    out = tmp_path / "art"
    export.export_workdir(workdir, str(out))
    (out / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json: not valid JSON"):
        mwmae.load(out)
    export.export_workdir(workdir, str(out), overwrite=True)
    meta = json.loads((out / "config.json").read_text())
    meta["model"]["depth"] = 3
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="weights do not match the config"):
        mwmae.load(out)
    export.export_workdir(workdir, str(out), overwrite=True)
    (out / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="model.safetensors: missing"):
        mwmae.load(out)


# ---- a checkpoint written by two hosts -------------------------------------------------------

@pytest.mark.slow
def test_export_gathers_a_two_host_sharded_checkpoint(tmp_path):
    """Two processes x 4 devices train one step with FSDP; each host writes its own shards.
    The step's learning rate is 0 (warmup starts at 0), so the checkpoint's parameters are the
    initial ones, which init_params reproduces in this process independently of any mesh."""
    wd = tmp_path / "run"
    port = portpicker.pick_unused_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mwmae.train", "--config", str(REPO / "configs/tiny.py"),
         "--workdir", str(wd), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}", "--config.num_train_steps=1", "--config.mesh.preset=fsdp",
         "--config.image_every_steps=0"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)]
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    state = wd / "checkpoints" / "1" / "state"
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()

    out = tmp_path / "art"
    assert export.main(["--workdir", str(wd), "--out", str(out)]) == 0
    _, params, meta = load_artifact(out)
    config = model_config_from(load_config("tiny"))
    want = flatten_dict(init_params(config, jax.random.key(load_config("tiny").seed)))
    got = flatten_dict(params)
    assert set(got) == {k for k in want if k[0] in encoder_keys(config)}
    for k, v in got.items():
        np.testing.assert_allclose(v, np.asarray(want[k]), atol=1e-6, rtol=0, err_msg=str(k))
    assert meta["step"] == 1


# ---- outputs that would lose or mix something --------------------------------------------------

def _last_err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def workdir_copy(workdir, tmp_path) -> pathlib.Path:
    """A copy of the module's workdir that a test may damage or prune."""
    import shutil

    return pathlib.Path(shutil.copytree(workdir, tmp_path / "runs" / "w1", symlinks=True))


def test_export_refuses_an_out_that_overlaps_a_workdir(workdir_copy, tmp_path, capsys):
    wd = workdir_copy
    before = _snapshot(wd.parent)
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "checkpoints").mkdir()
    (other / "config.json").write_text('{"model": {}, "seed": 0}')
    cases = [
        (["--workdir", str(wd), "--out", str(wd)], "is the --workdir"),
        (["--workdir", str(wd), "--initial", "--out", str(wd)], "is the --workdir"),
        (["--workdir", str(wd), "--out", str(wd / "checkpoints" / "art")],
         "inside the --workdir"),
        (["--workdir", str(wd), "--out", str(wd / "tensorboard")], "inside the --workdir"),
        (["--workdir", str(wd), "--out", str(wd / "config.json")], "inside the --workdir"),
        (["--workdir", str(wd), "--out", str(wd.parent)], "--workdir " + str(wd) + " lies inside"),
        (["--workdir", str(wd), "--out", str(other)], "a training workdir"),
    ]
    for argv, message in cases:
        assert export.main(argv) == 2, argv
        last = _last_err(capsys)
        assert last.startswith("error: --out") and message in last, (argv, last)
        assert "nothing was written" in last.lower(), last
    assert _snapshot(wd.parent) == before
    assert not (wd / "model.safetensors").exists() and not (wd / "export").exists()
    assert _snapshot(other) == {"config.json": b'{"model": {}, "seed": 0}'}
    # A folder of its own directly in the workdir (what a sweep point does) is fine.
    assert export.main(["--workdir", str(wd), "--out", str(wd / "export")]) == 0
    assert {k: v for k, v in _snapshot(wd.parent).items()
            if not k.startswith("w1/export/")} == before
    assert Workdir(wd).steps() == [2, 4]


def test_export_refuses_an_out_that_overlaps_the_original(original_checkpoint, tmp_path, capsys):
    import shutil

    src = pathlib.Path(shutil.copytree(original_checkpoint, tmp_path / "orig"))
    before = _snapshot(src)
    for out, message in ((src, "is the --from-original"),
                         (src / "art", "inside the --from-original"), (tmp_path, "lies inside")):
        assert export.main(["--from-original", str(src), "--out", str(out)]) == 2
        last = _last_err(capsys)
        assert message in last and str(src) in last, last
    assert _snapshot(src) == before


def test_export_into_an_existing_artifact_needs_overwrite(workdir, tmp_path, capsys):
    art = tmp_path / "art"
    assert export.main(["--workdir", str(workdir), "--step", "2", "--out", str(art)]) == 0
    first = _snapshot(art)
    capsys.readouterr()
    assert export.main(["--workdir", str(workdir), "--out", str(art)]) == 2
    last = _last_err(capsys)
    assert "already holds another artifact" in last and "--overwrite" in last, last
    assert last.startswith(f"error: --out {art}") and "@2" in last, last
    assert _snapshot(art) == first
    assert export.main(["--workdir", str(workdir), "--out", str(art), "--overwrite"]) == 0
    assert json.loads((art / "config.json").read_text())["step"] == 4
    assert mwmae.load(art).num_params > 0
    # Nothing left beside it: the new artifact was built in a sibling and swapped in.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert sorted(p.name for p in art.iterdir()) == ["config.json", "model.safetensors"]
    # An existing empty folder is a fine place to export to.
    (tmp_path / "empty").mkdir()
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "empty")]) == 0


def test_exporting_the_same_weights_again_leaves_the_artifact_alone(workdir, tmp_path, capsys):
    """A rerun of a pipeline (the demo, a sweep point) exports the same step again: nothing to
    replace, so no --overwrite needed, and the files are not rewritten."""
    art = tmp_path / "art"
    assert export.main(["--workdir", str(workdir), "--out", str(art)]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in art.iterdir()}
    first = _snapshot(art)
    capsys.readouterr()
    assert export.main(["--workdir", str(workdir), "--out", str(art)]) == 0
    assert "identical" in capsys.readouterr().out
    assert _snapshot(art) == first
    assert {p.name: p.stat().st_mtime_ns for p in art.iterdir()} == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_export_never_replaces_a_folder_of_other_files(workdir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("keep me too")
    for out in (mine, tmp_path / "a_file"):
        for extra in ([], ["--overwrite"]):
            assert export.main(["--workdir", str(workdir), "--out", str(out), *extra]) == 2
            last = _last_err(capsys)
            assert last.startswith(f"error: --out {out}") and "not an artifact" in last, last
    assert _snapshot(mine) == {"notes.txt": b"keep me"}
    assert (tmp_path / "a_file").read_text() == "keep me too"


def test_a_failed_overwrite_keeps_the_old_artifact(workdir, tmp_path, monkeypatch, capsys):
    import mwmae.artifact as artifact

    art = tmp_path / "art"
    assert export.main(["--workdir", str(workdir), "--step", "2", "--out", str(art)]) == 0
    first = _snapshot(art)
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("config.json"):
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", full_disk)
    assert export.main(["--workdir", str(workdir), "--out", str(art), "--overwrite"]) == 1
    assert "No space left on device" in _last_err(capsys)
    assert _snapshot(art) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    monkeypatch.undo()
    assert json.loads((art / "config.json").read_text())["step"] == 2
    mwmae.load(art)


def _deleting(monkeypatch, wd: pathlib.Path, step: int, when: str) -> list[int]:
    """Delete checkpoints/STEP the first time the export's checkpoint manager calls ``when``
    for it: what a running job's retention does between the export's listing and its read."""
    import shutil

    real_manager = Workdir.manager
    deleted: list[int] = []

    def manager(self, *args, **kwargs):
        m = real_manager(self, *args, **kwargs)
        real = getattr(m, when)

        def call(s, *a, **k):
            if s == step and not deleted:
                shutil.rmtree(wd / "checkpoints" / str(step))
                deleted.append(step)
            return real(s, *a, **k)

        setattr(m, when, call)
        return m

    monkeypatch.setattr(Workdir, "manager", manager)
    return deleted


@pytest.mark.parametrize("when", ["item_metadata", "restore"])
def test_export_of_the_latest_step_retries_when_retention_deletes_it(workdir_copy, tmp_path,
                                                                     monkeypatch, capsys, when):
    deleted = _deleting(monkeypatch, workdir_copy, 4, when)
    out = tmp_path / "art"
    assert export.main(["--workdir", str(workdir_copy), "--out", str(out)]) == 0
    assert deleted == [4]
    printed = capsys.readouterr().out
    assert "step 4" in printed and "deleted" in printed and "exporting step 2" in printed, printed
    assert json.loads((out / "config.json").read_text())["step"] == 2
    mwmae.load(out)


def test_export_of_a_chosen_step_that_is_deleted_names_it(workdir_copy, tmp_path, monkeypatch,
                                                          capsys):
    _deleting(monkeypatch, workdir_copy, 4, "item_metadata")
    out = tmp_path / "art"
    assert export.main(["--workdir", str(workdir_copy), "--step", "4", "--out", str(out)]) == 2
    last = _last_err(capsys)
    assert "step 4" in last and "deleted while" in last and "[2]" in last, last
    assert not out.exists()


def test_a_damaged_latest_checkpoint_stays_an_error(workdir_copy, tmp_path, capsys):
    """Only a checkpoint that is gone is replaced by an older one; damage is reported."""
    state = workdir_copy / "checkpoints" / "4" / "state"
    data = [p for p in state.glob("ocdbt.process_*/d/*") if p.is_file()]
    assert data
    for p in data:  # the arrays' bytes, as a failing disk leaves them
        p.write_bytes(b"\0" * p.stat().st_size)
    out = tmp_path / "art"
    assert export.main(["--workdir", str(workdir_copy), "--out", str(out)]) == 2
    last = _last_err(capsys)
    assert "checkpoints/4" in last, last
    assert not out.exists()
