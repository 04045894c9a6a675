"""The MLP's fc1 + GELU (``DenseGelu``, the activation recomputed in the backward pass so the
step writes less) against the plain composition it replaced: same parameters from the same key,
same values and gradients (float32 exactly up to rounding, bfloat16 to its precision)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mwmae.model.blocks import Mlp, dense_init


class PlainMlp(nn.Module):  # what the model computed before: nn.Dense, gelu, nn.Dense
    dim: int
    hidden: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1", kernel_init=dense_init)(x)
        x = nn.gelu(x, approximate=True)
        return nn.Dense(self.dim, dtype=self.dtype, name="fc2", kernel_init=dense_init)(x)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_mlp_matches_the_plain_composition(dtype, tol):
    x = jax.random.normal(jax.random.key(1), (4, 50, 64), jnp.float32).astype(dtype)
    ours, plain = Mlp(64, 256, dtype), PlainMlp(64, 256, dtype)
    params = ours.init(jax.random.key(0), x)
    reference = plain.init(jax.random.key(0), x)
    for a, b in zip(jax.tree.leaves(nn.unbox(params)), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)  # same names, shapes and initial values
    assert (jax.tree.structure(nn.unbox(params)) == jax.tree.structure(reference))

    def loss(module, p):
        return jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2)

    scale = float(loss(plain, reference))
    assert abs(float(loss(ours, params)) - scale) <= tol * scale
    g_ours = jax.tree.leaves(jax.grad(lambda p: loss(ours, p))(nn.unbox(params)))
    g_ref = jax.tree.leaves(jax.grad(lambda p: loss(plain, p))(reference))
    for a, b in zip(g_ours, g_ref):
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err <= tol * 10, err
