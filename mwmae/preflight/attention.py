"""The ``attention`` check: every implementation that can run here, on the config's real layer
shapes, first for numerics (against the float32 reference), then for speed; the choice per layer.

On TPU the candidates are XLA and the Mosaic kernel (none on v2/v3), on GPU XLA, cuDNN
(bfloat16/float16) and, on JAX before 0.11, the Triton kernel; each at the per-device batch. On CPU
XLA runs for real and both kernels run in the Pallas interpreter for their numerics only, at
batch 1 (interpreted speed says nothing about a kernel). The choice is the fastest
implementation within tolerance; a kernel must beat XLA by :data:`MARGIN` to be chosen (XLA is
the reference: a tie goes to it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mwmae.kernels import (
    TRITON_MAINTAINED,
    multi_window_attention,
    numerics,
    resolve_implementation,
)
from mwmae.kernels.cudnn import unsupported as cudnn_unsupported
from mwmae.kernels.plan import Layer
from mwmae.preflight.report import FAIL, OK, WARN, Section
from mwmae.train import attention_plan

MARGIN = 0.03
# Largest per-device batch timed on a CPU host (the check must finish in minutes there).
CPU_TIMING_BATCH = 64


def candidates(device: jax.Device, layer: Layer) -> list[tuple[str, str]]:
    """(implementation, how it runs here): "timed", "numerics" (interpreted) or "skipped: why"."""
    platform = device.platform
    if platform == "cpu":
        return [("xla", "timed"), ("pallas_interpret", "numerics"),
                ("pallas_gpu_interpret", "numerics")]
    found = [("xla", "timed")]
    if platform == "tpu":
        if resolve_implementation("auto", layer.length, devices=[device]) == "xla":
            why = ("the sequence is too long for the kernel" if layer.length > 1024
                   else f"{device.device_kind} cannot compile the kernel")
            return [*found, ("pallas_tpu", f"skipped: {why}")]
        return [*found, ("pallas_tpu", "timed")]
    if not TRITON_MAINTAINED:
        found.append(("pallas_gpu", f"skipped: Pallas' Triton lowering is deprecated in JAX "
                                    f"{jax.__version__}"))
    elif layer.length > 1024:
        found.append(("pallas_gpu", "skipped: the sequence is too long for the kernel"))
    else:
        found.append(("pallas_gpu", "timed"))
    why = cudnn_unsupported(layer.window_sizes, layer.head_dim, layer.length)
    if why:
        found.append(("cudnn", f"skipped: {why}"))
    elif layer.dtype not in ("bfloat16", "float16"):
        found.append(("cudnn", f"skipped: cuDNN has no {layer.dtype} attention"))
    else:
        found.append(("cudnn", "timed"))
    return found


def time_forward_backward(implementation: str, layer: Layer, device: jax.Device,
                          repeats: int, budget_s: float) -> float:
    """Median seconds of one forward and backward (gradients of q, k, v and the tables)."""
    q, k, v, tables, cot = jax.device_put(numerics.random_inputs(layer, seed=1), device)
    windows, shift = layer.window_sizes, layer.shift

    def loss(q, k, v, t):
        out = multi_window_attention(q, k, v, windows, t, shift, implementation=implementation)
        return jnp.sum((out * cot).astype(jnp.float32))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    jax.block_until_ready(fn(q, k, v, tables))  # compile and warm up
    times, start = [], time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, v, tables))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_attention(layers: Sequence[Layer], device: jax.Device, *, repeats: int = 10,
                    budget_s: float = 10.0) -> Section:
    """Numerics and speed of every candidate on every layer; ``figures["layers"]`` are the
    records the trainer reads back."""
    s = Section("attention")
    platform = device.platform
    records = []
    for layer in layers:
        timing_layer = layer.with_batch(min(layer.batch, CPU_TIMING_BATCH)
                                        if platform == "cpu" else layer.batch)
        found: dict[str, dict] = {}
        speed: dict[str, float] = {}
        for impl, how in candidates(device, layer):
            if how.startswith("skipped"):
                s.line(OK, f"{layer.describe()}: {impl} {how}")
                found[impl] = {"skipped": how[len("skipped: "):]}
                continue
            probe = layer.with_batch(1 if how == "numerics" else min(layer.batch, 2)) \
                if platform == "cpu" else layer
            try:
                result = numerics.check(impl, probe, platform, device=device)
            except Exception as e:  # noqa: BLE001 - a kernel that cannot run is a finding
                s.line(FAIL, f"{layer.describe()}: {impl} failed to run: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                found[impl] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                continue
            found[impl] = result.to_dict()
            if not result.ok:
                worst, err = result.worst
                s.line(FAIL, f"layer {layer.name}: {impl} {worst} error {err:.2e} is outside "
                             f"the {layer.dtype} tolerance {result.tolerance:.0e} "
                             f"({probe.describe()})")
                continue
            s.line(OK, f"numerics {result.describe()}")
            if how == "timed":
                seconds = time_forward_backward(impl, timing_layer, device, repeats, budget_s)
                speed[impl] = seconds * 1e3
        choice, why = choose(speed)
        if speed:
            ratio = "" if len(speed) < 2 else "; " + ", ".join(
                f"{k} {speed['xla'] / v:.2f}x XLA" for k, v in speed.items() if k != "xla")
            times = ", ".join(f"{k} {v:.2f} ms" for k, v in speed.items())
            s.line(OK if choice else WARN,
                   f"{timing_layer.describe()} forward+backward: {times}{ratio} -> {choice}")
        if choice is None:
            s.line(FAIL, f"layer {layer.name}: no implementation passed its numerics")
            continue
        records.append({"layer": layer.to_dict(), "device_kind": device.device_kind,
                        "platform": platform, "jax": jax.__version__, "choice": choice,
                        "reason": why, "numerics": found, "forward_backward_ms": speed,
                        "timed_batch": timing_layer.batch,
                        "measured": attention_plan.measured_now()})
    s.figures["layers"] = records
    s.figures["choices"] = {r["layer"]["name"]: r["choice"] for r in records}
    return s


def choose(speed_ms: dict[str, float]) -> tuple[str | None, str]:
    """The fastest passing implementation; a kernel needs to beat XLA by MARGIN."""
    if not speed_ms:
        return None, "nothing passed"
    if "xla" not in speed_ms:
        best = min(speed_ms, key=speed_ms.get)
        return best, "the only one within tolerance"
    best = min(speed_ms, key=speed_ms.get)
    if best != "xla" and speed_ms[best] < (1 - MARGIN) * speed_ms["xla"]:
        return best, f"{speed_ms['xla'] / speed_ms[best]:.2f}x faster than XLA"
    if best == "xla":
        return "xla", "fastest" if len(speed_ms) > 1 else "the only one timed here"
    return "xla", f"the kernel is within {MARGIN:.0%} of XLA"
