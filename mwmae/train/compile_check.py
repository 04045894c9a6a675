"""Ahead-of-time check: lower and compile for a target without running anything.

  python -m mwmae.train.compile_check --config configs/mwmae_base_200_4x16.py --num_devices 8
  python -m mwmae.train.compile_check --config ... --topology v5p:2x2x1        (needs libtpu)
  python -m mwmae.train.compile_check --config ... --topology v5e:2x2 --target embed
  python -m mwmae.train.compile_check --config ... --topology v5e:2x2 --num_slices 2
  python -m mwmae.train.compile_check --config ... --gpu h100 --num_gpus 8   (needs the CUDA wheels)

``--target train`` (default) compiles the training step on the config's mesh; ``--target embed``
compiles the encoder's forward as the HEAR module runs it (one device, ``--embed_batch`` chunks).
Prints one JSON line: the attention implementation the target resolves to (decided by the
target's devices, not this host's), lower and compile seconds, per-device memory, and XLA's own
cost estimate (labelled ``estimated_``: a model, not a measurement). ``--num_devices`` fakes that
many CPU devices.

``--gpu h100`` compiles for NVIDIA H100s without a GPU or driver (the CUDA wheels of the ``cuda``
extra; ``JAX_PLATFORMS=cpu`` is set for it): ``--num_gpus`` of them on one host, described by
``mwmae/train/targets/h100_sxm.txtpb`` (``--gpu`` also takes the path of another such
description). The report adds the device memory and whether the plan fits it, what the
optimised program hands to cuBLAS, cuDNN and Triton (custom calls, Triton fusions, the Pallas
kernels by name), and its matmul FLOPs and bytes accessed per device and per example
(:mod:`mwmae.hlo_cost`; loop bodies times their trip counts), beside the analytic FLOPs of
:mod:`mwmae.train.perf`. GEMM tilings are not autotuned without a device: a compile for
structure, memory and kernels, not for timing.

``--num_slices N`` compiles for N copies of ``--topology`` joined over the data-centre network
(multi-slice): the data axis spans the slices (``config.mesh.dcn_data`` is set to N when left at
1; a preset then describes one slice), ``fsdp``/``tensor`` stay inside one. The report says, per
mesh axis, whether it crosses slices, and lists the compiled program's collectives (ICI ones and
the DCN transfers between slices) with the mesh axes their groups span. Hyphenated spellings
(``--num-slices 2``) work too.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from mwmae.train.fake_devices import apply_gpu_flag, apply_num_devices_flag, run_config_tool

if __name__ == "__main__":
    apply_num_devices_flag(sys.argv)
    apply_gpu_flag(sys.argv)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mwmae import aot, collectives, hlo_cost  # noqa: E402
from mwmae.kernels import resolve_implementation  # noqa: E402
from mwmae.train import sharding  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
flags.DEFINE_integer("num_devices", 0, "Fake this many CPU devices (0: the real ones).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU topology, e.g. 'v4:2x2x2' (needs libtpu).")
_TARGET = flags.DEFINE_enum("target", "train", ["train", "embed"],
                            "What to compile: the train step or the HEAR embedding forward.")
_EMBED_BATCH = flags.DEFINE_integer("embed_batch", 32, "Chunks per embedding batch (--target "
                                    "embed; the HEAR module's largest bucket).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over the "
                                   "data-centre network; the data axis spans them.")
_GPU = flags.DEFINE_string("gpu", "", "Compile for NVIDIA GPUs of this kind without one: "
                           f"{', '.join(sorted(aot.GPU_TARGETS))}, or a target description's "
                           "path (needs the CUDA wheels).")
_NUM_GPUS = flags.DEFINE_integer("num_gpus", 1, "GPUs of --gpu on the host.")


def target_devices(topology: str, num_slices: int = 1, gpu: str = "",
                   num_gpus: int = 1) -> list:
    """The devices to compile for: a TPU topology's, ``num_gpus`` GPUs of kind ``gpu``, or
    this host's."""
    if topology and gpu:
        raise SystemExit("--topology and --gpu name two targets: give one")
    if gpu:
        return aot.gpu_devices(gpu, num_gpus)
    return aot.topology_devices(topology, num_slices) if topology else jax.devices()


def gpu_report(compiled: Any, gpu: str, examples: float) -> dict:
    """Memory against the GPU's, what the program hands to libraries and kernels, and its
    matmul FLOPs and bytes accessed per device and per example (``examples``: the step's
    examples over the devices)."""
    text = compiled.as_text()
    cost = hlo_cost.program_cost(text)
    report: dict[str, Any] = {"gpu": gpu, **aot.gpu_kernels(text)}
    memory = aot.gpu_memory_bytes(aot.gpu_target_config(gpu))
    mem = compiled.memory_analysis()
    if memory and mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
        report.update(device_memory_mib=round(memory / 2**20, 2),
                      memory_fraction=round(peak / memory, 4), fits=peak <= memory)
    report.update(hlo_matmul_flops_per_device=cost["matmul_flops"],
                  hlo_bytes_accessed_per_device=cost["bytes_accessed"],
                  hlo_matmul_flops_per_example=cost["matmul_flops"] / examples,
                  hlo_bytes_accessed_per_example=cost["bytes_accessed"] / examples,
                  # Pallas kernels are custom calls: their FLOPs are not in the figure above.
                  opaque_custom_calls=cost["opaque_custom_calls"])
    if cost["loops_without_trip_count"]:
        report["loops_without_trip_count"] = cost["loops_without_trip_count"]
    try:
        traffic = hlo_cost.traffic_by_part(text, examples)
    except ValueError as e:  # scanned layers: the per-part account needs them unrolled
        report["traffic_by_part"] = (f"not counted: {e} (--config.model.scan_unroll=<depth>; "
                                     "benchmarks/step_account.py)")
    else:
        keep = ("mb_per_example", "custom_call_mb_per_example", "layout_mb_per_example")
        report["traffic_by_part"] = {**{k: traffic[k] for k in keep}, "parts": {
            part: row["total"] for part, row in traffic["parts"].items()}}
    return report


def span_slices(config: ml_collections.ConfigDict, num_slices: int, topology: str,
                target: str) -> None:
    """Lay the config's data axis over ``num_slices`` slices, or stop with the reason it cannot."""
    dcn = int(config.mesh.get("dcn_data", 1) or 1)
    if num_slices < 1:
        raise SystemExit(f"--num_slices must be at least 1, got {num_slices}")
    if num_slices == 1:
        if dcn > 1 and topology:
            raise SystemExit(f"config.mesh.dcn_data={dcn} lays the data axis over {dcn} slices: "
                             f"add --num_slices {dcn}")
        return
    if not topology:
        raise SystemExit("--num_slices needs --topology (CPU devices belong to no slice)")
    if target != "train":
        raise SystemExit("--num_slices applies to --target train (the embedding forward runs "
                         "on one device)")
    if dcn not in (1, num_slices):
        raise SystemExit(f"config.mesh.dcn_data={dcn} but --num_slices {num_slices}: the data "
                         "axis spans every slice, so they must agree")
    config.mesh.dcn_data = num_slices


def slice_report(mesh: jax.sharding.Mesh, compiled: Any) -> dict:
    """Which mesh axes cross slices, and the compiled program's collectives."""
    placement = sharding.slice_placement(mesh)
    # The executable's device assignment is the mesh's device order (its shardings' mesh).
    flat = list(mesh.devices.flat)
    slice_of = np.asarray(placement["slice_index"]).reshape(-1).tolist()
    try:
        found = collectives.hlo_collectives(compiled.as_text(), [d.id for d in flat])
    except ValueError as e:  # an HLO spelling the reader does not know: the compile still counts
        return {"mesh_placement": placement, "collectives_error": str(e)}
    return {"mesh_placement": placement,
            "collectives": collectives.summary(found, slice_of, dict(mesh.shape))}


def _timed_compile(lower) -> tuple[object, dict]:
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_seconds": round(t1 - t0, 2), "compile_seconds": round(t2 - t1, 2)}


def compile_report(config, devices, gpu: str = "") -> dict:
    """Compile the train step for ``devices`` (the config's mesh over them) and describe it."""
    from mwmae.train.engine import Engine
    from mwmae.train.pretraining import Pretraining

    t = Engine(Pretraining(config), "/tmp/unused", devices=devices)
    compiled, times = _timed_compile(t.lower)
    mc = t.model_config
    extra = {}
    if gpu:
        # A program is one device's: the step's examples (every microbatch) over the devices,
        # which holds for any mesh (a tensor axis splits each example's work instead).
        from mwmae.train.perf import train_attention_flops_per_example

        extra = {**gpu_report(compiled, gpu, config.batch_size / len(devices)),
                 "analytic_flops_per_example": t.flops_per_example(),
                 "analytic_attention_flops_per_example": train_attention_flops_per_example(mc)}
    return {
        "target": "train", "devices": len(devices), "device_kind": devices[0].device_kind,
        "mesh": dict(t.mesh.shape), "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps, "dtype": mc.dtype,
        "attention_impl": mc.attention_impl,
        "attention": resolve_implementation(mc.attention_impl, mc.num_patches, devices=devices),
        # Per layer, what the step was traced with (a preflight record may steer "auto").
        "attention_plan": {d.layer.name: d.implementation for d in t.attention.decisions},
        **times, "mosaic_kernels": aot.mosaic_kernels(compiled),
        **aot.memory_report(compiled), **aot.cost_estimate(compiled),
        "num_slices": len({int(getattr(d, "slice_index", 0) or 0) for d in devices}),
        **slice_report(t.mesh, compiled), **extra,
    }


def embed_report(config, devices, batch: int, gpu: str = "") -> dict:
    """Compile the encoder forward the HEAR module runs (one device) and describe it."""
    from mwmae.api import Model
    from mwmae.model import param_shapes
    from mwmae.train.config import model_config_from

    mc = model_config_from(config)
    mesh = jax.sharding.Mesh(np.asarray(devices[:1]), ("device",))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                          param_shapes(mc))
    x = jax.ShapeDtypeStruct((batch, *mc.input_shape), np.float32, sharding=one)
    fn = jax.jit(Model(mc, params).features_fn())

    def lower():
        with jax.set_mesh(mesh):  # the kernel is chosen for this device, not the host
            return fn.lower(params, x)

    compiled, times = _timed_compile(lower)
    extra = {}
    if gpu:
        from mwmae.train import perf

        extra = {**gpu_report(compiled, gpu, batch),
                 "analytic_flops_per_example": perf.encoder_flops_per_example(mc),
                 "analytic_attention_flops_per_example":
                     perf.encoder_attention_flops_per_example(mc)}
    return {
        "target": "embed", "devices": 1, "device_kind": devices[0].device_kind,
        "batch_size": batch, "dtype": mc.dtype, "attention_impl": mc.attention_impl,
        "attention": resolve_implementation(mc.attention_impl, mc.num_patches,
                                            devices=devices[:1]),
        **times, "mosaic_kernels": aot.mosaic_kernels(compiled),
        **aot.memory_report(compiled), **aot.cost_estimate(compiled), **extra,
    }


def main(argv: list[str]) -> None:
    del argv
    if _GPU.value and _NUM_SLICES.value > 1:
        raise SystemExit("--num_slices applies to --topology (TPU slices), not --gpu")
    span_slices(_CONFIG.value, _NUM_SLICES.value, _TOPOLOGY.value, _TARGET.value)
    devices = target_devices(_TOPOLOGY.value, _NUM_SLICES.value, _GPU.value, _NUM_GPUS.value)
    if _NUM_SLICES.value > 1:
        data = sharding.mesh_shape(_CONFIG.value.mesh, len(devices))["data"]
        if data % _NUM_SLICES.value:
            raise SystemExit(f"the mesh's data axis ({data}) cannot span {_NUM_SLICES.value} "
                             "slices: set config.mesh.data to a multiple of it, or use a preset "
                             "(a preset describes one slice)")
    if _TARGET.value == "embed":
        report = embed_report(_CONFIG.value, devices, _EMBED_BATCH.value, _GPU.value)
    else:
        report = compile_report(_CONFIG.value, devices, _GPU.value)
    if _TOPOLOGY.value:
        report["topology"] = _TOPOLOGY.value
    print(json.dumps(report))


def run() -> None:
    run_config_tool(main)


if __name__ == "__main__":
    run()
