"""Multi-window attention under ``jax.shard_map``: each device runs the kernel on its own block.

Batch is split over the data-parallel axes (``batch_axes``, e.g. data and fsdp) and heads over
the tensor axis, so q/k/v/output blocks are (B / dp, H / tp, L, D) and each device holds the bias
tables of its own heads: the attention itself needs no communication at all.

Window sizes are static and per head, so the kernel of a tensor shard must be specialised to the
window list of that shard's heads. When every shard has the same list (e.g. the encoder's all
global heads, or a decoder whose window pattern repeats every H / tp heads) one specialisation
serves all. Otherwise (the paper's decoder [2, 5, 10, 25, 50, 125, 0, 0] split over 2 shards gives
[2, 5, 10, 25] and [50, 125, 0, 0]) the shard picks its specialisation with ``lax.switch`` on
its index along the tensor axis: every branch is compiled, only the shard's own one runs. The
head layout is never permuted, so parameters keep their meaning; the price is that shards with
heavier heads (global ones) take longer, which a model could avoid by ordering its window list so
that every tensor shard gets the same pattern.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mwmae.kernels import multi_window_attention


def shard_window_lists(window_sizes: Sequence[int], num_shards: int
                       ) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """Distinct per-shard window lists and, for every shard, the index of its list."""
    window_sizes = tuple(int(w) for w in window_sizes)
    if len(window_sizes) % num_shards:
        raise ValueError(f"{len(window_sizes)} heads do not split over {num_shards} tensor shards")
    per = len(window_sizes) // num_shards
    distinct: list[tuple[int, ...]] = []
    branch = []
    for i in range(num_shards):
        ws = window_sizes[i * per:(i + 1) * per]
        if ws not in distinct:
            distinct.append(ws)
        branch.append(distinct.index(ws))
    return tuple(distinct), tuple(branch)


# Deliberate repeat: the signature of ``multi_window_attention`` plus the mesh, so the model calls
# one contract whether or not a mesh is in play.
def sharded_multi_window_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    window_sizes: Sequence[int],
    bias_tables: jax.Array,
    shift: bool = False,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str],
    head_axis: str | None,
    scale: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """``multi_window_attention`` with batch split over ``batch_axes`` and heads over ``head_axis``.

    Axes missing from ``mesh`` are ignored (replicated); other mesh axes replicate the work.
    Equals the unsharded call; works under jit and grad.
    """
    window_sizes = tuple(int(w) for w in window_sizes)
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    head_axis = head_axis if head_axis in mesh.axis_names else None
    dp = math.prod(mesh.shape[a] for a in batch_axes)
    tp = mesh.shape[head_axis] if head_axis else 1
    if q.shape[0] % dp:
        raise ValueError(f"batch {q.shape[0]} does not split over {dp} data-parallel shards")
    distinct, branch_of_shard = shard_window_lists(window_sizes, tp)

    batch_spec = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    qkv_spec = P(batch_spec, head_axis, None, None)
    table_spec = P(head_axis, None)

    def branch(ws):
        def run(q, k, v, tables):
            return multi_window_attention(q, k, v, ws, tables, shift, scale=scale,
                                          implementation=implementation)
        return run

    def local(q, k, v, tables):
        if len(distinct) == 1:
            return branch(distinct[0])(q, k, v, tables)
        index = jnp.asarray(branch_of_shard, jnp.int32)[lax.axis_index(head_axis)]
        return lax.switch(index, [branch(ws) for ws in distinct], q, k, v, tables)

    # check_vma=False: interpret-mode pallas_calls carry no varying-manual-axes type.
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (table_spec,),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, bias_tables)
