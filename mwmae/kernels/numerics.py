"""Is an implementation right on this device? Its forward and gradients against the reference.

One check serves the preflight and the trainer's start-up guard: random q, k, v and bias tables
of a layer's real shape and compute dtype go through the implementation under test, forward and
backward (the gradients of q, k, v and the bias tables for a random cotangent), and through the
XLA reference computed in float32 at the highest matmul precision. Each result's error is its
largest deviation over the reference's largest magnitude (a normalised max error), and must stay
within the tolerance of the compute dtype:

  * float32: 1e-4 where float32 matmuls are exact (CPU); 2e-2 on TPU and GPU, whose default
    matmul precision rounds float32 operands to bfloat16 (TPU) or TF32 (GPU);
  * bfloat16: 2e-2 (8 bits of mantissa on every operand: the reference's own bfloat16 run, and
    each kernel's, stays near 5e-3 on the model's shapes; a kernel four times worse is wrong).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mwmae.kernels.plan import Layer
from mwmae.kernels.reference import Heads, attention_xla

PASSES = ("forward", "dq", "dk", "dv", "dtables")


def tolerance(dtype: str, platform: str) -> float:
    """The largest normalised error an implementation may show (see the module docstring)."""
    if dtype == "bfloat16":
        return 2e-2
    return 1e-4 if platform == "cpu" else 2e-2


@dataclasses.dataclass(frozen=True)
class Numerics:
    """One implementation on one layer: each pass's normalised error, and the verdict."""

    implementation: str
    layer: Layer
    errors: dict[str, float]
    tolerance: float

    @property
    def worst(self) -> tuple[str, float]:
        """(pass, error) of the largest error; a non-finite error counts as the worst."""
        return max(self.errors.items(), key=lambda kv: np.inf if not np.isfinite(kv[1])
                   else kv[1])

    @property
    def ok(self) -> bool:
        return all(np.isfinite(e) and e <= self.tolerance for e in self.errors.values())

    def describe(self) -> str:
        name, err = self.worst
        verdict = "within" if self.ok else "OUTSIDE"
        return (f"{self.implementation} on {self.layer.describe()}: worst {name} error {err:.2e} "
                f"{verdict} the {self.layer.dtype} tolerance {self.tolerance:.0e}")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tolerance": self.tolerance,
                "errors": {k: float(v) for k, v in self.errors.items()},
                "worst": list(self.worst)}


def random_inputs(layer: Layer, seed: int = 0) -> tuple[jax.Array, ...]:
    """q, k, v and a cotangent in the layer's dtype; bias tables float32 (heads, 2 max(w) - 1)."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(layer.dtype)
    q, k, v, cot = (jnp.asarray(rng.normal(size=layer.shape), dtype) for _ in range(4))
    width = max(1, 2 * max(layer.window_sizes) - 1)
    # Tables of order one: a bias comparable to the scores, so an error in it shows.
    tables = jnp.asarray(rng.normal(size=(layer.heads, width)), jnp.float32)
    return q, k, v, tables, cot


def _normalised_error(got: jax.Array, want: jax.Array) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = float(np.max(np.abs(got - want))) if want.size else 0.0
    return diff / scale if scale > 0 else diff


def check(implementation: str, layer: Layer, platform: str, seed: int = 0,
          device: jax.Device | None = None) -> Numerics:
    """Run ``implementation`` forward and backward on ``layer`` (on ``device``, default the
    first local one) against the float32 reference."""
    from mwmae.kernels import multi_window_attention

    device = device or jax.local_devices()[0]
    q, k, v, tables, cot = jax.device_put(random_inputs(layer, seed), device)
    windows, shift = layer.window_sizes, layer.shift

    def run(q, k, v, t):
        return multi_window_attention(q, k, v, windows, t, shift, implementation=implementation)

    def forward_and_grads(q, k, v, t, cot):
        out, vjp = jax.vjp(run, q, k, v, t)
        return (out, *vjp(cot))

    got = jax.jit(forward_and_grads)(q, k, v, tables, cot)
    heads = Heads(windows, shift, layer.head_dim ** -0.5)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731

    def reference(q, k, v, t, cot):
        out, vjp = jax.vjp(lambda *a: attention_xla(*a, heads), q, k, v, t)
        return (out, *vjp(cot))

    with jax.default_matmul_precision("highest"):
        want = jax.jit(reference)(f32(q), f32(k), f32(v), tables, f32(cot))
    errors = {name: _normalised_error(g, w) for name, g, w in zip(PASSES, got, want)}
    return Numerics(implementation, layer, errors, tolerance(layer.dtype, platform))
