"""The compiled TPU path, checked on a CPU-only host: XLA and Mosaic compile for abstract TPU
devices that libtpu describes (``mwmae.aot``). Interpret-mode tests check the kernel's numbers;
these check that Mosaic accepts it, forward and backward, on every generation we target.

Run with the ``tpu`` extra's environment (the default one has no libtpu):
  scripts/install.sh .venv-tpu test,tpu && .venv-tpu/bin/python -m pytest tests_tpu
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mwmae import aot
from mwmae.kernels import multi_window_attention, resolve_implementation

GENERATIONS = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
PAPER_DECODER = (2, 5, 10, 25, 50, 125, 0, 0)
SHIFTED_ENCODER = (5, 5, 25, 25, 0, 0, 0, 0, 0, 0, 0, 0)

# (name, window sizes, shift, tokens, head_dim, dtypes): the model's real attention shapes.
BF16, F32 = jnp.bfloat16, jnp.float32
LAYERS = [
    ("paper-decoder", PAPER_DECODER, False, 250, 48, (BF16, F32)),
    ("shifted-encoder", SHIFTED_ENCODER, True, 250, 64, (BF16, F32)),
    ("base-encoder-visible", (0,) * 12, False, 50, 64, (BF16,)),  # the 20% unmasked patches
]
CASES = [pytest.param(gen, *layer[1:5], dtype, id=f"{gen}-{layer[0]}-{dtype.dtype.name}")
         for gen in GENERATIONS for layer in LAYERS for dtype in layer[5]]


@functools.cache
def devices(topology: str) -> list:
    return aot.topology_devices(topology)


def one_device(topology: str) -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(devices(topology)[:1]), ("device",)), PartitionSpec())


def compile_attention(topology, window_sizes, shift, length, head_dim, dtype, impl, batch=64):
    """Forward and backward (value_and_grad: both kernels) in one executable."""
    sharding = one_device(topology)
    heads = len(window_sizes)
    x = jax.ShapeDtypeStruct((batch, heads, length, head_dim), dtype, sharding=sharding)
    tables = jax.ShapeDtypeStruct((heads, max(1, 2 * max(window_sizes) - 1)), jnp.float32,
                                  sharding=sharding)

    def loss(q, k, v, t):
        out = multi_window_attention(q, k, v, window_sizes, t, shift, implementation=impl)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    return jax.jit(step).lower(x, x, x, tables).compile()


@pytest.mark.parametrize("generation,window_sizes,shift,length,head_dim,dtype", CASES)
def test_kernel_forward_and_backward_compile(generation, window_sizes, shift, length, head_dim,
                                             dtype):
    compiled = compile_attention(GENERATIONS[generation], window_sizes, shift, length, head_dim,
                                 dtype, "pallas_tpu")
    # Both kernels are really in the program (not an XLA fallback): forward and backward.
    assert aot.mosaic_kernels(compiled) == 2
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_auto_picks_the_kernel_on_kernel_generations(generation):
    assert resolve_implementation("auto", 250, devices=devices(GENERATIONS[generation])) == \
        "pallas_tpu"


def test_v3_cannot_take_the_kernel_so_auto_uses_xla(caplog):
    """Mosaic on v3 refuses bfloat16 matmul operands; "auto" must not send the kernel there."""
    with pytest.raises(Exception, match="Unsupported matmul RHS type"):
        compile_attention("v3:2x2", PAPER_DECODER, False, 250, 48, jnp.bfloat16, "pallas_tpu",
                          batch=8)
    v3 = devices("v3:2x2")
    assert resolve_implementation("auto", 250, devices=v3) == "xla"
    # The model path: under a v3 mesh, "auto" compiles the XLA attention (no Mosaic call).
    compiled = compile_attention("v3:2x2", PAPER_DECODER, False, 250, 48, jnp.bfloat16, "xla",
                                 batch=8)
    assert aot.mosaic_kernels(compiled) == 0
    with jax.set_mesh(Mesh(np.asarray(v3[:1]), ("device",))):
        chosen = []
        jax.jit(lambda x: chosen.append(resolve_implementation("auto", 250)) or x).lower(
            jax.ShapeDtypeStruct((2,), jnp.float32, sharding=one_device("v3:2x2")))
    assert chosen == ["xla"]
