"""The fused Pallas kernels equal the reference: both run by the interpreters everywhere, and
the compiled kernel of the backend (Mosaic on TPU, Triton on GPU) where there is one."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from mwmae.kernels import IMPLEMENTATIONS, multi_window_attention, resolve_implementation
from mwmae.kernels.pallas_common import diagonal_bias

NATIVE = {"tpu": ["pallas_tpu"], "gpu": ["pallas_gpu"]}.get(jax.default_backend(), [])
KERNELS = ["pallas_interpret", "pallas_gpu_interpret", *NATIVE]
LENGTHS = [12, 15, 50, 250]
PROPERTY = settings(max_examples=8, deadline=None, derandomize=True)


@st.composite
def cases(draw, max_heads=4, max_batch=4):
    length = draw(st.sampled_from(LENGTHS))
    divisors = [w for w in range(1, length + 1) if length % w == 0]
    heads = draw(st.integers(1, max_heads))
    windows = tuple(draw(st.lists(st.sampled_from([0, 0, *divisors]), min_size=heads,
                                  max_size=heads)))
    return dict(length=length, window_sizes=windows, shift=draw(st.booleans()),
                batch=draw(st.integers(1, max_batch)), head_dim=draw(st.sampled_from([8, 16])),
                seed=draw(st.integers(0, 2**16)))


def make_inputs(window_sizes, length, batch, head_dim, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shape = (batch, len(window_sizes), length, head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    width = max(2 * max(window_sizes) - 1, 1) + 2  # extra columns: padding the model may carry
    tables = rng.normal(size=(len(window_sizes), width)).astype(np.float32)
    for h, w in enumerate(window_sizes):  # padding must never be read
        tables[h, max(2 * w - 1, 0):] = 1e6
    return q, k, v, jnp.asarray(tables)


def unpadded(tables, window_sizes):
    keep = np.zeros(tables.shape, bool)
    for h, w in enumerate(window_sizes):
        keep[h, :max(2 * w - 1, 0)] = True
    return jnp.where(jnp.asarray(keep), tables, 0.0)


def attention(impl, window_sizes, shift):
    fn = jax.jit(lambda q, k, v, t: multi_window_attention(
        q, k, v, window_sizes, t, shift, implementation=impl))
    return fn if impl in NATIVE else exact(fn)


def exact(fn):
    """``fn`` with float32 matmuls in full precision. The compiled kernels ask for IEEE f32
    themselves (and run without this, so a TF32 kernel fails); XLA on GPU defaults to TF32
    (10-bit mantissa, ~1e-3 off), and that applies to the reference and the interpreters."""

    def run(*args):
        with jax.default_matmul_precision("highest"):
            return fn(*args)

    return run


def relative_close(got, want, rtol, name):
    """|got - want| <= rtol * max|want|; the floor covers gradients that are exactly zero
    (e.g. window size 1), where float32 rounding of the recomputed softmax leaves ~1e-7 on CPU
    and ~2e-6 on GPU."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-1)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("impl", KERNELS)
@PROPERTY
@given(case=cases())
def test_forward_float32_matches_reference(impl, case):
    ws, shift = case["window_sizes"], case["shift"]
    q, k, v, tables = make_inputs(ws, case["length"], case["batch"], case["head_dim"],
                                  case["seed"])
    got = attention(impl, ws, shift)(q, k, v, tables)
    want = attention("xla", ws, shift)(q, k, v, tables)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", KERNELS)
@settings(max_examples=4, deadline=None, derandomize=True)
@given(case=cases(max_batch=2))
def test_forward_bfloat16_matches_reference(impl, case):
    ws, shift = case["window_sizes"], case["shift"]
    q, k, v, tables = make_inputs(ws, case["length"], case["batch"], case["head_dim"],
                                  case["seed"], jnp.bfloat16)
    got = attention(impl, ws, shift)(q, k, v, tables)
    want = attention("xla", ws, shift)(q, k, v, tables)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2, rtol=2e-2)


def gradients(impl, window_sizes, shift, q, k, v, params, cotangent):
    """Gradients w.r.t. q, k, v and a parameter the (traced) bias tables are computed from."""

    def loss(q, k, v, params):
        tables = 0.5 * params  # traced tables, as in the model where they are parameters
        out = multi_window_attention(q, k, v, window_sizes, tables, shift, implementation=impl)
        return jnp.sum(out * cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    return grad(q, k, v, params) if impl in NATIVE else exact(grad)(q, k, v, params)


# The Triton kernel's interpreted gradient takes a minute: CI's slow group.
@pytest.mark.parametrize("impl", [pytest.param(k, marks=pytest.mark.slow)
                                  if k == "pallas_gpu_interpret" else k for k in KERNELS])
@settings(max_examples=6, deadline=None, derandomize=True)
@given(case=cases(max_heads=3, max_batch=2))
def test_gradients_float32_match_reference(impl, case):
    ws, shift = case["window_sizes"], case["shift"]
    q, k, v, tables = make_inputs(ws, case["length"], case["batch"], case["head_dim"],
                                  case["seed"])
    params = unpadded(tables, ws)
    cot = jnp.asarray(np.random.default_rng(case["seed"] + 1).normal(size=q.shape), jnp.float32)
    got = gradients(impl, ws, shift, q, k, v, params, cot)
    want = gradients("xla", ws, shift, q, k, v, params, cot)
    for name, g, w in zip(("dq", "dk", "dv", "dtables"), got, want):
        relative_close(g, w, 1e-4, name)


@pytest.mark.parametrize("impl", KERNELS)
def test_padding_of_bias_tables_is_never_read_and_gets_zero_gradient(impl):
    ws, shift = (2, 5, 0, 10), True
    q, k, v, tables = make_inputs(ws, 50, 2, 8, seed=7)
    clean = unpadded(tables, ws)
    fn = attention(impl, ws, shift)
    np.testing.assert_array_equal(np.asarray(fn(q, k, v, tables)), np.asarray(fn(q, k, v, clean)))
    grad = jax.grad(lambda t: jnp.sum(fn(q, k, v, t) ** 2))(tables)
    pad = np.asarray(unpadded(jnp.ones_like(tables), ws)) == 0
    assert np.all(np.asarray(grad)[pad] == 0.0)
    assert np.any(np.asarray(grad)[~pad] != 0.0)


def test_paper_decoder_layer_both_kernels():
    """The paper's decoder windows at full length, shifted, with the real head dim 48."""
    ws = (2, 5, 10, 25, 50, 125, 0, 0)
    q, k, v, tables = make_inputs(ws, 250, 2, 48, seed=11)
    want = attention("xla", ws, True)(q, k, v, tables)
    for impl in KERNELS:
        got = attention(impl, ws, True)(q, k, v, tables)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


# The TPU interpreter also simulates VMEM and the grid's block pipeline: a couple of small cases.
TPU_INTERPRETER_CASES = [
    pytest.param((3, 4, 6, 0), 12, True, id="L12-shifted"),
    pytest.param((5, 25, 0, 2), 50, False, id="L50", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("ws,length,shift", TPU_INTERPRETER_CASES)
def test_tpu_interpreter_forward_and_gradients(ws, length, shift):
    q, k, v, tables = make_inputs(ws, length, 1, 8, seed=3)
    params = unpadded(tables, ws)
    cot = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
    try:
        got = multi_window_attention(q, k, v, ws, params, shift,
                                     implementation="pallas_tpu_interpret")
        want = multi_window_attention(q, k, v, ws, params, shift, implementation="xla")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
        grads = gradients("pallas_tpu_interpret", ws, shift, q, k, v, params, cot)
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    for name, g, w in zip(("dq", "dk", "dv", "dtables"), grads,
                          gradients("xla", ws, shift, q, k, v, params, cot)):
        relative_close(g, w, 1e-4, name)


def test_additive_matrix_is_the_reference_bias_and_mask():
    """Head by head, the dense term equals the reference's bias, -100 and window mask, moved
    from the rolled frame the reference computes shifted windows in back to the original one."""
    from mwmae.kernels import pallas_common as pc
    from mwmae.kernels.pallas_tpu import LANES, additive_matrix
    from mwmae.kernels.reference import relative_bias, shift_mask

    ws, length = (2, 5, 0, 10), 20
    tables = jnp.asarray(np.random.default_rng(0).normal(size=(4, 19)), jnp.float32)
    geom = pc.Geometry(window_sizes=ws, length=length, padded_length=LANES, shift=True,
                       scale=1.0, bias_width=19)
    add = np.asarray(additive_matrix(tables, geom))
    assert add.shape == (4, LANES, LANES)
    for h, w in enumerate(ws):
        if w == 0:
            assert np.all(add[h, :length, :length] == 0.0)
        else:
            rolled = np.full((length, length), pc.MASKED, np.float32)
            want = np.asarray(relative_bias(tables[h, :2 * w - 1], w)) + shift_mask(length, w)
            for n in range(length // w):
                rolled[n * w:(n + 1) * w, n * w:(n + 1) * w] = want[n]
            back = (np.arange(length) - w // 2) % length  # original position -> rolled one
            np.testing.assert_allclose(add[h, :length, :length], rolled[np.ix_(back, back)],
                                       rtol=0, atol=1e-6)
        assert np.all(add[h, :length, length:] == pc.MASKED)  # padded keys


def test_additive_matrix_is_shared_by_global_heads():
    from mwmae.kernels import pallas_common as pc
    from mwmae.kernels.pallas_tpu import additive_matrix

    geom = pc.Geometry(window_sizes=(0,) * 12, length=50, padded_length=128, shift=False,
                       scale=1.0, bias_width=1)
    add = np.asarray(additive_matrix(jnp.zeros((12, 1)), geom))
    assert add.shape == (1, 128, 128)
    assert np.all(add[0, :50, :50] == 0.0) and np.all(add[0, :50, 50:] == pc.MASKED)


def test_diagonal_bias_layout():
    tables = jnp.asarray([[1.0, 2.0, 3.0, 9.0], [5.0, 6.0, 7.0, 8.0]])
    vec = np.asarray(diagonal_bias(tables, (2, 0), 8))
    # offset d = key - query; bias = table[w - 1 - d]
    assert vec[0, 0] == 2.0 and vec[0, 1] == 1.0 and vec[0, 7] == 3.0
    assert np.count_nonzero(vec) == 3


def test_dispatch_on_cpu():
    assert set(KERNELS) <= set(IMPLEMENTATIONS)
    if jax.default_backend() == "cpu":
        assert resolve_implementation("auto") == "xla"
        with pytest.raises(ValueError, match="no compiled Pallas attention kernel"):
            resolve_implementation("pallas")
    with pytest.raises(ValueError, match="unknown attention implementation"):
        resolve_implementation("flash")


class FakeDevice:
    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


@pytest.mark.parametrize("kind,want", [("TPU v4", "pallas_tpu"), ("TPU v5 lite", "pallas_tpu"),
                                       ("TPU v5p", "pallas_tpu"), ("TPU v6 lite", "pallas_tpu"),
                                       ("TPU v3", "xla"), ("TPU v2", "xla")])
def test_auto_resolves_by_target_device_not_host_backend(kind, want):
    """What a TPU host would pick, decided on this (CPU) host from the target's devices."""
    assert resolve_implementation("auto", 250, devices=[FakeDevice("tpu", kind)]) == want
    assert resolve_implementation("auto", 2048, devices=[FakeDevice("tpu", kind)]) == "xla"
    if want == "xla":
        with pytest.raises(ValueError, match=f"does not compile for {kind}"):
            resolve_implementation("pallas", devices=[FakeDevice("tpu", kind)])
    else:
        assert resolve_implementation("pallas", devices=[FakeDevice("tpu", kind)]) == want
    assert resolve_implementation("auto", devices=[FakeDevice("gpu", "H200")]) == "pallas_gpu"
    assert resolve_implementation("xla", devices=[FakeDevice("tpu", kind)]) == "xla"


def test_auto_fallback_is_logged_once(caplog):
    import mwmae.kernels

    mwmae.kernels._warned.discard("attention: TPU v3 cannot compile the Pallas kernel; using "
                                  "the XLA attention")
    with caplog.at_level("WARNING"):
        for _ in range(3):
            resolve_implementation("auto", devices=[FakeDevice("tpu", "TPU v3")])
    assert sum("TPU v3 cannot compile" in r.message for r in caplog.records) == 1


def test_target_device_follows_the_mesh_in_scope():
    from mwmae.kernels import target_device

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    with jax.set_mesh(mesh):
        seen = []
        jax.jit(lambda x: seen.append(target_device()) or x)(jnp.ones(2))
    assert seen[0].platform == jax.devices()[0].platform
    assert seen[0].device_kind == jax.devices()[0].device_kind


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_rejects_window_that_does_not_divide_length(impl):
    q, k, v, tables = make_inputs((4, 0), 12, 1, 8, seed=0)
    with pytest.raises(ValueError, match="window size 4 does not divide the sequence length 10"):
        multi_window_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], (4, 0), tables,
                               implementation=impl)


def test_benchmark_prints_json(capsys):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--cases", "encoder_visible_b64", "--batch-divisor", "64", "--repeats", "1",
                "--implementations", "xla", "pallas_interpret"])
    doc = json.loads(capsys.readouterr().out)
    rows = {(r["implementation"], r["pass"]): r for r in doc["results"]}
    assert set(rows) == {(i, p) for i in ("xla", "pallas_interpret")
                         for p in ("forward", "forward_backward")}
    assert rows[("xla", "forward")]["speedup_vs_xla"] == 1.0
    assert all(r["ms"] > 0 and r["tflop_per_s"] > 0 and r["gb_per_s"] > 0 for r in rows.values())
