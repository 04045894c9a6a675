"""Ahead-of-time compiles for devices that are not here: TPU topologies described by libtpu,
NVIDIA GPUs described by a target file.

With libtpu installed (the ``tpu`` extra) XLA and Mosaic compile for any TPU generation and slice
shape on a CPU-only host; with the CUDA wheels (the ``cuda`` extra) XLA's GPU pipeline, Triton
and ptxas compile for a GPU that a text description stands for (``mwmae/train/targets/``). Nothing
runs. This module knows how to get such devices and how to summarise a compiled executable;
``mwmae.train.compile_check`` is the CLI.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
from typing import Any

# GPU descriptions shipped with the package: XLA's GpuTargetConfigProto as text.
GPU_TARGETS = {"h100": "h100_sxm.txtpb"}
_TARGETS_DIR = pathlib.Path(__file__).resolve().parent / "train" / "targets"


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Abstract devices of a TPU slice, e.g. ``"v5p:2x2x1"``, ``"v4:2x2x2"``, ``"v6e:2x2"``; with
    ``num_slices > 1`` that many such slices joined over the data-centre network (each device's
    ``slice_index`` says which)."""
    # Without this libtpu asks a GCE metadata server for the host's TPU, which is not there.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu takes a machine-wide lock for the chips it drives; compiling drives none, so
    # several compiling processes (tests, a table run) may share the host.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                            num_slices=num_slices)
    except Exception as e:  # noqa: BLE001 - which error depends on libtpu's presence and version
        raise SystemExit(f"cannot describe TPU topology {topology!r} here ({e}); AOT compiles "
                         "for TPU need libtpu (scripts/install.sh .venv-tpu test,tpu); use "
                         "--num_devices for a CPU check") from e
    return list(desc.devices)


def gpu_target_config(target: str) -> str:
    """The text description of GPU ``target``: a name in :data:`GPU_TARGETS` or a file's path."""
    path = (_TARGETS_DIR / GPU_TARGETS[target.lower()] if target.lower() in GPU_TARGETS
            else pathlib.Path(target))
    if not path.is_file():
        raise SystemExit(f"unknown GPU target {target!r}: name one of {sorted(GPU_TARGETS)} or "
                         "the path of a target description (a GpuTargetConfigProto as text)")
    return path.read_text()


def gpu_memory_bytes(target_config: str) -> int | None:
    """The device memory a GPU description states (``device_memory_size``), if it does."""
    found = re.search(r"^\s*device_memory_size:\s*(\d+)", target_config, re.MULTILINE)
    return int(found.group(1)) if found else None


def gpu_devices(target: str, num_gpus: int, num_hosts: int = 1) -> list:
    """Compile-only devices of ``num_hosts`` hosts with ``num_gpus`` GPUs each of kind
    ``target`` (see :func:`gpu_target_config`); their platform is ``"gpu"``.

    Needs the CUDA wheels and ``JAX_PLATFORMS=cpu`` set before JAX started its backends
    (``compile_check --gpu`` sets it): otherwise the CUDA plugin, finding no driver, is dropped
    and takes the topology support with it. No driver or GPU is needed.
    """
    if num_gpus < 1 or num_hosts < 1:
        raise SystemExit(f"--num_gpus and the host count must be at least 1, got {num_gpus} "
                         f"and {num_hosts}")
    config = gpu_target_config(target)
    from jax.experimental import topologies

    try:
        # "slices x hosts x GPUs per host"; the platform must be named "cuda" here ("gpu" is
        # refused), the devices it returns say "gpu".
        desc = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology=f"1x{num_hosts}x{num_gpus}")
    except Exception as e:  # noqa: BLE001 - which error depends on the CUDA wheels' presence
        raise SystemExit(f"cannot describe {num_gpus} x {target} here ({e}); AOT compiles for "
                         "GPU need the CUDA wheels (scripts/install.sh .venv-gpu test,cuda) and "
                         "JAX_PLATFORMS=cpu before JAX starts") from e
    return list(desc.devices)


def memory_report(compiled: Any) -> dict[str, float]:
    """Per-device memory XLA plans for the executable, in MiB."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    mib = lambda n: round(n / 2**20, 2)
    return {
        "argument_mib": mib(mem.argument_size_in_bytes),
        "output_mib": mib(mem.output_size_in_bytes),
        "temp_mib": mib(mem.temp_size_in_bytes),
        "alias_mib": mib(mem.alias_size_in_bytes),
        "code_mib": mib(mem.generated_code_size_in_bytes),
        # Donated inputs alias outputs: counted once.
        "peak_estimate_mib": mib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
    }


def cost_estimate(compiled: Any) -> dict[str, float]:
    """XLA's own cost model of the executable (an estimate, blind inside Pallas kernels)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    keys = {"flops": "estimated_flops", "bytes accessed": "estimated_bytes_accessed",
            "optimal_seconds": "estimated_optimal_seconds"}
    # Pallas calls are opaque to it; around them it can even report negative times.
    return {name: float(cost[k]) for k, name in keys.items() if k in cost and cost[k] >= 0}


def mosaic_kernels(compiled: Any) -> int:
    """How many Mosaic (Pallas TPU) kernel calls the optimised program contains."""
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


# Custom-call targets that name a library or kernel generator, by prefix (XLA GPU's spellings).
_LIBRARIES = (("__cublas", "cublas"), ("__cudnn", "cudnn"), ("__gpu$xla.gpu.triton", "triton"),
              ("mosaic_gpu", "mosaic_gpu"), ("tpu_custom_call", "mosaic_tpu"))
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r'"kind":"(__[a-z_]+)"')
# A Pallas Triton call's backend config is an MLIR attribute dict: {..., name = "kernel", ...}.
_TRITON_NAME = re.compile(r'[{,]\s*name = "([A-Za-z0-9_.]+)"')


def gpu_kernels(hlo_text: str) -> dict[str, Any]:
    """What a compiled GPU program hands to libraries and generated kernels, read from its
    optimised HLO: custom calls by target (cuBLAS/cuDNN calls, Pallas Triton and Mosaic GPU
    kernels), fusions XLA emits through Triton or cuDNN by kind (``__triton_gemm``...), and the
    Pallas kernels' own names (their ``name=`` in the source)."""
    calls = collections.Counter(_CUSTOM_CALL.findall(hlo_text))
    libraries: collections.Counter = collections.Counter()
    for target, n in calls.items():
        for prefix, library in _LIBRARIES:
            if target.startswith(prefix):
                libraries[library] += n
    fusions = collections.Counter(
        kind for line in hlo_text.splitlines() if " fusion(" in line
        for kind in _FUSION_KIND.findall(line))
    names = collections.Counter(
        name for line in hlo_text.splitlines()
        if 'custom_call_target="__gpu$xla.gpu.triton"' in line
        for name in _TRITON_NAME.findall(line)[:1])
    return {"custom_calls": dict(sorted(calls.items())),
            "libraries": dict(sorted(libraries.items())),
            "fusion_kinds": dict(sorted(fusions.items())),
            "pallas_kernels": dict(sorted(names.items()))}

