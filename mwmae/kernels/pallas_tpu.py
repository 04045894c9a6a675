"""Fused multi-window attention for TPU (Pallas / Mosaic).

One ``pallas_call`` covers every head of a layer: the grid is (head, batch block) and each step
keeps one head's whole padded sequence in VMEM (L <= a few hundred, so the Lp x Lp float32 score
matrix is at most a few hundred KiB). Windowed heads are computed by masking the full score
matrix; at these lengths one dense MXU pass beats gathering ragged diagonal blocks, and a single
kernel then serves every window size, so heads with different windows share one program.

Everything that depends on the head but not on the batch item (relative-position bias, the
shifted-window -100, the window and padding masks) is one dense (heads, Lp, Lp) float32
"additive" matrix built by XLA outside the kernel (``additive_matrix``: about 2 MiB per layer at
the model's 250 tokens, tiny next to the activations). The kernel only adds it to the scores, so
it uses nothing but matmuls, elementwise ops and row reductions: operations Mosaic lowers on
every TPU generation from v4 on. (An earlier design expanded a bias vector into its Toeplitz
matrix in VMEM with a sublane-strided lane rotation; Mosaic accepts that only on v5+ and only for
shifts within one vreg, so the backward compiled nowhere.)

The additive matrix's block index depends on the head only and the batch is the inner grid axis,
so each head's block is fetched once. The backward pass sums dS over the batch into one
(Lp, Lp) output block per head (the batch axis is "arbitrary", i.e. sequential, for that); XLA
then carries that gradient back through the gather that built the bias, into the tables.

Forward and backward are separate kernels under ``jax.custom_vjp``; the backward recomputes
scores and probabilities from q, k, v (nothing of size B x L x L is stored between passes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mwmae.kernels import pallas_common as pc
from mwmae.kernels.reference import SHIFT_MASK_VALUE, Heads

LANES = 128
# Bytes of q/k/v/o (and gradients) per grid step that keep the double-buffered blocks of the
# backward (7 arrays) well inside the 16 MiB of scoped VMEM the smallest generations give a kernel.
_BLOCK_BYTES = 1 << 20

# Interpret modes: False (compile with Mosaic), "generic" (pallas interpret=True, fast on CPU),
# "tpu" (the TPU interpreter, which also simulates VMEM and checks for races; slow).
InterpretMode = bool | str


def _interpret_arg(interpret: InterpretMode):
    if interpret in (False, None):
        return False
    if interpret in (True, "generic"):
        return True
    if interpret == "tpu":
        return pltpu.InterpretParams()
    raise ValueError(f"unknown interpret mode {interpret!r}")


def additive_matrix(bias_tables: jax.Array, geom: pc.Geometry) -> jax.Array:
    """(heads or 1, Lp, Lp) float32 term added to the scores of query i and key j.

    Inside a window: ``table[h, i' - j' + w - 1]`` plus -100 between shifted regions that
    differ; outside the query's window and on padding: MASKED. Shifted windows are expressed
    here, through each position's place ``i'`` in the rolled sequence, so the kernel runs on q, k
    and v as they are (no per-head rolls, which XLA compiles slowly and runs as copies). Layers
    without bias, e.g. the encoder's global heads, get one matrix that every head shares.

    Every index is computed from iotas rather than stored as a constant: XLA would otherwise
    constant-fold (Lp, Lp) literals and a scatter-add through them in the backward, which costs
    tens of seconds on every TPU compile.
    """
    n, lp = geom.length, geom.padded_length
    heads = len(geom.window_sizes) if geom.has_bias else 1
    shape = (heads, lp, lp)
    w = jnp.asarray(geom.window_sizes[:heads], jnp.int32)[:, None, None]
    s = jnp.asarray(geom.shifts[:heads], jnp.int32)[:, None, None]

    def place(axis):
        """Position in the rolled sequence, its window (-1: padding) and Swin region."""
        p = lax.broadcasted_iota(jnp.int32, shape, axis)
        real = p < n
        rolled = jnp.where(real, (p - s) % n, p)
        window = jnp.where(real, jnp.where(w > 0, rolled // jnp.maximum(w, 1), 0), -1)
        region = jnp.where(s > 0, (rolled >= n - w).astype(jnp.int32) + (rolled >= n - s), 0)
        return rolled, window, region

    qi, q_window, q_region = place(1)
    kj, k_window, k_region = place(2)
    add = jnp.where(q_region != k_region, SHIFT_MASK_VALUE, 0.0)
    if geom.has_bias:
        index = jnp.clip(qi - kj + w - 1, 0, bias_tables.shape[1] - 1)
        tables = bias_tables.astype(jnp.float32)[:, None, :]
        bias = jnp.take_along_axis(tables, index.reshape(heads, 1, lp * lp), axis=2)
        add = add + jnp.where(w > 0, bias.reshape(shape), 0.0)
    return jnp.where(q_window == k_window, add, pc.MASKED)


def _probabilities(q, k, additive, scale: float):
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * scale + additive
    p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    return p / jnp.sum(p, axis=1, keepdims=True)


def _fwd_kernel(add_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float):
    additive = add_ref[...]

    def item(i, carry):
        v = v_ref[i]
        # Normalise before the cast, as the reference does, so bf16 results round the same way.
        p = _probabilities(q_ref[i], k_ref[i], additive, scale).astype(v.dtype)
        o_ref[i] = jnp.dot(p, v, preferred_element_type=jnp.float32).astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, q_ref.shape[0], item, 0)


def _bwd_kernel(add_ref, q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref, *dadd_refs,
                scale: float):
    additive = add_ref[...]
    if dadd_refs:
        dadd_ref, = dadd_refs

        @pl.when(pl.program_id(1) == 0)
        def _():
            dadd_ref[...] = jnp.zeros(dadd_ref.shape, dadd_ref.dtype)

    def item(i, carry):
        q, k, v, do = q_ref[i], k_ref[i], v_ref[i], do_ref[i]
        p = _probabilities(q, k, additive, scale)
        # Transposes spelled out: a matmul contracting the LHS's rows is not lowered everywhere.
        pt = p.T.astype(do.dtype)
        dv = jnp.dot(pt, do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
        ds_lo = ds.astype(q.dtype)
        dq = jnp.dot(ds_lo, k, preferred_element_type=jnp.float32) * scale
        dk = jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * scale
        dq_ref[i] = dq.astype(dq_ref.dtype)
        dk_ref[i] = dk.astype(dk_ref.dtype)
        dv_ref[i] = dv.astype(dv_ref.dtype)
        if dadd_refs:
            dadd_ref[...] += ds
        return carry

    lax.fori_loop(0, q_ref.shape[0], item, 0)


def batch_block(batch: int, length: int, head_dim: int, itemsize: int) -> int:
    """Batch items per grid step: amortises per-step overhead while the blocks stay small.

    VMEM pads the head dimension to whole 128-lane rows, so that is what an item costs.
    """
    per_item = length * pc.round_up(head_dim, LANES) * itemsize
    target = max(1, min(8, _BLOCK_BYTES // per_item))
    return max(d for d in range(1, min(batch, target) + 1) if batch % d == 0)


def _specs(geom: pc.Geometry, shared_additive: bool, head_dim: int, n_blocked: int,
           block_b: int):
    lp = geom.padded_length
    sq = pl.squeezed
    add_index = (lambda h, b: (0, 0, 0)) if shared_additive else (lambda h, b: (h, 0, 0))
    additive = pl.BlockSpec((sq, lp, lp), add_index)
    blocked = [pl.BlockSpec((block_b, sq, lp, head_dim), lambda h, b: (b, h, 0, 0))] * n_blocked
    return additive, blocked


def _forward(geom: pc.Geometry, interpret: InterpretMode, q, k, v, additive):
    b, h, lp, d = q.shape
    block_b = batch_block(b, lp, d, q.dtype.itemsize)
    add_spec, blocked = _specs(geom, additive.shape[0] == 1, d, 3, block_b)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=geom.scale),
        out_shape=jax.ShapeDtypeStruct(q.shape, v.dtype),
        grid=(h, b // block_b),
        in_specs=[add_spec] + blocked,
        out_specs=blocked[0],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=pl.CostEstimate(flops=4 * b * h * lp * lp * d,
                                      transcendentals=b * h * lp * lp,
                                      bytes_accessed=4 * q.size * q.dtype.itemsize
                                      + additive.size * 4),
        interpret=_interpret_arg(interpret),
        name="multi_window_attention_fwd",
    )(additive, q, k, v)


def _backward(geom: pc.Geometry, interpret: InterpretMode, q, k, v, additive, do):
    b, h, lp, d = q.shape
    block_b = batch_block(b, lp, d, q.dtype.itemsize)
    add_spec, blocked = _specs(geom, additive.shape[0] == 1, d, 4, block_b)
    out_shape = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (q, k, v)]
    out_specs = [blocked[0]] * 3
    # Without bias tables the additive matrix is a constant: no gradient to sum.
    if geom.has_bias:
        out_shape.append(jax.ShapeDtypeStruct(additive.shape, jnp.float32))
        out_specs.append(add_spec)
    grads = pl.pallas_call(
        functools.partial(_bwd_kernel, scale=geom.scale),
        out_shape=tuple(out_shape),
        grid=(h, b // block_b),
        in_specs=[add_spec] + blocked,
        out_specs=tuple(out_specs),
        # The batch axis accumulates dS into each head's block, so it runs in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=10 * b * h * lp * lp * d,
                                      transcendentals=b * h * lp * lp,
                                      bytes_accessed=7 * q.size * q.dtype.itemsize
                                      + 2 * additive.size * 4),
        interpret=_interpret_arg(interpret),
        name="multi_window_attention_bwd",
    )(additive, q, k, v, do)
    dadd = grads[3] if geom.has_bias else jnp.zeros_like(additive)
    return (*grads[:3], dadd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(geom, interpret, q, k, v, additive):
    return _forward(geom, interpret, q, k, v, additive)


def _attention_fwd(geom, interpret, q, k, v, additive):
    return _forward(geom, interpret, q, k, v, additive), (q, k, v, additive)


def _attention_bwd(geom, interpret, residuals, do):
    q, k, v, additive = residuals
    return _backward(geom, interpret, q, k, v, additive, do)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention_tpu(q: jax.Array, k: jax.Array, v: jax.Array, bias_tables: jax.Array, heads: Heads,
                  interpret: InterpretMode = False) -> jax.Array:
    """Multi-window attention through the Mosaic TPU kernel (inputs as ``check_call`` accepts them).

    ``interpret``: False on TPU; "generic" / True or "tpu" (the TPU interpreter) elsewhere.
    """
    length = q.shape[2]
    geom = pc.Geometry(
        window_sizes=heads.window_sizes, length=length, padded_length=pc.round_up(length, LANES),
        shift=heads.shift, scale=heads.scale, bias_width=bias_tables.shape[1])
    qp, kp, vp = (pc.pad_length(t, geom.padded_length) for t in (q, k, v))
    out = _attention(geom, interpret, qp, kp, vp, additive_matrix(bias_tables, geom))
    return out[:, :, :length]
