"""The tagger: encoder + pooled head, dropout and stochastic depth, frozen-encoder probes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mwmae.finetune.model import Classifier, HeadConfig
from mwmae.model import Encoder, ModelConfig, encoder_keys
from mwmae.train.config import TINY_MODEL

CONFIG = ModelConfig(**{**TINY_MODEL, "img_size": (40, 80)})  # 50 tokens: quick to compile


def clips(n=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 40, 80, 1)), jnp.float32)


def test_the_encoder_entries_are_the_pretrained_layout_and_pooling_is_over_patches():
    x = clips()
    model = Classifier(CONFIG, HeadConfig(7))
    params = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])
    assert set(params) == set(encoder_keys(CONFIG)) | {"head"}
    enc = {k: params[k] for k in encoder_keys(CONFIG)}
    tokens = Encoder(CONFIG).apply({"params": enc}, x)  # (B, T, F * D)
    pooled = tokens.reshape(4, -1, CONFIG.embed_dim).mean(axis=1)
    want = pooled @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


def test_dropout_and_drop_path_act_only_in_training_and_follow_the_rng():
    x = clips()
    model = Classifier(CONFIG, HeadConfig(5, "mlp", dropout=0.0, drop_path=0.5))
    params = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])
    params["head"]["kernel"] = params["head"]["kernel"] * 1e4  # visible logits
    apply = jax.jit(lambda train, seed=0: model.apply(  # noqa: E731
        {"params": params}, x, train=train, rngs={"dropout": jax.random.key(seed)}),
        static_argnums=0)
    np.testing.assert_array_equal(apply(False), apply(False, 1))
    assert not np.allclose(apply(True), apply(False))
    np.testing.assert_array_equal(apply(True), apply(True))
    assert not np.allclose(apply(True), apply(True, 1))


def test_a_frozen_encoder_gets_no_gradient():
    x = clips()
    labels = jnp.eye(3)[jnp.array([0, 1, 2, 0])]
    for freeze in (False, True):
        model = Classifier(CONFIG, HeadConfig(3, freeze_encoder=freeze, drop_path=0.1))
        params = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])
        loss = lambda p, model=model: jnp.mean((model.apply(  # noqa: E731
            {"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)}) - labels) ** 2)
        grads = jax.jit(jax.grad(loss))(params)
        encoder_norm = sum(float(jnp.abs(g).sum())
                           for k in encoder_keys(CONFIG) for g in jax.tree.leaves(grads[k]))
        assert (encoder_norm == 0.0) == freeze
        assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0


def test_bad_head_settings_are_refused():
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        HeadConfig(0)
    with pytest.raises(ValueError, match="head 'conv'"):
        HeadConfig(3, "conv")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        HeadConfig(3, drop_path=1.0)


def test_time_pooling_is_the_mean_of_the_hear_features_over_time():
    x = clips()
    model = Classifier(CONFIG, HeadConfig(3, pooling="time"))
    params = nn.meta.unbox(model.init(jax.random.key(0), x)["params"])
    assert params["head"]["kernel"].shape == (CONFIG.grid_size[1] * CONFIG.embed_dim, 3)
    enc = {k: params[k] for k in encoder_keys(CONFIG)}
    pooled = Encoder(CONFIG).apply({"params": enc}, x).mean(axis=1)  # (B, F * D)
    want = pooled @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(model.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling 'max'"):
        HeadConfig(3, pooling="max")
