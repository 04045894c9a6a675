"""Fused multi-window attention for TPU (Pallas / Mosaic).

One ``pallas_call`` covers every head of a layer: the grid is (batch, head) and each step keeps
one head's whole padded sequence in VMEM (L <= a few hundred, so the Lp x Lp float32 score
matrix is at most a few hundred KiB). Windowed heads are computed by masking the full score
matrix (query window id == key window id); at these lengths one dense MXU pass beats gathering
ragged diagonal blocks, and a single kernel then serves every window size, so heads with
different windows share one compiled program.

The relative-position bias is never materialised in HBM as an [L, L] array: each head passes a
(1, N) "diagonal vector" (``pallas_common.diagonal_bias``) and the kernel expands it into the
Toeplitz matrix ``bias[i, j] = vec[(j - i) mod N]`` with one sublane-strided lane rotation
(``pltpu.roll(..., stride=1)``: row i is rotated by i). The backward pass applies the adjoint
rotation (row i rotated by -i, i.e. stride N - 1) to dS and sums over rows, which yields the
per-(batch, head) sums over diagonals = the gradient of the diagonal vector; XLA sums them over
the batch and scatters them back into the tables.

Forward and backward are separate kernels under ``jax.custom_vjp``; the backward recomputes
scores and probabilities from q, k, v (nothing of size L x L is stored between passes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mwmae.kernels import pallas_common as pc

LANES = 128

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


def strided_roll(x: jax.Array, stride: int, *, emulate: bool = False) -> jax.Array:
    """Rotate row i of a 2-D array right by ``i * stride`` lanes (``pltpu.roll`` semantics).

    ``emulate`` computes the same permutation with one gather: the generic interpreter lowers
    ``pltpu.roll`` with a stride to one roll per row, which makes CPU compiles take seconds.
    """
    if not emulate:
        return pltpu.roll(x, 0, 1, stride=stride, stride_axis=0)
    rows, cols = x.shape
    idx = (lax.broadcasted_iota(jnp.int32, x.shape, 1)
           - stride * lax.broadcasted_iota(jnp.int32, x.shape, 0)) % cols
    return jnp.take_along_axis(x, idx, axis=1)


def _emulate(interpret: InterpretMode) -> bool:
    return interpret in (True, "generic")


def _additive(cq, ck, vec, geom: pc.Geometry, emulate: bool):
    """(Lp, Lp) float32 term added to the scores of every batch item of one head: relative
    position bias, the shifted-window -100, and MASKED (which absorbs any score) outside the
    query's window and on padding."""
    lp = geom.padded_length
    add = jnp.zeros((lp, lp), jnp.float32)
    if geom.has_bias:
        n = geom.bias_width
        toeplitz = strided_roll(jnp.broadcast_to(vec, (lp, n)), 1, emulate=emulate)
        add = toeplitz if n == lp else toeplitz[:, :lp]
    if geom.has_shift:
        add = add + jnp.where((cq & 3) != (ck & 3), pc.SHIFT_MASK_VALUE, 0.0)
    return jnp.where((cq >> 2) == (ck >> 2), add, pc.MASKED)


def _probabilities(q, k, additive, scale: float):
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * scale + additive
    p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    return p / jnp.sum(p, axis=1, keepdims=True)


def _fwd_kernel(cq_ref, ck_ref, vec_ref, q_ref, k_ref, v_ref, o_ref, *, geom: pc.Geometry,
                emulate: bool):
    # Built once per grid step and shared by the step's batch items.
    additive = _additive(cq_ref[...], ck_ref[...], vec_ref[...], geom, emulate)

    def item(i, carry):
        v = v_ref[i]
        # Normalise before the cast, as the reference does, so bf16 results round the same way.
        p = _probabilities(q_ref[i], k_ref[i], additive, geom.scale).astype(v.dtype)
        o_ref[i] = jnp.dot(p, v, preferred_element_type=jnp.float32).astype(o_ref.dtype)
        return carry

    lax.fori_loop(0, q_ref.shape[0], item, 0)


def _bwd_kernel(cq_ref, ck_ref, vec_ref, q_ref, k_ref, v_ref, do_ref,
                dq_ref, dk_ref, dv_ref, dvec_ref, ds_acc_ref, *, geom: pc.Geometry,
                emulate: bool):
    additive = _additive(cq_ref[...], ck_ref[...], vec_ref[...], geom, emulate)
    contract_rows = (((0,), (0,)), ((), ()))
    lp = geom.padded_length

    ds_acc_ref[...] = jnp.zeros(ds_acc_ref.shape, ds_acc_ref.dtype)

    def item(i, carry):
        q, k, v, do = q_ref[i], k_ref[i], v_ref[i], do_ref[i]
        p = _probabilities(q, k, additive, geom.scale)
        dv = lax.dot_general(p.astype(do.dtype), do, contract_rows,
                             preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.sum(p * dp, axis=1, keepdims=True))
        ds_lo = ds.astype(q.dtype)
        dq = jnp.dot(ds_lo, k, preferred_element_type=jnp.float32) * geom.scale
        dk = lax.dot_general(ds_lo, q, contract_rows,
                             preferred_element_type=jnp.float32) * geom.scale
        dq_ref[i] = dq.astype(dq_ref.dtype)
        dk_ref[i] = dk.astype(dk_ref.dtype)
        dv_ref[i] = dv.astype(dv_ref.dtype)
        if geom.has_bias:
            ds_acc_ref[...] += ds
        return carry

    lax.fori_loop(0, q_ref.shape[0], item, 0)
    if geom.has_bias:
        ds_total = ds_acc_ref[...]
        # The diagonal sums are linear in dS: one rotation for the whole batch block.
        n = geom.bias_width
        if n > lp:
            ds_total = jnp.concatenate([ds_total, jnp.zeros((lp, n - lp), jnp.float32)], axis=1)
        # Row i rotated by -i (stride n - 1 == -1 mod n): column m then holds dS[i, i + m].
        diagonals = strided_roll(ds_total, n - 1, emulate=emulate)
        dvec_ref[...] = jnp.sum(diagonals, axis=0, keepdims=True)
    else:
        dvec_ref[...] = jnp.zeros(dvec_ref.shape, dvec_ref.dtype)


def batch_block(batch: int, target: int = 8) -> int:
    """Batch items per grid step: amortises the per-step overhead over several items."""
    return max(d for d in range(1, min(batch, target) + 1) if batch % d == 0)


def _specs(geom: pc.Geometry, head_dim: int, n_blocked: int, block_b: int):
    lp, n = geom.padded_length, geom.bias_width
    sq = pl.squeezed
    meta = [
        pl.BlockSpec((sq, lp, 1), lambda b, h: (h, 0, 0)),
        pl.BlockSpec((sq, 1, lp), lambda b, h: (h, 0, 0)),
        pl.BlockSpec((sq, 1, n), lambda b, h: (h, 0, 0)),
    ]
    blocked = [pl.BlockSpec((block_b, sq, lp, head_dim), lambda b, h: (b, h, 0, 0))] * n_blocked
    return meta, blocked


def _codes(geom: pc.Geometry):
    codes = jnp.asarray(geom.codes())
    return codes[:, :, None], codes[:, None, :]


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def _forward(geom: pc.Geometry, interpret: InterpretMode, q, k, v, vec):
    b, h, lp, d = q.shape
    block_b = batch_block(b)
    meta, blocked = _specs(geom, d, 3, block_b)
    cq, ck = _codes(geom)
    flops = 4 * b * h * lp * lp * d
    return pl.pallas_call(
        functools.partial(_fwd_kernel, geom=geom, emulate=_emulate(interpret)),
        out_shape=jax.ShapeDtypeStruct(q.shape, v.dtype),
        grid=(b // block_b, h),
        in_specs=meta + blocked,
        out_specs=blocked[0],
        compiler_params=_compiler_params(),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * h * lp * lp,
                                      bytes_accessed=4 * q.size * q.dtype.itemsize),
        interpret=_interpret_arg(interpret),
        name="multi_window_attention_fwd",
    )(cq, ck, vec, q, k, v)


def _backward(geom: pc.Geometry, interpret: InterpretMode, q, k, v, vec, do):
    b, h, lp, d = q.shape
    n = geom.bias_width
    block_b = batch_block(b)
    meta, blocked = _specs(geom, d, 4, block_b)
    cq, ck = _codes(geom)
    dvec_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, 1, n), lambda b_, h_: (b_, h_, 0, 0))
    flops = 10 * b * h * lp * lp * d
    dq, dk, dv, dvec = pl.pallas_call(
        functools.partial(_bwd_kernel, geom=geom, emulate=_emulate(interpret)),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct((b // block_b, h, 1, n), jnp.float32)),
        grid=(b // block_b, h),
        in_specs=meta + blocked,
        out_specs=(blocked[0], blocked[0], blocked[0], dvec_spec),
        scratch_shapes=[pltpu.VMEM((lp, lp), jnp.float32)],
        compiler_params=_compiler_params(),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * h * lp * lp,
                                      bytes_accessed=7 * q.size * q.dtype.itemsize),
        interpret=_interpret_arg(interpret),
        name="multi_window_attention_bwd",
    )(cq, ck, vec, q, k, v, do)
    return dq, dk, dv, jnp.sum(dvec, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(geom, interpret, q, k, v, vec):
    return _forward(geom, interpret, q, k, v, vec)


def _attention_fwd(geom, interpret, q, k, v, vec):
    return _forward(geom, interpret, q, k, v, vec), (q, k, v, vec)


def _attention_bwd(geom, interpret, residuals, do):
    q, k, v, vec = residuals
    return _backward(geom, interpret, q, k, v, vec, do)


_attention.defvjp(_attention_fwd, _attention_bwd)


def multi_window_attention_tpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window_sizes: Sequence[int],
    bias_tables: jax.Array,
    shift: bool = False,
    *,
    scale: float | None = None,
    interpret: InterpretMode = False,
) -> jax.Array:
    """Multi-window attention through the Mosaic TPU kernel (same contract as the reference).

    ``interpret``: False on TPU; "generic" / True or "tpu" (the TPU interpreter) elsewhere.
    """
    window_sizes = pc.validate(q, k, v, window_sizes, bias_tables)
    length, head_dim = q.shape[2], q.shape[3]
    lp = pc.round_up(length, LANES)
    geom = pc.Geometry(
        window_sizes=window_sizes, length=length, padded_length=lp, shift=bool(shift),
        scale=pc.default_scale(head_dim, scale),
        bias_width=pc.round_up(max(lp, 2 * max(window_sizes) - 1), LANES))
    qp, kp, vp = pc.prepare(q, k, v, geom)
    vec = pc.diagonal_bias(bias_tables, window_sizes, geom.bias_width)[:, None, :]
    out = _attention(geom, interpret, qp, kp, vp, vec)
    return pc.finish(out, geom, head_dim)
