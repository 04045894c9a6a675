"""The one way a training batch becomes global arrays: each host's rows, laid out by the
shardings the caller gives (the data layer names no mesh axis)."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def to_global(local: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
              global_batch_size: int) -> dict[str, jax.Array]:
    """This host's rows of each named array -> global arrays of ``global_batch_size`` rows,
    each laid out by its sharding. Every host supplies its own ``global / hosts`` distinct
    rows; a sharding whose batch axes do not span the hosts evenly is refused."""
    rows = global_batch_size // jax.process_count()
    out = {}
    for name, value in local.items():
        if name not in shardings:
            raise KeyError(f"batch array {name!r} has no sharding (shardings for "
                           f"{sorted(shardings)})")
        if value.shape[0] != rows:
            raise ValueError(f"batch array {name!r}: this host has {value.shape[0]} rows "
                             f"(shape {value.shape}), expected {rows} = {global_batch_size} / "
                             f"{jax.process_count()} hosts")
        sharding = shardings[name]
        check_rows_per_process(sharding, global_batch_size)
        out[name] = jax.make_array_from_process_local_data(
            sharding, value, (global_batch_size, *value.shape[1:]))
    return out


@functools.lru_cache(maxsize=64)
def check_rows_per_process(sharding: NamedSharding, global_batch_size: int) -> None:
    """Refuse a sharding that would need two hosts to supply the same rows (its batch axes do
    not span the hosts) or that splits the batch unevenly. Cached: runs once per layout."""
    hosts = jax.process_count()
    if global_batch_size % hosts:
        raise ValueError(f"global batch {global_batch_size} is not divisible by the {hosts} "
                         "hosts")
    rows_only = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:1]))
    local: set[tuple[int, int]] = set()
    for index in rows_only.addressable_devices_indices_map((global_batch_size,)).values():
        part = index[0]
        local.add((part.start or 0, global_batch_size if part.stop is None else part.stop))
    covered = sum(stop - start for start, stop in local)
    if covered != global_batch_size // hosts:
        raise ValueError(
            f"the batch sharding {sharding.spec} gives process {jax.process_index()} {covered} "
            f"of {global_batch_size} rows, not {global_batch_size // hosts}: the batch axes "
            f"must span all {hosts} processes evenly")
