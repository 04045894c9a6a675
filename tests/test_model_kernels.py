"""The model trained with the fused kernel (interpret mode) equals the model on the reference."""

import jax
import numpy as np
import pytest
from train_helpers import load_config, run_steps


@pytest.fixture(scope="module")
def xla_losses():
    config = load_config("tiny")
    config.model.attention_impl = "xla"
    return run_steps(config, jax.devices()[:1], steps=2)


@pytest.mark.slow  # ~2 min: a whole train step through the interpreted kernel
def test_one_train_step_pallas_interpret_equals_xla(xla_losses):
    from mwmae.data.sources import synthetic_source
    from mwmae.train.engine import Engine
    from mwmae.train.pretraining import Pretraining

    config = load_config("tiny")
    metrics = {}
    for impl in ("xla", "pallas_interpret"):
        config.model.attention_impl = impl
        t = Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:1])
        state = t.initial_state()
        clips = synthetic_source(config.batch_size, config.seed, *config.model.img_size)
        _, m = t.compile(state)(state, t.global_batch(next(clips)))
        metrics[impl] = {k: float(v) for k, v in m.items()}
    np.testing.assert_allclose(metrics["pallas_interpret"]["loss"], metrics["xla"]["loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["pallas_interpret"]["grad_norm"],
                               metrics["xla"]["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(metrics["xla"]["loss"], xla_losses[0], rtol=1e-6)


def test_kernel_under_fsdp_tp_mesh_matches_single_device_reference(xla_losses):
    """On 8 devices the kernel runs per device under shard_map (heads over tensor)."""
    config = load_config("tiny")
    config.model.attention_impl = "pallas_interpret"
    config.mesh.preset = "fsdp_tp"
    losses = run_steps(config, jax.devices()[:8], steps=2)
    np.testing.assert_allclose(losses, xla_losses, rtol=2e-5)


def test_abstract_lowering_with_the_kernel_on_a_data_parallel_mesh():
    """What compile_check does: lower the step from abstract state on a 4-way data mesh. The
    parameters' shapes are traced at a batch of one, which the sharded kernel cannot split; they
    are traced with the XLA attention, and the step itself calls the kernel per device."""
    from mwmae.train.engine import Engine
    from mwmae.train.pretraining import Pretraining

    config = load_config("tiny")
    config.model.attention_impl = "pallas_interpret"
    config.batch_size = 8
    config.mesh.preset = "dp"
    lowered = Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:4]).lower()
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
