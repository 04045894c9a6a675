"""The vectorised multi-window attention equals a naive per-head, per-window loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mwmae.kernels import multi_window_attention


def naive_attention(q, k, v, window_sizes, tables, shift):
    """One head at a time, one window at a time, written from the original's description."""
    q, k, v, tables = (np.asarray(t, np.float64) for t in (q, k, v, tables))
    b, h, n, d = q.shape
    out = np.zeros_like(q)
    for head in range(h):
        w = window_sizes[head]
        qh, kh, vh = q[:, head], k[:, head], v[:, head]
        if w == 0:
            s = qh @ kh.transpose(0, 2, 1) * d**-0.5
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (p / p.sum(-1, keepdims=True)) @ vh
            continue
        sh = w // 2 if shift else 0
        region = np.zeros(n, int)
        if sh:
            region[n - w:n - sh] = 1
            region[n - sh:] = 2
            qh, kh, vh = (np.roll(t, -sh, axis=1) for t in (qh, kh, vh))
        res = np.zeros_like(qh)
        for start in range(0, n, w):
            sl = slice(start, start + w)
            s = qh[:, sl] @ kh[:, sl].transpose(0, 2, 1) * d**-0.5
            i, j = np.meshgrid(np.arange(w), np.arange(w), indexing="ij")
            s += tables[head, i - j + w - 1]
            r = region[start:start + w]
            s += np.where(r[:, None] != r[None, :], -100.0, 0.0)
            p = np.exp(s - s.max(-1, keepdims=True))
            res[:, sl] = (p / p.sum(-1, keepdims=True)) @ vh[:, sl]
        out[:, head] = np.roll(res, sh, axis=1) if sh else res
    return out


CASES = [
    ((2, 5, 10, 25, 50, 125, 0, 0), 250, False),
    ((2, 5, 10, 25, 50, 125, 0, 0), 250, True),
    ((0, 5, 5, 2, 0, 10), 50, True),
    ((25, 0, 2, 25), 50, False),
    ((3, 3, 0), 12, True),
    ((0, 0), 7, False),
    ((6, 4, 1, 12), 12, True),
]


def _inputs(window_sizes, length, dtype, seed=0, batch=2, d=8):
    rng = np.random.default_rng(seed)
    h = len(window_sizes)
    q, k, v = (rng.normal(size=(batch, h, length, d)).astype(np.float32) for _ in range(3))
    t = 2 * max(max(window_sizes), 1) - 1
    tables = rng.normal(size=(h, t)).astype(np.float32)
    for head, w in enumerate(window_sizes):  # padding beyond 2w-1 must never be read
        tables[head, 2 * w - 1 if w else 0:] = 1e6
    return [jnp.asarray(x, dtype) for x in (q, k, v)], jnp.asarray(tables)


@pytest.mark.parametrize("window_sizes,length,shift", CASES)
def test_values_match_naive_loop_float32(window_sizes, length, shift):
    (q, k, v), tables = _inputs(window_sizes, length, jnp.float32)
    got = multi_window_attention(q, k, v, window_sizes, tables, shift, implementation="xla")
    want = naive_attention(q, k, v, window_sizes, np.where(tables > 1e5, 0, tables), shift)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window_sizes,length,shift", CASES[:4])
def test_values_match_naive_loop_bfloat16(window_sizes, length, shift):
    """bfloat16 inputs, float32 softmax: error bounded by bf16 rounding of inputs/probabilities."""
    (q, k, v), tables = _inputs(window_sizes, length, jnp.bfloat16, seed=1)
    got = multi_window_attention(q, k, v, window_sizes, tables, shift, implementation="xla")
    assert got.dtype == jnp.bfloat16
    want = naive_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                           window_sizes, np.where(tables > 1e5, 0, tables), shift)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2)


def _naive_jax(q, k, v, window_sizes, tables, shift):
    """The naive loop in jnp so it can be differentiated."""
    b, h, n, d = q.shape
    heads = []
    for head in range(h):
        w = window_sizes[head]
        qh, kh, vh = q[:, head], k[:, head], v[:, head]
        if w == 0:
            s = jnp.einsum("bqd,bkd->bqk", qh, kh) * d**-0.5
            heads.append(jax.nn.softmax(s, -1) @ vh)
            continue
        sh = w // 2 if shift else 0
        if sh:
            qh, kh, vh = (jnp.roll(t, -sh, axis=1) for t in (qh, kh, vh))
        region = np.zeros(n, int)
        if sh:
            region[n - w:n - sh] = 1
            region[n - sh:] = 2
        pieces = []
        for start in range(0, n, w):
            sl = slice(start, start + w)
            s = jnp.einsum("bqd,bkd->bqk", qh[:, sl], kh[:, sl]) * d**-0.5
            i, j = np.meshgrid(np.arange(w), np.arange(w), indexing="ij")
            bias = tables[head][i - j + w - 1]
            r = region[start:start + w]
            s = s + bias + np.where(r[:, None] != r[None, :], -100.0, 0.0)
            pieces.append(jax.nn.softmax(s, -1) @ vh[:, sl])
        res = jnp.concatenate(pieces, axis=1)
        heads.append(jnp.roll(res, sh, axis=1) if sh else res)
    return jnp.stack(heads, axis=1)


@pytest.mark.parametrize("window_sizes,length,shift", [
    ((0, 5, 5, 2, 0, 10), 50, True),
    ((25, 0, 2, 25), 50, False),
    ((3, 3, 0), 12, True),
])
def test_gradients_match_naive_loop(window_sizes, length, shift):
    (q, k, v), tables = _inputs(window_sizes, length, jnp.float32, seed=2)
    tables = jnp.where(tables > 1e5, 0.0, tables)
    cot = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v, t: jnp.sum(fn(q, k, v, window_sizes, t, shift) * cot)

    def fast(*a):
        return multi_window_attention(*a, implementation="xla")

    got = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2, 3)))(q, k, v, tables)
    want = jax.jit(jax.grad(loss(_naive_jax), argnums=(0, 1, 2, 3)))(q, k, v, tables)
    for name, g, w in zip("qkvb", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-4,
                                   err_msg=f"gradient of {name}")


def test_window_that_does_not_divide_length_is_rejected():
    (q, k, v), tables = _inputs((3, 0), 10, jnp.float32)
    with pytest.raises(ValueError, match="window size 3 does not divide the sequence length 10"):
        multi_window_attention(q, k, v, (3, 0), tables, implementation="xla")
