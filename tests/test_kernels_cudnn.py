"""The cuDNN attention path, checked where no GPU is: the same ``jax.nn.dot_product_attention``
call with its XLA implementation against the project's reference (windows, their bias and the
shift given to it as a dense bias and mask), the rule that sends a layer there, and the
refusals. (The compiled call itself is in the H100 compile checks, tests_gpu/.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mwmae.kernels import TRITON_MAINTAINED, resolve_implementation
from mwmae.kernels.cudnn import attention_blhd, dense_bias, unsupported
from mwmae.kernels.reference import Heads, attention_xla
from mwmae.train.attention_plan import cannot_run


class GPU:  # what the rules read of a device
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"


def _inputs(dtype, b=2, length=50, h=4, d=64):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (b, length, h, d), jnp.float32).astype(dtype) for k in keys]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_the_library_call_computes_the_reference_global_attention(dtype, tol):
    q, k, v = _inputs(dtype)
    heads = Heads((0, 0, 0, 0), False, 64 ** -0.5)
    swap = lambda t: t.swapaxes(1, 2)
    tables = jnp.zeros((4, 1), jnp.float32)

    def ours(q, k, v):
        return attention_blhd(q, k, v, heads, implementation="xla").astype(jnp.float32)

    def reference(q, k, v):
        return swap(attention_xla(swap(q), swap(k), swap(v), tables, heads)).astype(jnp.float32)

    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=tol, rtol=tol)
    cot = _inputs(jnp.float32)[0]
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2))(q, k, v)
             for f in (ours, reference)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=tol * 10,
                                   rtol=tol * 10)


@pytest.mark.parametrize("shift", [False, True], ids=["aligned", "shifted"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_windowed_heads_through_the_library_call_compute_the_reference(shift, dtype, tol):
    """The paper's decoder layer (250 tokens, windows 2 ... 125 and two global heads, head dim
    48): output and the gradients of q, k, v and every bias table, against the reference."""
    windows, length, h, d = (2, 5, 10, 25, 50, 125, 0, 0), 250, 8, 48
    q, k, v = _inputs(dtype, b=2, length=length, h=h, d=d)
    tables = 0.5 * jax.random.normal(jax.random.key(3), (h, 2 * 125 - 1), jnp.float32)
    cot = jax.random.normal(jax.random.key(4), (2, length, h, d), jnp.float32)
    heads = Heads(windows, shift, d ** -0.5)
    swap = lambda t: t.swapaxes(1, 2)

    def ours(q, k, v, t):
        return attention_blhd(q, k, v, heads, t, implementation="xla").astype(jnp.float32)

    def reference(q, k, v, t):
        q32, k32, v32 = (swap(x.astype(jnp.float32)) for x in (q, k, v))
        return swap(attention_xla(q32, k32, v32, t, heads))

    # Compiled whole: eager dispatch of the reference's many small ops costs more than XLA.
    ours, reference = jax.jit(ours), jax.jit(reference)
    scale = float(jnp.max(jnp.abs(reference(q, k, v, tables))))
    np.testing.assert_allclose(ours(q, k, v, tables), reference(q, k, v, tables),
                               atol=tol * scale, rtol=0)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2, 3)))(
        q, k, v, tables) for f in (ours, reference)]
    for name, a, b in zip("qkvt", *grads):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err < tol * 5, (name, err)
    # Padding entries of a table (beyond 2w-1) get no gradient, as in the reference.
    assert float(jnp.abs(grads[0][3][0, 3:]).max()) == 0.0


def test_the_dense_bias_puts_each_table_entry_where_the_window_says():
    heads = Heads((2, 0), False, 1.0)
    tables = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    bias, mask = dense_bias(tables, heads, 4)
    assert bias.shape == mask.shape == (1, 2, 4, 4)
    # Head 0: windows {0, 1} and {2, 3}; bias[i, j] = table[i - j + 1] inside them.
    np.testing.assert_array_equal(mask[0, 0], np.kron(np.eye(2), np.ones((2, 2))).astype(bool))
    np.testing.assert_array_equal(bias[0, 0, :2, :2], [[2.0, 1.0], [3.0, 2.0]])
    assert mask[0, 1].all() and float(jnp.abs(bias[0, 1]).max()) == 0.0  # global: no bias
    assert dense_bias(tables, Heads((0, 0), False, 1.0), 4) == (None, None)


def test_auto_takes_cudnn_on_a_gpu_for_every_low_precision_layer_it_can():
    rule = lambda windows, dtype, shift=False, length=250: resolve_implementation(
        "auto", length, devices=[GPU()], window_sizes=windows, shift=shift, dtype=dtype)
    fallback = "pallas_gpu" if TRITON_MAINTAINED else "xla"
    assert rule((0,) * 12, "bfloat16", length=50) == "cudnn"
    assert rule((2, 5, 10, 25, 50, 125, 0, 0), "bfloat16") == "cudnn"
    assert rule((2, 5, 10, 25, 50, 125, 0, 0), "bfloat16", shift=True) == "cudnn"
    assert rule((0,) * 12, "float32") == fallback  # cuDNN has no float32 attention
    assert rule((5, 0), "bfloat16", length=125) == fallback  # odd length: no bias gradient
    # Without the layer's heads the rule cannot know: the fallback.
    assert resolve_implementation("auto", 50, devices=[GPU()]) == fallback


def test_what_cudnn_cannot_take_is_refused_with_the_reason():
    assert "even sequence length" in unsupported((0, 5), length=125)
    assert unsupported((0, 5), length=250) is None
    assert unsupported((0, 0), length=125) is None  # no bias, any length
    assert "multiple of 8" in unsupported((0,), head_dim=36)
    assert unsupported((0, 0), head_dim=64) is None
    q, k, v = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention_blhd(q, k, v, Heads((0,) * 4, False, 0.125))
    with pytest.raises(ValueError, match="bias tables"):
        attention_blhd(q, k, v, Heads((0, 0, 5, 5), False, 0.125), implementation="xla")
    assert "does not run on cpu" in cannot_run("cudnn", jax.devices()[0])
    assert cannot_run("cudnn", GPU()) is None


def test_the_preflight_times_cudnn_beside_xla_on_gpu_layers():
    from mwmae.kernels.plan import Layer
    from mwmae.preflight.attention import candidates

    encoder = Layer("encoder", 256, 12, 50, 64, (0,) * 12, False, "bfloat16")
    decoder = Layer("decoder", 256, 8, 250, 48, (2, 5, 10, 25, 50, 125, 0, 0), False, "bfloat16")
    for layer in (encoder, decoder):
        found = dict(candidates(GPU(), layer))
        assert found["xla"] == found["cudnn"] == "timed"
        # The Triton kernel is timed only where its lowering is maintained (JAX < 0.11).
        assert (found["pallas_gpu"] == "timed") == TRITON_MAINTAINED
    f32 = dict(candidates(GPU(), Layer("encoder", 8, 12, 50, 64, (0,) * 12, False, "float32")))
    assert f32["cudnn"].startswith("skipped: cuDNN has no float32")
    odd = dict(candidates(GPU(), Layer("decoder", 8, 2, 125, 48, (5, 0), False, "bfloat16")))
    assert "even sequence length" in odd["cudnn"]


def test_auto_skips_cudnn_for_a_head_dim_it_cannot_take():
    fallback = "pallas_gpu" if TRITON_MAINTAINED else "xla"
    assert resolve_implementation("auto", 50, devices=[GPU()], window_sizes=(0,) * 4,
                                  dtype="bfloat16", head_dim=36) == fallback
    assert resolve_implementation("auto", 50, devices=[GPU()], window_sizes=(0,) * 4,
                                  dtype="bfloat16", head_dim=64) == "cudnn"
