"""The ``step`` check: the config's train step compiled and run with the measured attention:
compile time, step time, examples/s, MFU and compiled memory against the device's."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from mwmae import aot
from mwmae.preflight.report import FAIL, OK, WARN, Section, gib
from mwmae.train import perf

# Above this share of a device's memory a step fits, but barely: fragmentation and the
# runtime's own buffers may not.
TIGHT = 0.9


def random_batch(spec: Any, seed: int = 0) -> Any:
    """A global batch of the step's spec: normal floats, zero integers (valid label ids)."""
    rng = np.random.default_rng(seed)

    def one(s: jax.ShapeDtypeStruct) -> jax.Array:
        full = (rng.normal(size=s.shape).astype(s.dtype) if np.issubdtype(s.dtype, np.floating)
                else np.zeros(s.shape, s.dtype))
        return jax.make_array_from_callback(s.shape, s.sharding, lambda idx: full[idx])
    return jax.tree.map(one, spec)


def check_step(trainer: Any, memory_bytes: int | None, *, steps: int = 10,
               budget_s: float = 30.0) -> tuple[Section, Any]:
    """Compile and time the step; returns the section and the state after the timed steps
    (the storage check saves it), or None when the step could not run."""
    s = Section("step")
    t, c = trainer, trainer.config
    s.figures["attention"] = {d.layer.name: d.implementation for d in t.attention.decisions}
    t0 = time.perf_counter()
    try:
        compiled = t.compile()
    except Exception as e:  # noqa: BLE001 - a step that does not compile is the finding
        s.line(FAIL, f"the train step does not compile: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:400]}")
        return s, None
    compile_s = time.perf_counter() - t0
    mem = aot.memory_report(compiled)
    peak = mem.get("peak_estimate_mib")
    s.figures.update(compile_seconds=round(compile_s, 2), memory=mem,
                     memory_bytes_per_device=memory_bytes)
    s.line(OK, f"compiled in {compile_s:.1f} s (attention: "
               + ", ".join(f"{k} {v}" for k, v in s.figures["attention"].items()) + ")")
    if peak is not None and memory_bytes:
        share = peak * 2**20 / memory_bytes
        s.figures["memory_share"] = round(share, 3)
        text = (f"compiled peak {gib(peak * 2**20)} of {gib(memory_bytes)} per device "
                f"({share:.0%})")
        if share > 1:
            s.line(FAIL, text + ": the step does not fit; lower batch_size, use "
                   "grad_accum_steps, or shard parameters (mesh.preset=fsdp)")
            return s, None
        s.line(WARN if share > TIGHT else OK,
               text + ("; little headroom" if share > TIGHT else ""))
    state = t.initial_state()
    batch = random_batch(t.batch_spec())
    try:
        for _ in range(2):  # the first run also allocates; the second is warm
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        done, start = 0, time.perf_counter()
        while done < steps and (done < 2 or time.perf_counter() - start < budget_s):
            state, metrics = compiled(state, batch)
            done += 1
        jax.block_until_ready(metrics)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at run time
        s.line(FAIL, f"the train step fails at run time: {type(e).__name__}: "
                     f"{str(e).splitlines()[0][:400]}")
        return s, None
    step_s = (time.perf_counter() - start) / done
    flops = t.flops_per_example() * c.batch_size / jax.device_count()
    peak_flops = perf.device_peak_flops(jax.local_devices()[0], dtype=t.model_config.dtype)
    mfu = flops / step_s / peak_flops
    s.figures.update(step_seconds=step_s, steps_timed=done,
                     examples_per_second=c.batch_size / step_s, mfu=mfu,
                     peak_flops_per_device=peak_flops,
                     loss=float(np.asarray(metrics["loss"])))
    if not np.isfinite(s.figures["loss"]):
        s.line(FAIL, f"the step's loss is {s.figures['loss']} on random inputs")
    s.line(OK, f"{step_s * 1e3:.1f} ms/step over {done} steps, {c.batch_size / step_s:.1f} "
               f"examples/s, MFU {mfu:.1%} (of {peak_flops / 1e12:.1f} TFLOP/s per device)")
    # The whole run at this rate: what a user sizes the job by (input and checkpoints not
    # counted; the input check says whether the host keeps up).
    total, devices = int(t.total_steps), jax.device_count()
    hours = total * step_s / 3600
    s.figures.update(total_steps=total, run_hours=hours, device_hours=hours * devices)
    s.line(OK, f"the config's {total:,} steps at this rate: {hours:.1f} h on these {devices} "
               f"device(s), {hours * devices:.1f} device-hours")
    return s, state
