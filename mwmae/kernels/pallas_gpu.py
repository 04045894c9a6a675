"""Fused multi-window attention for GPU (Pallas, Triton lowering).

Why Triton rather than Mosaic GPU: with jax 0.10 Mosaic GPU is the Hopper/Blackwell-only,
warpgroup-level backend (WGMMA/TMA tiles of 64 rows, swizzled 64-element-wide shared-memory
tiles): head dim 48 does not fit its swizzle tiles without padding, the kernel needs
gather-style loads for the relative-position bias that Mosaic GPU does not offer, and its
interpreter is private, so it could not be validated off-GPU. The Triton lowering runs on
Ampere and Hopper alike, supports pointer-tensor (gather) loads and masked arbitrary tiles, and
its interpret mode checks the very kernel code on CPU.

Layout: the grid is (batch, head, query block). Each program streams the key blocks that can
share a window with its query block (flash-attention style online softmax), so small windows
touch one or two key blocks instead of the whole sequence; the block ranges are static per
(head, block) and passed as a small int32 table. The bias is gathered from the head's diagonal
vector (``pallas_common.diagonal_bias``) by ``(j - i) mod width``. The forward stores the
row log-sum-exp; the backward is two kernels (dK/dV per key block, dQ per query block) that
recompute probabilities from it. The bias gradient is accumulated in the dQ kernel by walking
the 2w - 1 diagonals of its query block (row-wise dot products of q with shifted k rows), which
needs neither atomics nor an L x L buffer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mwmae.kernels import pallas_common as pc
from mwmae.kernels.reference import SHIFT_MASK_VALUE, Heads

MAX_BLOCK = 64


def _block(length: int) -> int:
    return min(MAX_BLOCK, max(16, pc.next_power_of_2(length)))


def _ranges(geom: pc.Geometry, block: int) -> np.ndarray:
    """(heads, blocks, 4) int32: [first block, end block, window, 0] of the partner positions.

    Symmetric for queries and keys (windows are aligned runs), so one table serves both the
    query-block and the key-block grids.
    """
    n, lp = geom.length, geom.padded_length
    nb = lp // block
    out = np.zeros((len(geom.window_sizes), nb, 4), np.int32)
    for h, w in enumerate(geom.window_sizes):
        for i in range(nb):
            lo, hi = i * block, min((i + 1) * block, n)
            out[h, i, 2] = w
            if lo >= n:
                continue  # padding only: nothing to attend
            if w == 0:
                out[h, i, :2] = (0, -(-n // block))
            else:
                first, last = (lo // w) * w, -(-hi // w) * w
                out[h, i, :2] = (first // block, -(-last // block))
    return out


def _dot(a, b, trans_a=False, trans_b=False):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _tile_scores(q, k, cq, ck, vec_ref, q0, k0, geom: pc.Geometry, width: int):
    """Masked, biased float32 scores of one (query block, key block) tile."""
    s = _dot(q, k, trans_b=True) * geom.scale
    if geom.has_bias:
        rows = q0 + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        cols = k0 + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = s + vec_ref[(cols - rows) & (width - 1)]
    if geom.has_shift:
        s = s + jnp.where((cq[:, None] & 3) != (ck[None, :] & 3), SHIFT_MASK_VALUE, 0.0)
    return jnp.where((cq[:, None] >> 2) == (ck[None, :] >> 2), s, pc.MASKED)


def _fwd_kernel(rng_ref, codes_ref, vec_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                geom: pc.Geometry, block: int, width: int):
    q0 = pl.program_id(2) * block
    q = q_ref[...]
    cq = codes_ref[pl.ds(q0, block)]

    def body(kb, carry):
        m, denom, acc = carry
        k0 = pl.multiple_of(kb * block, block)
        v = v_ref[pl.ds(k0, block), :]
        s = _tile_scores(q, k_ref[pl.ds(k0, block), :], cq, codes_ref[pl.ds(k0, block)],
                         vec_ref, q0, k0, geom, width)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, denom, acc

    init = (jnp.full((block,), -jnp.inf, jnp.float32), jnp.zeros((block,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, denom, acc = lax.fori_loop(rng_ref[0], rng_ref[1], body, init)
    # Padding-only blocks run no iteration: keep them finite (they are sliced away).
    empty = denom == 0.0
    denom = jnp.where(empty, 1.0, denom)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(denom))


def _dkdv_kernel(rng_ref, codes_ref, vec_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, geom: pc.Geometry, block: int, width: int):
    k0 = pl.program_id(2) * block
    k, v = k_ref[...], v_ref[...]
    ck = codes_ref[pl.ds(k0, block)]

    def body(qb, carry):
        dk, dv = carry
        q0 = pl.multiple_of(qb * block, block)
        q = q_ref[pl.ds(q0, block), :]
        do = do_ref[pl.ds(q0, block), :]
        s = _tile_scores(q, k, codes_ref[pl.ds(q0, block)], ck, vec_ref, q0, k0, geom, width)
        p = jnp.exp(s - lse_ref[pl.ds(q0, block)][:, None])
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta_ref[pl.ds(q0, block)][:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(rng_ref[0], rng_ref[1], body, (zeros, zeros))
    dk_ref[...] = (dk * geom.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(rng_ref, codes_ref, vec_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dvec_ref, *, geom: pc.Geometry, block: int, width: int):
    q0 = pl.program_id(2) * block
    q, do = q_ref[...], do_ref[...]
    cq = codes_ref[pl.ds(q0, block)]
    lse = lse_ref[pl.ds(q0, block)]
    delta = delta_ref[pl.ds(q0, block)]

    def body(kb, dq):
        k0 = pl.multiple_of(kb * block, block)
        k = k_ref[pl.ds(k0, block), :]
        s = _tile_scores(q, k, cq, codes_ref[pl.ds(k0, block)], vec_ref, q0, k0, geom, width)
        p = jnp.exp(s - lse[:, None])
        ds = p * (_dot(do, v_ref[pl.ds(k0, block), :], trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(rng_ref[0], rng_ref[1], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * geom.scale).astype(dq_ref.dtype)

    if not geom.has_bias:
        dvec_ref[...] = jnp.zeros(dvec_ref.shape, dvec_ref.dtype)
        return
    # d(vec)[e mod width] = sum over rows i of dS[i, i + e]: one diagonal per step, each a
    # row-wise dot product of q (and dO) with k (and v) shifted by e rows.
    w = rng_ref[2]
    rows = q0 + lax.broadcasted_iota(jnp.int32, (block,), 0)
    lanes = lax.broadcasted_iota(jnp.int32, (width,), 0)
    lp = geom.padded_length
    qf, dof = q.astype(jnp.float32), do.astype(jnp.float32)

    def diagonal(t, g):
        e = t - (w - 1)
        cols = rows + e
        inside = (cols >= 0) & (cols < lp)
        cols = jnp.clip(cols, 0, lp - 1)
        ck = codes_ref[cols]
        s = jnp.sum(qf * k_ref[cols, :].astype(jnp.float32), axis=1) * geom.scale
        s = s + vec_ref[e & (width - 1)]
        if geom.has_shift:
            s = s + jnp.where((cq & 3) != (ck & 3), SHIFT_MASK_VALUE, 0.0)
        same = inside & ((cq >> 2) == (ck >> 2))
        p = jnp.where(same, jnp.exp(s - lse), 0.0)
        dp = jnp.sum(dof * v_ref[cols, :].astype(jnp.float32), axis=1)
        total = jnp.sum(p * (dp - delta))
        return jnp.where(lanes == (e & (width - 1)), g + total, g)

    dvec_ref[...] = lax.fori_loop(0, 2 * w - 1, diagonal, jnp.zeros((width,), jnp.float32))


def _specs(geom: pc.Geometry, block: int, head_dim: int, width: int):
    lp = geom.padded_length
    sq = pl.squeezed
    meta = [
        pl.BlockSpec((sq, sq, 4), lambda b, h, i: (h, i, 0)),
        pl.BlockSpec((sq, lp), lambda b, h, i: (h, 0)),
        pl.BlockSpec((sq, width), lambda b, h, i: (h, 0)),
    ]
    own = pl.BlockSpec((sq, sq, block, head_dim), lambda b, h, i: (b, h, i, 0))
    whole = pl.BlockSpec((sq, sq, lp, head_dim), lambda b, h, i: (b, h, 0, 0))
    row_stats = pl.BlockSpec((sq, sq, lp), lambda b, h, i: (b, h, 0))
    own_stats = pl.BlockSpec((sq, sq, block), lambda b, h, i: (b, h, i))
    return meta, own, whole, row_stats, own_stats


def _compiler_params():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _statics(geom, q):
    block = _block(geom.length)
    width = geom.bias_width
    rng = jnp.asarray(_ranges(geom, block))
    codes = jnp.asarray(geom.codes())
    return block, width, rng, codes


def _forward(geom, interpret, q, k, v, vec):
    b, h, lp, d = q.shape
    block, width, rng, codes = _statics(geom, q)
    meta, own, whole, _, own_stats = _specs(geom, block, d, width)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, geom=geom, block=block, width=width),
        out_shape=(jax.ShapeDtypeStruct(q.shape, v.dtype),
                   jax.ShapeDtypeStruct((b, h, lp), jnp.float32)),
        grid=(b, h, lp // block),
        in_specs=meta + [own, whole, whole],
        out_specs=(own, own_stats),
        compiler_params=_compiler_params(),
        interpret=bool(interpret),
        name="multi_window_attention_fwd",
    )(rng, codes, vec, q, k, v)


def _backward(geom, interpret, q, k, v, vec, o, lse, do):
    b, h, lp, d = q.shape
    block, width, rng, codes = _statics(geom, q)
    meta, own, whole, row_stats, _ = _specs(geom, block, d, width)
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    args = (rng, codes, vec, q, k, v, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, geom=geom, block=block, width=width),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(b, h, lp // block),
        in_specs=meta + [whole, own, own, whole, row_stats, row_stats],
        out_specs=(own, own),
        compiler_params=_compiler_params(),
        interpret=bool(interpret),
        name="multi_window_attention_bwd_dkdv",
    )(*args)
    dvec_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, pl.squeezed, width),
                             lambda b_, h_, i: (b_, h_, i, 0))
    dq, dvec = pl.pallas_call(
        functools.partial(_dq_kernel, geom=geom, block=block, width=width),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, lp // block, width), jnp.float32)),
        grid=(b, h, lp // block),
        in_specs=meta + [own, whole, whole, own, row_stats, row_stats],
        out_specs=(own, dvec_spec),
        compiler_params=_compiler_params(),
        interpret=bool(interpret),
        name="multi_window_attention_bwd_dq",
    )(*args)
    return dq, dk, dv, jnp.sum(dvec, axis=(0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(geom, interpret, q, k, v, vec):
    return _forward(geom, interpret, q, k, v, vec)[0]


def _attention_fwd(geom, interpret, q, k, v, vec):
    o, lse = _forward(geom, interpret, q, k, v, vec)
    return o, (q, k, v, vec, o, lse)


def _attention_bwd(geom, interpret, residuals, do):
    return _backward(geom, interpret, *residuals, do)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention_gpu(q: jax.Array, k: jax.Array, v: jax.Array, bias_tables: jax.Array, heads: Heads,
                  interpret: bool = False) -> jax.Array:
    """Multi-window attention through the Pallas Triton kernel (inputs as ``check_call`` accepts).

    The sequence is padded to a multiple of the block (<= 64) and the head dim to a power of two
    (Triton tiles are powers of two); padding is masked or zero and never changes results.
    """
    window_sizes = heads.window_sizes
    length, head_dim = q.shape[2], q.shape[3]
    block = _block(length)
    geom = pc.Geometry(
        window_sizes=window_sizes, length=length, padded_length=pc.round_up(length, block),
        shift=heads.shift, scale=heads.scale,
        bias_width=max(16, pc.next_power_of_2(2 * max(window_sizes) - 1)))
    padded_dim = max(16, pc.next_power_of_2(head_dim))
    qp, kp, vp = pc.prepare(q, k, v, geom, padded_dim)
    vec = pc.diagonal_bias(bias_tables, window_sizes, geom.bias_width)
    out = _attention(geom, interpret, qp, kp, vp, vec)
    return pc.finish(out, geom, head_dim)
