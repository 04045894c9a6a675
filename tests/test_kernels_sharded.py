"""Attention under shard_map over a mesh of 8 CPU devices equals the single-device path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mwmae.kernels import multi_window_attention
from mwmae.kernels.sharded import shard_window_lists, sharded_multi_window_attention

# The tests name their own mesh axes; axes absent from a mesh are ignored by the kernel.
AXES = {"batch_axes": ("data", "fsdp"), "head_axis": "tensor"}

DECODER = (2, 5, 10, 25, 50, 125, 0, 0)


def mesh(shape, names):
    if len(jax.devices()) < int(np.prod(shape)):
        pytest.skip(f"needs {int(np.prod(shape))} devices")
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def inputs(window_sizes, length, batch=4, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, len(window_sizes), length, head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    tables = jnp.asarray(rng.normal(size=(len(window_sizes), max(2 * max(window_sizes) - 1, 1))),
                         jnp.float32)
    return q, k, v, tables


def value_and_grads(fn, q, k, v, tables):
    cot = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    loss = lambda q, k, v, t: jnp.sum(fn(q, k, v, t) * cot)
    out = jax.jit(fn)(q, k, v, tables)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, tables)


def assert_same(sharded, single):
    (out_s, grads_s), (out_1, grads_1) = sharded, single
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_1), atol=2e-5, rtol=2e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dtables"), grads_s, grads_1):
        scale = max(float(jnp.abs(b).max()), 1e-2)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=name)


@pytest.mark.parametrize("impl", ["pallas_interpret", "pallas_gpu_interpret"])
@pytest.mark.parametrize("shape,names", [
    ((4, 2), ("data", "tensor")),
    ((2, 4), ("data", "tensor")),
    ((2, 2, 2), ("data", "fsdp", "tensor")),
])
def test_sharded_equals_single_device_decoder(impl, shape, names):
    """Per-shard window lists differ here ([2, 5, 10, 25] vs [50, 125, 0, 0]): lax.switch path."""
    m = mesh(shape, names)
    q, k, v, tables = inputs(DECODER, 250)
    sharded = value_and_grads(lambda *a: sharded_multi_window_attention(
        *a[:3], DECODER, a[3], True, mesh=m, **AXES, implementation=impl), q, k, v, tables)
    single = value_and_grads(lambda *a: multi_window_attention(
        *a[:3], DECODER, a[3], True, implementation="xla"), q, k, v, tables)
    assert_same(sharded, single)


def test_sharded_equals_single_device_uniform_pattern():
    """Encoder-like all-global heads (and a repeating pattern): one specialisation for all."""
    m = mesh((2, 4), ("data", "tensor"))
    for ws, length in [((0,) * 8, 50), ((5, 0) * 4, 50)]:
        q, k, v, tables = inputs(ws, length, seed=1)
        sharded = value_and_grads(lambda *a, ws=ws: sharded_multi_window_attention(
            *a[:3], ws, a[3], False, mesh=m, **AXES, implementation="pallas_interpret"),
            q, k, v, tables)
        single = value_and_grads(lambda *a, ws=ws: multi_window_attention(
            *a[:3], ws, a[3], False, implementation="pallas_interpret"), q, k, v, tables)
        assert_same(sharded, single)


def test_sharded_xla_reference_path():
    m = mesh((4, 2), ("data", "tensor"))
    ws = (3, 0, 4, 6)
    q, k, v, tables = inputs(ws, 12, seed=2)
    sharded = value_and_grads(lambda *a: sharded_multi_window_attention(
        *a[:3], ws, a[3], True, mesh=m, **AXES, implementation="xla"), q, k, v, tables)
    single = value_and_grads(lambda *a: multi_window_attention(
        *a[:3], ws, a[3], True, implementation="xla"), q, k, v, tables)
    assert_same(sharded, single)


def test_forward_runs_without_communication():
    """With inputs already laid out on the mesh, the compiled forward has no collectives."""
    m = mesh((4, 2), ("data", "tensor"))
    q, k, v, tables = inputs(DECODER, 250)
    qkv = NamedSharding(m, P("data", "tensor", None, None))
    fn = jax.jit(lambda q, k, v, t: sharded_multi_window_attention(
        q, k, v, DECODER, t, True, mesh=m, **AXES, implementation="pallas_interpret"),
        in_shardings=(qkv, qkv, qkv, NamedSharding(m, P("tensor", None))), out_shardings=qkv)
    hlo = fn.lower(q, k, v, tables).compile().as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert op not in hlo, op
    assert "conditional" in hlo  # the per-shard window-list dispatch


def test_shard_window_lists():
    assert shard_window_lists(DECODER, 2) == (((2, 5, 10, 25), (50, 125, 0, 0)), (0, 1))
    assert shard_window_lists((0, 5) * 4, 4) == (((0, 5),), (0, 0, 0, 0))
    assert shard_window_lists(DECODER, 1) == ((DECODER,), (0,))
    with pytest.raises(ValueError, match="do not split over 3"):
        shard_window_lists(DECODER, 3)


def test_batch_that_does_not_split_is_rejected():
    m = mesh((4, 2), ("data", "tensor"))
    q, k, v, tables = inputs((0, 0), 12, batch=2)
    with pytest.raises(ValueError, match="batch 2 does not split over 4"):
        sharded_multi_window_attention(q, k, v, (0, 0), tables, mesh=m, **AXES)
