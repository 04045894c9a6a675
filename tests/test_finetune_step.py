"""The supervised step's parts: targets, losses, augmentation, layer-wise lr decay, probes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mwmae.finetune import augment as aug
from mwmae.finetune.model import Classifier, HeadConfig
from mwmae.finetune.optim import layer_scales, tagger_optimizer
from mwmae.finetune.step import classification_loss, make_supervised_step, targets_from_labels
from mwmae.model import ModelConfig, encoder_keys
from mwmae.train.config import TINY_MODEL
from mwmae.train.step import TrainState

CONFIG = ModelConfig(**{**TINY_MODEL, "img_size": (40, 80)})  # 50 tokens: quick to compile


def test_targets_from_padded_label_indices():
    labels = jnp.array([[2, 0, -1], [-1, -1, -1], [1, 1, 3]])
    np.testing.assert_array_equal(targets_from_labels(labels, 4, "multilabel"),
                                  [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 1]])
    np.testing.assert_array_equal(targets_from_labels(labels, 4, "multiclass"),
                                  [[0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])


def test_losses_equal_their_formulas():
    logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    p = jax.nn.sigmoid(logits)
    bce = -(targets * jnp.log(p) + (1 - targets) * jnp.log(1 - p)).mean()
    np.testing.assert_allclose(classification_loss(logits, targets, "multilabel"), bce,
                               rtol=1e-6)
    onehot = jnp.eye(3)[jnp.array([0, 1])]
    smooth = onehot * 0.9 + 0.1 / 3
    ce = -(smooth * jax.nn.log_softmax(logits)).sum(-1).mean()
    np.testing.assert_allclose(classification_loss(logits, onehot, "multiclass", 0.1), ce,
                               rtol=1e-6)


def test_mixup_mixes_clips_and_targets_with_one_weight():
    key = jax.random.key(0)
    audio = jnp.arange(4.0).reshape(4, 1, 1, 1) * jnp.ones((4, 3, 2, 1))
    targets = jnp.eye(4)
    mixed, mixed_targets = aug.mixup(key, audio, targets, alpha=0.4)
    # Each clip's value is its target's expectation of the clip index.
    np.testing.assert_allclose(mixed[:, 0, 0, 0], mixed_targets @ jnp.arange(4.0), rtol=1e-6)
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(mixed, audio)


def test_spec_augment_zeroes_bands_up_to_the_widths_and_is_reproducible():
    config = aug.AugmentConfig(time_masks=2, time_mask_frames=20, freq_masks=1,
                               freq_mask_bins=8)
    audio = jnp.ones((16, 200, 80, 1))
    out = aug.spec_augment(jax.random.key(1), audio, config)
    np.testing.assert_array_equal(out, aug.spec_augment(jax.random.key(1), audio, config))
    zero = np.asarray(out[..., 0] == 0)
    time_rows = zero.all(axis=2)   # whole frames zeroed
    freq_cols = zero.all(axis=1)   # whole mel bins zeroed
    assert time_rows.sum(axis=1).max() <= 2 * 20 and freq_cols.sum(axis=1).max() <= 8
    assert time_rows.any() and freq_cols.any()
    # Every zero lies in a zeroed frame or a zeroed bin: masks are bands, nothing else.
    np.testing.assert_array_equal(zero, time_rows[:, :, None] | freq_cols[:, None, :])
    with pytest.raises(ValueError, match=">= 0"):
        aug.AugmentConfig(time_masks=-1)


def init(head=None):
    model = Classifier(CONFIG, head or HeadConfig(3))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 40, 80, 1)))["params"])
    return model, params


def test_layer_decay_scales_updates_per_block_and_embeddings_most():
    _, params = init()
    d = 0.5
    scales = layer_scales(params, CONFIG, d)
    block = jax.tree.leaves(scales["encoder"])[0]
    np.testing.assert_allclose(np.ravel(block), [d ** 2, d ** 1])
    assert float(scales["pos_embed"]) == d ** 3 and float(scales["head"]["kernel"]) == 1.0
    # First AdamW step: every update is about -lr * sign(grad), times its factor.
    tx = tagger_optimizer(params, CONFIG, optax.constant_schedule(1e-3), weight_decay=0.0,
                          layer_decay=d, freeze_encoder=False)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    qkv = updates["encoder"]["layers"]["block_0"]["attn"]["qkv"]["kernel"]
    np.testing.assert_allclose(np.abs(qkv[0]).max(), 1e-3 * d ** 2, rtol=1e-4)
    np.testing.assert_allclose(np.abs(qkv[1]).max(), 1e-3 * d, rtol=1e-4)
    np.testing.assert_allclose(np.abs(updates["head"]["kernel"]).max(), 1e-3, rtol=1e-4)


def test_a_probe_never_moves_the_encoder():
    _, params = init()
    tx = tagger_optimizer(params, CONFIG, optax.constant_schedule(1e-3), weight_decay=0.05,
                          layer_decay=0.75, freeze_encoder=True)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for k in encoder_keys(CONFIG):
        assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates[k])), k
    assert float(jnp.abs(updates["head"]["kernel"]).max()) > 0


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_supervised_steps_learn_and_repeat_exactly(task):
    model, params = init(HeadConfig(3, dropout=0.1, drop_path=0.1))
    tx = tagger_optimizer(params, CONFIG, optax.constant_schedule(3e-3), weight_decay=0.0,
                          layer_decay=0.75, freeze_encoder=False)
    step = jax.jit(make_supervised_step(
        model, tx, optax.constant_schedule(3e-3), task=task, seed=0, label_smoothing=0.1,
        augmentation=aug.AugmentConfig(mixup_alpha=0.2, time_masks=1, time_mask_frames=10)))
    rng = np.random.default_rng(0)
    labels = jnp.asarray(rng.integers(0, 3, (8, 1)), jnp.int32)
    audio = jnp.asarray(rng.normal(size=(8, 40, 80, 1)) + 2.0 * np.asarray(labels)[:, :, None,
                                                                                  None],
                        jnp.float32)

    def run():
        state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                           jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32))
        losses = []
        for _ in range(12):
            state, m = step(state, {"audio": audio, "label": labels})
            losses.append(float(m["loss"]))
        return losses

    first = run()
    assert first == run()
    assert np.mean(first[-3:]) < np.mean(first[:3]), first
