"""Sharding stated as data: mesh axes, presets, and one table of logical-axis rules.

Parameters and activations carry logical axis names (``embed``, ``heads``, ``mlp``, ``layers``,
``act_batch``...); :data:`LOGICAL_RULES` maps them onto the mesh axes ``data``, ``fsdp`` and
``tensor``. The presets differ only in the mesh shape:

* ``dp``      data parallel: every device holds the whole model; the batch is split.
* ``fsdp``    ZeRO-3 style: parameters and optimizer state split along ``embed`` over ``fsdp``,
              the batch split over ``data`` x ``fsdp``.
* ``fsdp_tp`` FSDP plus tensor parallelism: attention heads and the MLP hidden dimension split
              over ``tensor`` (Megatron style), the rest as FSDP.

Multi-slice (DCN) meshes: ``config.mesh.dcn_data > 1`` builds a hybrid mesh whose ``data`` axis
spans slices over the data-centre network while ``fsdp``/``tensor`` stay inside a slice (ICI).
A preset then describes one slice (``fsdp`` on 2 slices: data 2 across them, fsdp inside each);
explicit axis sizes stay global (``data`` must be a multiple of ``dcn_data``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),  # the attention kernel's heads under shard_map
    # parameters
    ("embed", "fsdp"),
    ("decoder_embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)

PRESETS: dict[str, dict[str, int]] = {
    "dp": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
    "fsdp_tp": {"data": 1, "fsdp": -1, "tensor": 2},
}


def mesh_shape(mesh_config: ml_collections.ConfigDict | dict, num_devices: int
               ) -> dict[str, int]:
    """Resolve -1 (the rest of the devices) and check the product equals ``num_devices``."""
    cfg = dict(mesh_config)
    preset = cfg.pop("preset", None)
    dcn = int(cfg.pop("dcn_data", 1) or 1)
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown mesh preset {preset!r}; known: {sorted(PRESETS)}")
        cfg = dict(PRESETS[preset])  # a preset replaces the axis sizes
        if dcn > 1 and cfg["data"] != -1:
            # A preset describes one slice; the slices add to the data axis only, so
            # "fsdp" over 2 slices is data 2 (between slices) x fsdp inside each.
            cfg["data"] *= dcn
    unknown = sorted(set(cfg) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {list(MESH_AXES)}")
    shape = {a: int(cfg.get(a, 1)) for a in MESH_AXES}
    free = [a for a, n in shape.items() if n == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {free}")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh {shape}: the fixed axes use {fixed} devices, which does not "
                             f"divide the {num_devices} devices available")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {shape} has {math.prod(shape.values())} devices but "
                         f"{num_devices} are available; change config.mesh so the product of "
                         "its axes equals the device count (or use -1 for one axis)")
    return shape


def make_mesh(mesh_config: ml_collections.ConfigDict | dict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    dcn = int(dict(mesh_config).get("dcn_data", 1) or 1)
    sizes = tuple(shape[a] for a in MESH_AXES)
    if dcn > 1:
        from jax.experimental import mesh_utils

        if shape["data"] % dcn:
            raise ValueError(f"the data axis ({shape['data']}) spans the {dcn} slices "
                             f"(dcn_data={dcn}) and must be a multiple of {dcn}: set "
                             f"config.mesh.data to one, or use a preset (per slice)")
        ici = (shape["data"] // dcn, shape["fsdp"], shape["tensor"])
        arr = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices)
    else:
        arr = _device_mesh(sizes, devices)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def slice_placement(mesh: Mesh) -> dict[str, Any]:
    """Which mesh axes cross slice boundaries: ``{"slice_index": per mesh position,
    "crosses_slices": {axis: bool}}``. Devices without a ``slice_index`` (CPU) are one slice."""
    slices = np.vectorize(lambda d: int(getattr(d, "slice_index", 0) or 0), otypes=[int])(
        mesh.devices)
    crosses = {a: bool(np.any(slices != np.take(slices, [0], axis=i)))
               for i, a in enumerate(mesh.axis_names)}
    return {"slice_index": slices.tolist(), "crosses_slices": crosses}


def _device_mesh(sizes: tuple[int, ...], devices: list[jax.Device]) -> np.ndarray:
    """Devices laid out on the mesh by the physical topology: on TPU the axes listed last (the
    ones that communicate most) get neighbouring chips. A subset of a slice has no torus to
    follow; it is laid out in device order."""
    from jax.experimental import mesh_utils

    try:
        return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError) as e:
        logging.getLogger(__name__).warning("devices laid out in list order (%s)", e)
        return np.asarray(devices).reshape(sizes)


def _fit(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide a dimension (e.g. 3 heads over 2 tensor shards)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in names if dim % mesh.shape[a] == 0 and mesh.shape[a] > 1)
        while kept and dim % math.prod(mesh.shape[a] for a in kept):
            kept = kept[:-1]
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


def logical_shardings(boxed_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """NamedSharding for every leaf of a tree of (boxed) abstract arrays."""
    specs = nn.get_partition_spec(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    values = nn.meta.unbox(boxed_tree)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)), mesh_specs, values,
        is_leaf=lambda s: isinstance(s, PartitionSpec))


def mesh_axes(logical: str, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES
              ) -> tuple[str, ...]:
    """The mesh axes the rules map a logical axis to (``act_batch`` -> ``("data", "fsdp")``)."""
    for name, axes in rules:
        if name == logical:
            return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    raise KeyError(f"no logical-axis rule for {logical!r}")


def batch_shards(mesh: Mesh) -> int:
    """How many ways the mesh splits a batch (the product of its batch axes)."""
    return math.prod(mesh.shape[a] for a in mesh_axes("act_batch"))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """An array of ``ndim`` dimensions split over the batch axes on its first."""
    return NamedSharding(mesh, PartitionSpec(mesh_axes("act_batch"), *([None] * (ndim - 1))))


def describe(shardings: Any) -> dict[str, str]:
    """{param path: partition spec} for printing and golden files."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(jax.tree.map(lambda s: s, shardings,
                                     is_leaf=lambda s: isinstance(s, NamedSharding)))
    return {"/".join(map(str, k)): str(tuple(v.spec)) for k, v in sorted(flat.items())}
