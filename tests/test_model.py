"""Model pieces: masking, embeddings, sizes, configs, and errors on bad input."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mwmae
from mwmae.artifact import ArtifactError, save_artifact
from mwmae.convert import CheckpointError
from mwmae.model import (
    MaskedAutoencoder,
    init_params,
    model_config,
    patchify,
    random_masking,
    unpatchify,
)
from mwmae.model.embed import sincos_2d

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


def test_masking_keeps_smallest_noise_in_shuffled_order():
    noise = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 250)), jnp.float32)
    x = jnp.arange(250, dtype=jnp.float32)[None, :, None].repeat(3, 0)
    kept, mask, ids_restore = random_masking(x, noise, 50)
    order = np.argsort(np.asarray(noise), axis=1, kind="stable")
    np.testing.assert_array_equal(np.asarray(kept[..., 0]), order[:, :50])  # noise order
    assert np.all(np.asarray(mask).sum(1) == 200)
    np.testing.assert_array_equal(np.asarray(mask)[np.arange(3)[:, None], order[:, :50]], 0)
    np.testing.assert_array_equal(np.asarray(ids_restore), np.argsort(order, axis=1))


def test_len_keep_uses_the_originals_integer_arithmetic():
    assert model_config("tiny").len_keep == 50  # int(250 * 0.2) would give 49
    assert model_config("tiny", mask_ratio=0.75).len_keep == 62


def test_patchify_order_and_inverse():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 200, 80, 1)), jnp.float32)
    p = patchify(x, (4, 16))
    assert p.shape == (2, 250, 64)
    # token n = t * 5 + f, patch vector (frame, mel) = p * 16 + q
    np.testing.assert_array_equal(np.asarray(p[1, 7 * 5 + 3, 2 * 16 + 9]),
                                  np.asarray(x[1, 7 * 4 + 2, 3 * 16 + 9, 0]))
    np.testing.assert_array_equal(np.asarray(unpatchify(p, (4, 16), (50, 5))), np.asarray(x))


def test_encoder_position_embedding_halves():
    pe = sincos_2d(8, (50, 5))
    # first half encodes the frequency patch index f, second half the time index t
    assert np.allclose(pe[3, :2], np.sin([3.0, 3.0 / 100]))   # t=0, f=3
    assert np.allclose(pe[3 * 5, 4:6], np.sin([3.0, 3.0 / 100]))  # t=3, f=0


@pytest.mark.parametrize("config_file,expected", [
    ("mwmae_base_200_4x16.py", 92_814_576),
    ("mae_base_200_4x16.py", 92_814_784),
])
def test_parameter_count_cli_matches_original(config_file, expected):
    out = subprocess.run(
        [sys.executable, "-m", "mwmae.model_info", "--config", str(REPO_CONFIGS / config_file),
         "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["parameters"]["total"] == expected


@pytest.mark.parametrize("kind,overrides", [
    ("mae", {}),
    # The two mwmae variants take ~1 min each to compile and run.
    pytest.param("mwmae", {"window_sizes": [5, 10, 0], "shifting_windows": True, "depth": 2,
                           "decoder_depth": 2}, marks=pytest.mark.slow),
    pytest.param("mwmae", {"dtype": "bfloat16"}, marks=pytest.mark.slow),
])
def test_variants_train_with_finite_gradients(kind, overrides):
    small = {"depth": 2, "decoder_embed_dim": 128, "decoder_depth": 2}
    cfg = model_config("tiny", kind, **{**small, **overrides})
    params = init_params(cfg, jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 200, 80, 1)), jnp.float32)
    noise = jax.random.uniform(jax.random.key(1), (2, 250))
    module = MaskedAutoencoder(cfg)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: module.apply({"params": p}, x, noise).loss))(params)
    assert np.isfinite(float(loss)) and float(loss) > 0
    norms = [float(jnp.linalg.norm(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0
    feats = module.apply({"params": params}, x, method=MaskedAutoencoder.features)
    assert feats.shape == (2, 50, 5 * 192) and feats.dtype == jnp.float32


def _as_period_2(params):
    """Re-stack period-1 scanned layers [l0, l1] as one period-2 group (block_0, block_1)."""
    def split(stack):
        layers = stack["layers"]["block_0"]
        return {"layers": {"block_0": jax.tree.map(lambda x: x[0:1], layers),
                           "block_1": jax.tree.map(lambda x: x[1:2], layers)}}
    return {**params, "encoder": split(params["encoder"]), "decoder": split(params["decoder"])}


@pytest.mark.parametrize("windows,changes", [
    pytest.param([5, 10, 0], True, marks=pytest.mark.slow),  # over 30 s: CI's slow group
    ([0], False)])
def test_shifted_windows(windows, changes):
    """Shifting alternates blocks; it changes windowed heads only (global heads ignore it)."""
    base = model_config("tiny", depth=2, window_sizes=windows, decoder_depth=2,
                        decoder_embed_dim=64)
    params = init_params(base, jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 200, 80, 1)), jnp.float32)
    f = lambda c, p: np.asarray(MaskedAutoencoder(c).apply({"params": p}, x,
                                                          method=MaskedAutoencoder.features))
    plain = f(base, params)
    shifted = f(base.replace(shifting_windows=True), _as_period_2(params))
    assert np.allclose(plain, shifted, atol=1e-5) != changes


# Bad input -----------------------------------------------------------------------------------

def test_window_that_does_not_divide_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"decoder_window_sizes\[1\] = 7 does not divide the 250"):
        model_config("base", decoder_window_sizes=[2, 7, 10, 25, 50, 125, 0, 0])
    with pytest.raises(ValueError, match=r"window_sizes\[0\] = 125 does not divide the 50 tokens "
                                         r"of kept patches"):
        model_config("tiny", window_sizes=[125, 0, 0])
    with pytest.raises(ValueError, match="3 window sizes given for 8 heads"):
        model_config("base", decoder_window_sizes=[2, 5, 0])


def test_directory_without_checkpoint_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a model"):
        mwmae.load(tmp_path)
    from mwmae.convert import load_original
    with pytest.raises(CheckpointError, match=r"no checkpoint found \(expected files named "
                                              r"checkpoint_<step>"):
        load_original(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        mwmae.load(tmp_path / "nope")


def test_corrupt_checkpoint_file_is_rejected(tmp_path, reference_dir):
    (tmp_path / "checkpoint_3").write_bytes(b"\x93\x01garbage")
    (tmp_path / "config.json").write_text((reference_dir / "checkpoint" / "config.json")
                                          .read_text())
    with pytest.raises(CheckpointError, match="checkpoint_3"):
        mwmae.load(tmp_path)


def test_unmappable_parameter_is_listed(original_checkpoint, tmp_path):
    from mwmae.convert import convert_params, infer_config, read_msgpack_checkpoint

    state = read_msgpack_checkpoint(original_checkpoint / "checkpoint_0")
    params = state["params"]
    params["extra_head"] = {"kernel": np.zeros((3, 3), np.float32)}
    del params["decoder_norm"]["scale"]
    cfg = infer_config({"patch_embed/proj/kernel": params["patch_embed"]["proj"]["kernel"],
                        **{f"{k}/x": 0 for k in params if "block" in k},
                        "decoder_embed/kernel": params["decoder_embed"]["kernel"],
                        "encoder_block_00/Mlp_0/Dense_0/kernel":
                            params["encoder_block_00"]["Mlp_0"]["Dense_0"]["kernel"]},
                       json.loads((original_checkpoint / "config.json").read_text()))
    with pytest.raises(CheckpointError) as e:
        convert_params(params, cfg)
    assert "extra_head/kernel (3, 3): no parameter of the model" in str(e.value)
    assert "model parameters: missing decoder_norm/scale (384,)" in str(e.value)


def test_wrong_input_shape_is_rejected(reference_model):
    with pytest.raises(ValueError,
                       match=r"shape \(2, 80, 200, 1\); expected \(batch, 200, 80, 1\)"):
        reference_model.features(np.zeros((2, 80, 200, 1), np.float32))
    with pytest.raises(ValueError, match=r"shape \(200, 80, 1\)"):
        reference_model.features(np.zeros((200, 80, 1), np.float32))
    with pytest.raises(ValueError, match=r"noise has shape \(2, 50\); expected \(2, 250\)"):
        reference_model.reconstruct(np.zeros((2, 200, 80, 1)), noise=np.zeros((2, 50)))


def test_corrupt_or_mismatched_artifact_is_rejected(reference_model, tmp_path):
    art = save_artifact(tmp_path / "a", reference_model.config, reference_model.params)
    blob = bytearray((art / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (art / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="model.safetensors: checksum"):
        mwmae.load(art)
    wrong = save_artifact(tmp_path / "b", reference_model.config.replace(decoder_depth=2),
                          reference_model.params)
    with pytest.raises(ArtifactError, match="weights do not match the config"):
        mwmae.load(wrong)
