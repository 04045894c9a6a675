"""Transformer blocks with multi-window multi-head attention.

A block with every window size 0 is exactly the plain ViT block of the original encoder, so the
encoder and decoder of MAE and MW-MAE all use this one block.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mwmae.kernels import (
    multi_window_attention,
    multi_window_attention_with_probs,
    resolve_implementation,
)
from mwmae.kernels.cudnn import attention_blhd
from mwmae.kernels.reference import Heads
from mwmae.kernels.sharded import sharded_multi_window_attention

LN_EPS = 1e-6

dense_init = nn.initializers.xavier_uniform()
# Matches the original's table init: variance_scaling(0.02, fan_in, truncated_normal) on (2w-1, 1).
bias_table_init = nn.initializers.variance_scaling(0.02, "fan_in", "truncated_normal")


def _part(init, names):
    return nn.with_logical_partitioning(init, names)


def layer_norm(dtype: Any, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name,
                        scale_init=_part(nn.initializers.ones, ("norm",)),
                        bias_init=_part(nn.initializers.zeros, ("norm",)))


class MultiWindowAttention(nn.Module):
    """qkv projection, per-head windowed (or global) attention, output projection.

    ``capture``: also sow, into the ``intermediates`` collection, ``attention`` (the float32
    probabilities, (B, heads, L, L)) and ``head_outputs`` (each head's output before the
    projection, float32 (B, L, heads, head_dim)). Capturing runs the XLA reference whatever
    ``attention_impl`` says (the fused kernels never form the probabilities); the sown values
    are kept only when the caller makes ``intermediates`` mutable.
    """

    dim: int
    num_heads: int
    window_sizes: tuple[int, ...]
    shift: bool = False
    dtype: Any = jnp.float32
    attention_impl: str = "auto"
    capture: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        head_dim = self.dim // self.num_heads
        # (in, q|k|v, head, head_dim): the original's (D, 3D) kernel with its channels labelled.
        cudnn = not self.capture and resolve_implementation(
            self.attention_impl, x.shape[1], window_sizes=self.window_sizes, shift=self.shift,
            dtype=jnp.dtype(self.dtype).name, head_dim=head_dim) == "cudnn"
        qkv = HeadsDense((self.dim,), (3, self.num_heads, head_dim),
                         ("embed", None, "heads", "head_dim"), self.dtype, name="qkv")(x)
        tables = [
            self.param(f"rel_pos_bias_{h}", _part(_squeeze_last(bias_table_init), (None,)),
                       (2 * w - 1,))
            for h, w in enumerate(self.window_sizes) if w > 0
        ]
        tables = stack_bias_tables(tables, self.window_sizes)
        if cudnn:
            # cuDNN reads the projection's (B, L, H, hd) layout: no per-head transposes or
            # padding around it. (Three separate q, k, v matmuls instead of slicing one joint
            # output were measured: 5 MB per example more traffic, not less.)
            heads = Heads(self.window_sizes, self.shift, head_dim ** -0.5)
            out = attention_blhd(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], heads, tables)
            return HeadsDense((self.num_heads, head_dim), (self.dim,),
                              ("heads", "head_dim", "embed"), self.dtype, name="proj")(out)
        q, k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in range(3))  # (B, H, L, hd)
        if self.capture:
            out, probs = multi_window_attention_with_probs(q, k, v, self.window_sizes, tables,
                                                           self.shift)
        else:
            out = attention(q, k, v, self.window_sizes, tables, self.shift, self.attention_impl)
        out = jnp.swapaxes(out, 1, 2)  # (B, L, H, hd)
        if self.capture:
            self.sow("intermediates", "attention", probs)
            self.sow("intermediates", "head_outputs", out.astype(jnp.float32))
        return HeadsDense((self.num_heads, head_dim), (self.dim,),
                          ("heads", "head_dim", "embed"), self.dtype, name="proj")(out)


class HeadsDense(nn.Module):
    """A dense layer whose kernel keeps its head structure, e.g. (D, 3, heads, head_dim).

    Initialised as the original's 2-D (prod(in), prod(out)) kernel (same fan-in/out), and built
    directly in its final shape so its logical axis names always apply (flax's DenseGeneral
    initialises through the flattened shape).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    names: tuple[str | None, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*self.in_shape, *self.out_shape)
        flat = (math.prod(self.in_shape), math.prod(self.out_shape))
        init = lambda key, shape, dtype=jnp.float32: dense_init(key, flat, dtype).reshape(shape)
        kernel = self.param("kernel", _part(init, self.names), shape)
        bias = self.param("bias", _part(nn.initializers.zeros, self.names[len(self.in_shape):]),
                          self.out_shape)
        n_in = len(self.in_shape)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
        return jax.lax.dot_general(x, kernel, dims) + bias


def attention(q, k, v, window_sizes, tables, shift, implementation):
    """The attention entry point; kernels run per device under shard_map when a mesh is set.

    XLA partitions the reference by itself, but a Pallas call is opaque to it: on a mesh the
    kernel must see only its device's block (batch and heads split as the rules say).
    """
    impl = resolve_implementation(implementation, q.shape[2], window_sizes=window_sizes,
                                  shift=shift)
    mesh = jax.sharding.get_abstract_mesh()
    if impl == "xla" or mesh.empty or mesh.size == 1:
        return multi_window_attention(q, k, v, window_sizes, tables, shift, implementation=impl)
    # Which mesh axes split the batch and the heads is for the logical-axis rules in scope.
    batch, heads = (_mesh_axes(a) for a in nn.logical_to_mesh_axes(("act_batch", "act_heads")))
    split = math.prod(mesh.shape[a] for a in heads)
    head_axis = heads[0] if len(heads) == 1 and len(window_sizes) % split == 0 else None
    return sharded_multi_window_attention(
        q, k, v, window_sizes, tables, shift, mesh=mesh, batch_axes=batch, head_axis=head_axis,
        implementation=impl)


def _mesh_axes(spec_entry: Any) -> tuple[str, ...]:
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def stack_bias_tables(tables: list[jax.Array], window_sizes: tuple[int, ...]) -> jax.Array:
    """Per-head tables of 2w-1 entries -> one (heads, 2*max(w)-1) array, zero padded."""
    width = max(1, 2 * max(window_sizes) - 1)
    rows, it = [], iter(tables)
    for w in window_sizes:
        t = next(it).astype(jnp.float32) if w > 0 else jnp.zeros((0,), jnp.float32)
        rows.append(jnp.pad(t, (0, width - t.shape[0])))
    return jnp.stack(rows)


def _squeeze_last(init):
    """The original's tables are (2w-1, 1); initialise with that fan-in, store as (2w-1,)."""
    return lambda key, shape, dtype=jnp.float32: init(key, (*shape, 1), dtype)[..., 0]


# GELU of fc1's output plus its bias, recomputed in the backward pass from the matmul's output
# (which the program holds anyway) instead of kept: the forward then writes one tensor of the
# MLP's width, not three (the matmul's output, the biased input and the activation), and the
# step holds less. Same arithmetic as before, so the same numbers.
_bias_gelu = jax.checkpoint(lambda h, b: nn.gelu(h + b, approximate=True))


class Mlp(nn.Module):
    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = DenseGelu(self.hidden, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="fc2",
                        kernel_init=_part(dense_init, ("mlp", "embed")),
                        bias_init=_part(nn.initializers.zeros, ("embed",)))(x)


class DenseGelu(nn.Module):
    """``nn.Dense`` followed by the tanh GELU, with the dense layer's own parameters (``kernel``
    (in, features), ``bias``), so checkpoints and released weights load unchanged; the bias is
    added inside the recomputed activation (see ``_bias_gelu``)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _part(dense_init, ("embed", "mlp")),
                            (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", _part(nn.initializers.zeros, ("mlp",)), (self.features,),
                          jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        h = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return _bias_gelu(h, bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    dim: int
    num_heads: int
    window_sizes: tuple[int, ...]
    shift: bool = False
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    attention_impl: str = "auto"
    capture: bool = False  # see MultiWindowAttention

    @nn.compact
    def __call__(self, x: jax.Array, drop_rate: jax.Array | None = None) -> jax.Array:
        """``drop_rate``: stochastic depth, each residual branch dropped per clip with this
        probability (needs a "dropout" rng); None in pretraining and evaluation."""
        y = layer_norm(self.dtype, "norm1")(x)
        y = MultiWindowAttention(self.dim, self.num_heads, self.window_sizes, self.shift,
                                 self.dtype, self.attention_impl, self.capture, name="attn")(y)
        x = x + self._drop_path(y, drop_rate)
        y = layer_norm(self.dtype, "norm2")(x)
        y = Mlp(self.dim, self.dim * self.mlp_ratio, self.dtype, name="mlp")(y)
        x = x + self._drop_path(y, drop_rate)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

    def _drop_path(self, y: jax.Array, rate: jax.Array | None) -> jax.Array:
        if rate is None:
            return y
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1))
        return y * (mask / keep).astype(y.dtype)


class BlockGroup(nn.Module):
    """``period`` consecutive blocks; with shifted windows, odd blocks shift (period 2)."""

    dim: int
    num_heads: int
    window_sizes: tuple[int, ...]
    period: int = 1
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    attention_impl: str = "auto"
    capture: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, drop_rates: jax.Array | None = None
                 ) -> tuple[jax.Array, None]:
        for i in range(self.period):
            x = Block(self.dim, self.num_heads, self.window_sizes, shift=i % 2 == 1,
                      mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                      attention_impl=self.attention_impl, capture=self.capture,
                      name=f"block_{i}")(
                x, None if drop_rates is None else drop_rates[i])
        return x, None


class Stack(nn.Module):
    """``depth`` blocks as one ``nn.scan`` over groups: one compiled body, stacked parameters.

    With ``capture``, what the attention sows is stacked like the parameters: each entry under
    ``layers/block_<i>`` of ``intermediates`` has a leading axis over the ``depth / period``
    groups (block i of group g is layer g * period + i).
    """

    # Deliberate repeat: the scan passes these through to BlockGroup, and flax modules declare
    # their attributes as fields.
    depth: int
    dim: int
    num_heads: int
    window_sizes: tuple[int, ...]
    period: int = 1
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    attention_impl: str = "auto"
    unroll: int = 1
    drop_path: float = 0.0  # stochastic depth of the last block; 0 at the first, linear between
    capture: bool = False  # see MultiWindowAttention

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        groups = self.depth // self.period
        rates = None
        if self.drop_path > 0 and not deterministic:
            rates = jnp.linspace(0.0, self.drop_path, self.depth).reshape(groups, self.period)
        scanned = nn.scan(
            BlockGroup, variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": rates is not None},
            length=groups, unroll=self.unroll, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scanned(self.dim, self.num_heads, self.window_sizes, self.period,
                       self.mlp_ratio, self.dtype, self.attention_impl, self.capture,
                       name="layers")(x, rates)
        return x
