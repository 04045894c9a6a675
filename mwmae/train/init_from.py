"""Laying the ``init_from`` weights (read and checked by :mod:`mwmae.pretrained`) over the
run's freshly initialised, sharded parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def place(fresh: Mapping[str, Any], shardings: Mapping[str, Any], taken: Mapping[str, Any]
          ) -> dict[str, Any]:
    """``fresh`` (global arrays) with its top-level entries replaced by ``taken``'s (numpy, the
    same on every host), cast to fresh's dtypes and laid out with ``shardings``."""
    import jax

    def put(t, f, s):
        t = np.asarray(t, dtype=f.dtype)
        return jax.make_array_from_callback(f.shape, s, lambda index: t[index])

    out = dict(fresh)
    for k, v in taken.items():
        out[k] = jax.tree.map(put, v, fresh[k], shardings[k])
    return out

