"""The original's checkpoint, loaded through mwmae.load, reproduces the original's outputs."""

import hashlib
import json
import lzma

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mwmae
from mwmae.model import MaskedAutoencoder


def test_reference_checkpoint_is_the_recorded_file(reference_dir, original_checkpoint):
    meta = json.loads((reference_dir / "meta.json").read_text())
    data = (original_checkpoint / "checkpoint_0").read_bytes()
    assert len(data) == meta["checkpoint_bytes"]
    assert hashlib.sha256(data).hexdigest() == meta["checkpoint_sha256"]


def test_config_inferred_from_checkpoint(reference_model):
    c = reference_model.config
    assert (c.embed_dim, c.depth, c.num_heads) == (192, 2, 3)
    assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (384, 4, 8)
    assert c.decoder_window_sizes == (2, 5, 10, 25, 50, 125, 0, 0)
    assert c.window_sizes == (0, 0, 0) and not c.use_cls_token and not c.shifting_windows
    assert reference_model.num_params == 8_246_064


def test_features_match_original(reference_model, fixtures):
    got = np.asarray(reference_model.features(fixtures["input"]))
    assert got.shape == (2, 50, 960) and got.dtype == np.float32
    np.testing.assert_allclose(got, fixtures["features"], atol=1e-5, rtol=0)


def test_reconstruct_with_recorded_noise_matches_original(reference_model, fixtures):
    out = reference_model.reconstruct(fixtures["input"], noise=fixtures["mae_noise"])
    np.testing.assert_array_equal(np.asarray(out.mask), fixtures["mae_mask"])
    np.testing.assert_allclose(np.asarray(out.target), fixtures["mae_target"], atol=0, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pred), fixtures["mae_pred"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(out.loss), float(fixtures["loss"]), rtol=1e-6)


def test_masking_from_rng_draws_the_original_noise(reference_model, fixtures):
    """The original draws noise = uniform(rng, (B, L)); the same key gives the same mask."""
    key = jax.random.wrap_key_data(jnp.asarray(fixtures["mae_masking_rng_used"]),
                                   impl="threefry2x32")
    out = reference_model.reconstruct(fixtures["input"], rng=key)
    np.testing.assert_array_equal(np.asarray(out.mask), fixtures["mae_mask"])


def _grads(model, fixtures):
    module = MaskedAutoencoder(model.config)
    loss = lambda p: module.apply({"params": p}, fixtures["input"], fixtures["mae_noise"]).loss
    return jax.jit(jax.grad(loss))(model.params)


def test_gradient_matches_original(reference_model, fixtures):
    grads = _grads(reference_model, fixtures)
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    np.testing.assert_allclose(norm, float(fixtures["grad_global_norm"]), rtol=1e-4)
    # Per-parameter checks pin the bias-table indexing and the q|k|v layout.
    dec = grads["decoder"]["layers"]["block_0"]
    for layer in range(4):
        for h, w in enumerate((2, 5, 10, 25, 50, 125)):
            want = fixtures[f"grad_small/decoder_block_{layer:02d}/wmha_block/attn_heads_{h}/"
                            "relative_position_bias_table"][:, 0]
            got = np.asarray(dec["attn"][f"rel_pos_bias_{h}"][layer])
            assert got.shape == (2 * w - 1,)
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)
        want = fixtures[f"grad_small/decoder_block_{layer:02d}/wmha_block/qkv/bias"]
        np.testing.assert_allclose(np.asarray(dec["attn"]["qkv"]["bias"][layer]).reshape(-1),
                                   want, atol=1e-6, rtol=1e-4)
    enc_qkv = np.asarray(grads["encoder"]["layers"]["block_0"]["attn"]["qkv"]["kernel"][1])
    np.testing.assert_allclose(
        np.linalg.norm(enc_qkv),
        float(fixtures["grad_norm/encoder_block_01/Attention_0/Dense_0/kernel"]), rtol=1e-4)


def test_bfloat16_mask_token_of_released_weights_is_accepted(reference_dir, fixtures, tmp_path):
    """Released checkpoints store mask_token as bfloat16; convert it and run in float32."""
    import ml_dtypes
    import msgpack

    from mwmae.convert import read_msgpack_checkpoint

    with lzma.open(reference_dir / "checkpoint" / "checkpoint_0.xz") as f:
        (tmp_path / "checkpoint_0").write_bytes(f.read())
    state = read_msgpack_checkpoint(tmp_path / "checkpoint_0")
    state["params"]["mask_token"] = state["params"]["mask_token"].astype(ml_dtypes.bfloat16)

    def default(obj):
        if isinstance(obj, np.ndarray):
            name = "bfloat16" if obj.dtype == ml_dtypes.bfloat16 else obj.dtype.name
            return msgpack.ExtType(1, msgpack.packb((obj.shape, name, obj.tobytes())))
        raise TypeError(type(obj))

    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    (bf16_dir / "checkpoint_0").write_bytes(msgpack.packb({"params": state["params"],
                                                           "step": 0}, default=default))
    (bf16_dir / "config.json").write_text((reference_dir / "checkpoint" / "config.json")
                                          .read_text())
    model = mwmae.load(bf16_dir)
    assert model.params["mask_token"].dtype == jnp.float32
    out = model.reconstruct(fixtures["input"], noise=fixtures["mae_noise"])
    # Only the mask token was rounded to bfloat16, so predictions stay close, not identical.
    np.testing.assert_allclose(np.asarray(out.pred), fixtures["mae_pred"], atol=5e-2)


def test_convert_cli_writes_an_artifact_that_loads_identically(original_checkpoint, fixtures,
                                                               tmp_path):
    from mwmae.convert import main

    assert main([str(original_checkpoint), str(tmp_path / "art")]) == 0
    meta = json.loads((tmp_path / "art" / "config.json").read_text())
    assert meta["format"] == "mwmae-artifact" and meta["num_params"] == 8_246_064
    model = mwmae.load(tmp_path / "art")
    np.testing.assert_allclose(np.asarray(model.features(fixtures["input"])),
                               fixtures["features"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_attention_implementation_override(original_checkpoint, fixtures, impl):
    model = mwmae.load(original_checkpoint, attention_impl=impl)
    assert model.config.attention_impl == impl
    out = model.reconstruct(fixtures["input"], noise=fixtures["mae_noise"])
    np.testing.assert_allclose(float(out.loss), float(fixtures["loss"]), rtol=1e-6)


def test_encoder_only_artifact_needs_no_decoder_and_gives_the_same_bits(reference_model,
                                                                        fixtures, tmp_path):
    from mwmae.artifact import save_artifact
    from mwmae.model import encoder_keys

    config, x = reference_model.config, fixtures["input"]
    save_artifact(tmp_path / "enc", config, reference_model.params, encoder_only=True)
    encoder_only = mwmae.load(tmp_path / "enc")
    assert not encoder_only.has_decoder
    assert set(encoder_only.params) == set(encoder_keys(config)) and "mask_token" not in set(
        encoder_only.params)
    # The whole autoencoder's features method, jitted as Model.features is.
    full = jax.jit(lambda p, x: MaskedAutoencoder(config).apply(
        {"params": p}, x, method=MaskedAutoencoder.features))(reference_model.params, x)
    got = np.asarray(encoder_only.features(x))
    np.testing.assert_array_equal(got, np.asarray(full))
    np.testing.assert_array_equal(got, np.asarray(reference_model.features(x)))
    np.testing.assert_allclose(got, fixtures["features"], atol=1e-5, rtol=0)
