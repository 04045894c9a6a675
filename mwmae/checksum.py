"""Content checksums of array trees, equal in JAX (sharded, on device) and numpy (on the host).

A checkpoint records the checksum of every array of the state it was saved from; a restore
recomputes them from what came back. Orbax's own reads catch a file that is cut short or
undecodable, but not a flipped bit inside a chunk that still decompresses: that is what this is
for.

Each array is read as 32-bit words w_i (narrower dtypes widened), and two sums are kept:
sum(w_i * a_i) and sum(w_i * b_i) modulo 2^32, with odd weights a_i, b_i derived from the word's
position. Integer sums do not depend on the order of addition, so the value is the same whatever
mesh holds the array; a single flipped bit changes w_i by 2^k and an odd weight keeps that
non-zero modulo 2^32, so every single-bit error is caught; other damage escapes both sums with
a chance of about 2^-64.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

# Odd multipliers (golden-ratio and Murmur constants) and offsets for the positional weights.
_A = (2654435761, 0x9E3779B9)
_B = (0x85EBCA6B, 0xC2B2AE35)


def _words_np(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        return x.astype(np.uint32)
    if x.dtype.itemsize == 4:
        return x.view(np.uint32)
    if x.dtype.itemsize == 2:
        return x.view(np.uint16).astype(np.uint32)
    if x.dtype.itemsize == 1:
        return x.view(np.uint8).astype(np.uint32)
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _weights_np(n: int, mult: int, offset: int) -> np.ndarray:
    i = np.arange(n, dtype=np.uint32)
    return (i * np.uint32(mult) + np.uint32(offset)) | np.uint32(1)


def array_checksum_np(x: Any) -> str:
    """Checksum of one host array, as 16 hex digits."""
    w = _words_np(np.asarray(x)).reshape(-1)
    with np.errstate(over="ignore"):
        a = np.sum(w * _weights_np(w.size, *_A), dtype=np.uint32)
        b = np.sum(w * _weights_np(w.size, *_B), dtype=np.uint32)
    return f"{int(a):08x}{int(b):08x}"


def _sums_jax(x):
    import jax
    import jax.numpy as jnp

    if x.dtype == jnp.bool_:
        w = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        w = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
        w = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    else:
        raise TypeError(f"no checksum for dtype {x.dtype}")
    # The row-major position of each word, built from per-axis iotas (no reshape of a sharded
    # array).
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
        stride *= w.shape[axis]
    out = []
    for mult, offset in (_A, _B):
        weight = (index * jnp.uint32(mult) + jnp.uint32(offset)) | jnp.uint32(1)
        out.append(jnp.sum(w * weight, dtype=jnp.uint32))
    return jnp.stack(out)


def leaf_name(path: tuple) -> str:
    """'params/encoder/...' for a key path of a tree (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


@functools.cache
def _jitted_sums():
    import jax

    # One function object, so jit's cache serves every save of the same state shapes.
    return jax.jit(lambda xs: [_sums_jax(x) for x in xs])


def tree_checksums(tree: Any) -> dict[str, str]:
    """{leaf name: checksum} of a tree of (possibly sharded, multi-host) jax arrays.

    Computed on the devices that hold the arrays; every process gets the same answer.
    """
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [leaf_name(p) for p, _ in leaves]
    sums = jax.device_get(_jitted_sums()([x for _, x in leaves]))
    return {n: f"{int(s[0]):08x}{int(s[1]):08x}" for n, s in zip(names, sums)}


def differing(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Leaves whose checksum differs from the recorded one, or that are missing."""
    return sorted(k for k, v in recorded.items() if actual.get(k, v) != v)


def json_checksum(obj: Any) -> str:
    """SHA-256 of a JSON value in one canonical spelling (sorted keys, no spaces): what a JSON
    item of a checkpoint was saved as, recomputed from what a restore read back."""
    import hashlib
    import json

    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


META_CHECKSUM = "meta_sha256"
DATA_CHECKSUM = "data_sha256"


def seal_meta(meta: dict, data: Any) -> dict:
    """``meta`` with the checksum of the ``data`` item and then of itself added."""
    meta = {**meta, DATA_CHECKSUM: json_checksum(data)}
    meta[META_CHECKSUM] = json_checksum(meta)
    return meta


def json_problems(meta: dict, data: Any = None) -> list[str]:
    """What fails in a sealed ``meta`` (and ``data``, when given); [] when both verify or the
    checkpoint predates sealing (no checksum recorded)."""
    problems = []
    recorded = meta.get(META_CHECKSUM)
    if recorded is not None:
        rest = {k: v for k, v in meta.items() if k != META_CHECKSUM}
        if json_checksum(rest) != recorded:
            problems.append("its meta item (counters, config, checksums) changed after the "
                            "save")
    if data is not None and meta.get(DATA_CHECKSUM) is not None:
        if json_checksum(data) != meta[DATA_CHECKSUM]:
            problems.append("its data item (every host's input position) changed after the "
                            "save")
    return problems


WEIGHTS_DIGEST_KEY = "params_sha256"


class WeightsChecksumError(ValueError):
    """A weights file that does not verify against its config; the message names the file."""


def verified_weights(path: Any, recorded: Any, config_name: str = "config.json") -> bytes:
    """The bytes of an artifact's weights file ``path``, once they match the SHA-256
    ``recorded`` in its ``config_name``. A file with no digest recorded is refused too: then
    nothing could tell a damaged file from a good one. The JAX and the PyTorch loaders both
    call this (it needs the standard library only), so they accept and refuse the same files.
    FileNotFoundError when the file is missing."""
    import hashlib
    import pathlib

    path = pathlib.Path(path)
    blob = path.read_bytes()
    if not isinstance(recorded, str) or not recorded:
        raise WeightsChecksumError(
            f"{path}: {config_name} records no {WEIGHTS_DIGEST_KEY} for it, so a damaged file "
            "cannot be told from a good one; re-export the model with `python -m mwmae.export`")
    digest = hashlib.sha256(blob).hexdigest()
    if digest != recorded:
        raise WeightsChecksumError(f"{path}: checksum {digest[:12]}... does not match "
                                   f"{recorded[:12]}... in {config_name} (corrupt or partially "
                                   "copied)")
    return blob
