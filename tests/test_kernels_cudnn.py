"""The cuDNN attention path, checked where no GPU is: the same ``jax.nn.dot_product_attention``
call with its XLA implementation against the project's reference, the rule that sends a layer
there, and the refusals. (The compiled call itself is in the H100 compile checks, tests_gpu/.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mwmae.kernels import multi_window_attention, resolve_implementation
from mwmae.kernels.cudnn import attention_blhd, unsupported
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


def test_auto_takes_cudnn_on_a_gpu_only_for_all_global_low_precision_layers():
    rule = lambda windows, dtype, shift=False: resolve_implementation(
        "auto", 50, devices=[GPU()], window_sizes=windows, shift=shift, dtype=dtype)
    assert rule((0,) * 12, "bfloat16") == "cudnn"
    assert rule((0,) * 12, "float32") == "pallas_gpu"  # cuDNN has no float32 attention
    assert rule((2, 5, 10, 25, 50, 125, 0, 0), "bfloat16") == "pallas_gpu"
    # Without the layer's heads the rule cannot know: the kernel, as before.
    assert resolve_implementation("auto", 50, devices=[GPU()]) == "pallas_gpu"


def test_what_cudnn_cannot_take_is_refused_with_the_reason():
    assert "all global" in unsupported((0, 5), False)
    assert "shifted" in unsupported((0, 0), True)
    assert "multiple of 8" in unsupported((0,), False, head_dim=36)
    assert unsupported((0, 0), False, head_dim=64) is None
    q, k, v = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention_blhd(q, k, v, Heads((0,) * 4, False, 0.125))
    with pytest.raises(ValueError, match="all global"):
        multi_window_attention(*(t.swapaxes(1, 2) for t in (q, k, v)), (0, 0, 5, 5),
                               jnp.zeros((4, 9)), implementation="cudnn")
    assert "does not run on cpu" in cannot_run("cudnn", jax.devices()[0])
    assert cannot_run("cudnn", GPU()) is None


def test_the_preflight_times_cudnn_beside_the_kernel_on_all_global_gpu_layers():
    from mwmae.kernels.plan import Layer
    from mwmae.preflight.attention import candidates

    encoder = Layer("encoder", 256, 12, 50, 64, (0,) * 12, False, "bfloat16")
    decoder = Layer("decoder", 256, 8, 250, 48, (2, 5, 10, 25, 50, 125, 0, 0), False, "bfloat16")
    assert candidates(GPU(), encoder) == [("xla", "timed"), ("pallas_gpu", "timed"),
                                          ("cudnn", "timed")]
    assert candidates(GPU(), decoder) == [("xla", "timed"), ("pallas_gpu", "timed")]
    f32 = dict(candidates(GPU(), Layer("encoder", 8, 12, 50, 64, (0,) * 12, False, "float32")))
    assert f32["cudnn"].startswith("skipped: cuDNN has no float32")


def test_auto_keeps_the_kernel_for_a_head_dim_cudnn_cannot_take():
    assert resolve_implementation("auto", 50, devices=[GPU()], window_sizes=(0,) * 4,
                                  dtype="bfloat16", head_dim=36) == "pallas_gpu"
    assert resolve_implementation("auto", 50, devices=[GPU()], window_sizes=(0,) * 4,
                                  dtype="bfloat16", head_dim=64) == "cudnn"
