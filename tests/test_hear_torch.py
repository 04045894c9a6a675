"""The PyTorch path: safetensors artifacts read by both stacks, the HEAR module's torch backend
giving the JAX backend's embeddings, and (slow) a fresh environment with the hear-torch extra
only, where JAX cannot be imported, running hear-validator and the embedding parity."""

import json
import os
import pathlib
import subprocess
import textwrap

import jax
import numpy as np
import pytest
import torch

import mwmae
import mwmae.torch
from mwmae import artifact as artifact_lib
from mwmae.export import export_original
from mwmae.hear import module as hear

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(original_checkpoint, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("torch_artifact") / "art"
    export_original(str(original_checkpoint), str(out))
    return out


@pytest.fixture(scope="module")
def hear_fixtures(reference_dir):
    return dict(np.load(reference_dir / "hear_fixtures.npz"))


def test_export_writes_safetensors_named_by_parameter_path(artifact):
    from safetensors import safe_open

    meta = json.loads((artifact / "config.json").read_text())
    assert meta["params_file"] == "model.safetensors" and meta["version"] == 3
    assert sorted(p.name for p in artifact.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(artifact / "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert "parameter paths" in json.loads(f.metadata()["mwmae-artifact"])["names"]
    model = mwmae.load(artifact)
    flat = artifact_lib.flat_tensors(model.params)
    assert names == set(flat)
    assert {"patch_embed/kernel", "pos_embed", "encoder_norm/scale"} <= names


def test_an_exported_artifact_gives_the_same_features_in_torch_and_jax(artifact, fixtures):
    jax_features = np.asarray(mwmae.load(artifact).features(fixtures["input"]))
    encoder = mwmae.torch.load(artifact)
    with torch.no_grad():
        torch_features = encoder(torch.from_numpy(np.asarray(fixtures["input"]))).numpy()
    assert torch_features.shape == jax_features.shape
    np.testing.assert_allclose(torch_features, jax_features, atol=1e-5, rtol=0)


def test_older_msgpack_artifacts_still_load_in_jax(artifact, tmp_path):
    model = mwmae.load(artifact)
    old = tmp_path / "old"
    artifact_lib.save_artifact(old, model.config, jax.device_get(model.params),
                               encoder_only=True, weights_format="msgpack")
    assert (old / "params.msgpack").exists() and not (old / "model.safetensors").exists()
    np.testing.assert_array_equal(np.asarray(mwmae.load(old).features(np.zeros((1, 200, 80, 1),
                                                                                np.float32))),
                                  np.asarray(model.features(np.zeros((1, 200, 80, 1),
                                                                     np.float32))))
    with pytest.raises(mwmae.torch.ArtifactError, match="Re-export"):
        mwmae.torch.load(old)


def test_a_damaged_safetensors_file_fails_its_checksum(artifact, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(artifact_lib.ArtifactError, match="model.safetensors: checksum"):
        artifact_lib.load_artifact(bad)
    with pytest.raises(mwmae.torch.ArtifactError, match="checksum"):
        mwmae.torch.load(bad)


def test_the_hear_module_gives_the_same_embeddings_with_either_backend(artifact,
                                                                       hear_fixtures):
    wav = torch.from_numpy(hear_fixtures["hear_waveform"])
    on_jax = hear.load_model(str(artifact), backend="jax")
    on_torch = hear.load_model(str(artifact), backend="torch")
    assert on_torch.backend == "torch" and isinstance(on_torch.encoder, torch.nn.Module)
    emb_j, ts_j = hear.get_timestamp_embeddings(wav, on_jax)
    emb_t, ts_t = hear.get_timestamp_embeddings(wav, on_torch)
    assert emb_t.shape == emb_j.shape == (2, 63, 960)
    np.testing.assert_allclose(emb_t.numpy(), emb_j.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ts_t.numpy(), ts_j.numpy())
    np.testing.assert_allclose(hear.get_scene_embeddings(wav, on_torch).numpy(),
                               hear.get_scene_embeddings(wav, on_jax).numpy(), atol=1e-5, rtol=0)


def test_backend_options_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="backend 'tf': expected one of jax, torch"):
        hear.check_options(backend="tf")
    monkeypatch.delenv("MWMAE_HEAR_BACKEND", raising=False)
    monkeypatch.delenv("MWMAE_TARGET", raising=False)
    assert hear.default_backend() == "jax"   # JAX is installed here
    monkeypatch.setenv("MWMAE_TARGET", "cuda")   # the cuda image
    assert hear.default_backend() == "torch"
    monkeypatch.setenv("MWMAE_HEAR_BACKEND", "torch")   # what the cuda image sets
    assert hear.default_backend() == "torch"
    monkeypatch.setenv("MWMAE_HEAR_BACKEND", "tf")
    with pytest.raises(ValueError, match=r"\$MWMAE_HEAR_BACKEND='tf'"):
        hear.default_backend()


def test_evaluate_backend_flag_refuses_a_disagreeing_option(capsys, tmp_path):
    from mwmae.hear import evaluate

    rc = evaluate.main(["--artifact", str(tmp_path), "--tasks-dir", str(tmp_path), "--out",
                        str(tmp_path / "o"), "--backend", "torch", "--model-options",
                        '{"backend": "jax"}'])
    assert rc == 2 and "disagree" in capsys.readouterr().err


# ---- a fresh environment with the hear-torch extra only ----------------------------------------

PARITY = textwrap.dedent("""
    import sys, numpy as np, torch
    import hear_mwmae
    try:
        import jax  # noqa: F401
    except ImportError:
        pass
    else:
        sys.exit("jax is importable in the hear-torch environment")
    model = hear_mwmae.load_model(sys.argv[1])
    assert model.backend == "torch", model.backend
    wav = torch.from_numpy(np.load(sys.argv[2])["hear_waveform"])
    emb, ts = hear_mwmae.get_timestamp_embeddings(wav, model)
    scene = hear_mwmae.get_scene_embeddings(wav, model)
    np.savez(sys.argv[3], emb=emb.numpy(), ts=ts.numpy(), scene=scene.numpy())
""")


@pytest.mark.slow
def test_a_hear_torch_environment_has_no_jax_and_embeds_like_jax(artifact, reference_dir,
                                                                 tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(["scripts/install.sh", str(venv), "hear-torch"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    python = venv / "bin" / "python"
    r = subprocess.run([str(python), "-c", "import jax"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'jax'" in r.stderr
    # hear-validator with the torch backend, in that environment.
    r = subprocess.run([str(venv / "bin" / "hear-validator"), "hear_mwmae", "-m", str(artifact),
                        "-d", "cpu"], capture_output=True, text=True, timeout=600, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0 and "Looks good!" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    # The embeddings of the reference clips, against the JAX backend's here.
    script = tmp_path / "parity.py"
    script.write_text(PARITY)
    out = tmp_path / "torch.npz"
    clips = reference_dir / "hear_fixtures.npz"
    r = subprocess.run([str(python), str(script), str(artifact), str(clips), str(out)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = np.load(out)
    on_jax = hear.load_model(str(artifact), backend="jax")
    wav = torch.from_numpy(np.load(clips)["hear_waveform"])
    emb, ts = hear.get_timestamp_embeddings(wav, on_jax)
    np.testing.assert_allclose(got["emb"], emb.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["ts"], ts.numpy())
    np.testing.assert_allclose(got["scene"], hear.get_scene_embeddings(wav, on_jax).numpy(),
                               atol=1e-5, rtol=0)
