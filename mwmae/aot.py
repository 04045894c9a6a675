"""Ahead-of-time compiles for devices that are not here: TPU topologies described by libtpu.

With libtpu installed (the ``tpu`` extra) XLA and Mosaic compile for any TPU generation and slice
shape on a CPU-only host; nothing runs. This module knows how to get such devices and how to
summarise a compiled executable; ``mwmae.train.compile_check`` is the CLI.
"""

from __future__ import annotations

import os
from typing import Any


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
