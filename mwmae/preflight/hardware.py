"""The ``devices`` check: what this job runs on, the mesh the config builds on it, and that
every host sees the same."""

from __future__ import annotations

import os
import zlib

import jax
import ml_collections
import numpy as np

from mwmae.preflight.report import FAIL, OK, Section, gib
from mwmae.train import sharding


def device_memory(device: jax.Device) -> int | None:
    """Bytes one device may allocate: the runtime's limit on accelerators; on CPU the host's
    memory shared by its local devices."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics raise various errors
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    return total // max(1, len(jax.local_devices()))


def num_slices(devices: list) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def check_devices(config: ml_collections.ConfigDict) -> Section:
    s = Section("devices")
    devices, local = jax.devices(), jax.local_devices()
    first = local[0]
    memory = device_memory(first)
    s.figures.update(platform=first.platform, device_kind=first.device_kind,
                     count=len(devices), local_count=len(local),
                     processes=jax.process_count(), slices=num_slices(devices),
                     memory_bytes_per_device=memory)
    where = "host memory shared by the CPU devices" if first.platform == "cpu" else "HBM"
    s.line(OK, f"{len(devices)} x {first.device_kind} ({first.platform}) on "
               f"{jax.process_count()} process(es), {s.figures['slices']} slice(s); "
               f"{gib(memory)} per device ({where})")
    same = hosts_agree(len(local), first.device_kind)
    s.figures["hosts_agree"] = same
    if not same:
        s.line(FAIL, "the hosts do not see the same devices (local count or kind differ): "
                     "check every host's TPU/GPU runtime before training")
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
        s.line(FAIL, f"config.mesh cannot be built on these devices: {e}")
        return s
    s.figures["mesh"] = dict(mesh.shape)
    s.line(OK, "mesh " + " x ".join(f"{a} {n}" for a, n in mesh.shape.items()))
    return s


def hosts_agree(local_count: int, kind: str) -> bool:
    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    # int32: without x64, JAX would truncate wider integers on the way.
    mine = np.array([local_count, zlib.crc32(kind.encode()) & 0x7FFFFFFF], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    return bool(np.all(every == every[0]))
