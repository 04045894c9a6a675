"""Every host's evaluation rows, on every host, in one order."""

from __future__ import annotations

import jax
import numpy as np


def gather_rows(ids: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ids, *arrays) of all hosts concatenated and sorted by id, identical on every host.

    Hosts may hold different numbers of rows (the last batch of a split is short); sorting by
    clip id makes the result independent of how the clips were spread over hosts, so metrics
    computed from it are the same bits on 1 or N hosts. Ids must be unique across hosts.
    """
    ids = np.asarray(ids, np.int64)
    arrays = tuple(np.asarray(a) for a in arrays)
    for a in arrays:
        if a.shape[0] != ids.shape[0]:
            raise ValueError(f"{a.shape[0]} rows for {ids.shape[0]} ids")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = multihost_utils.process_allgather(np.array([ids.shape[0]], np.int64))
        most = int(np.max(counts))
        pad = lambda a: np.concatenate(  # noqa: E731
            [a, np.zeros((most - a.shape[0], *a.shape[1:]), a.dtype)])
        gathered = [allgather_exact(multihost_utils, pad(a)) for a in (ids, *arrays)]
        keep = np.concatenate([np.arange(int(n)) + h * most
                               for h, n in enumerate(np.ravel(counts))])
        ids, *arrays = (g.reshape(-1, *g.shape[2:])[keep] for g in gathered)
    order = np.argsort(ids, kind="stable")
    if ids.size > 1 and np.any(ids[order][1:] == ids[order][:-1]):
        raise ValueError("clip ids repeat across hosts: each clip must be evaluated once")
    return (ids[order], *(a[order] for a in arrays))


def allgather_exact(multihost_utils, a: np.ndarray) -> np.ndarray:
    """(hosts, *a.shape) of every host's ``a``, bit for bit. JAX without x64 would turn int64
    ids and float64 scores into 32-bit values (colliding ids, rounded scores), so 8-byte
    values travel as pairs of uint32 and are put back together."""
    if a.dtype.itemsize != 8:
        return np.asarray(multihost_utils.process_allgather(a))
    halves = np.ascontiguousarray(a).reshape(*a.shape, 1).view(np.uint32)
    got = np.ascontiguousarray(np.asarray(multihost_utils.process_allgather(halves)),
                               dtype=np.uint32)
    return got.view(a.dtype)[..., 0]
