"""The collectives of a compiled XLA program, read from its optimised HLO text.

Two kinds of communication appear in a compiled TPU program:

* **ICI collectives** (``all-reduce``, ``reduce-scatter``, ``all-gather``, ``all-to-all``,
  ``collective-permute``, or their ``-start`` halves) with ``replica_groups`` /
  ``source_target_pairs`` over the program's partition ids.
* **DCN transfers** between slices: a multi-slice program is compiled once per slice
  (``num_partitions`` = devices per slice) and what crosses slices becomes MegaScale host
  transfers, ``send``/``recv`` pairs whose ``_xla_megascale_transfer_type`` names the collective
  (``ALL_REDUCE``, ``ALL_GATHER``, ``ONE_TO_ONE`` for a shift, ...) and whose
  ``_xla_megascale_target`` names the peers: ``{1,2}x{0:3}`` (slices 1 and 2, counted from 1,
  each local partition 0..3 with its counterpart) or explicit device-id pairs
  ``{{100000->200000},...}``.

Ids are mapped to positions in the executable's device assignment, which for a jitted function
over a ``Mesh`` is ``mesh.devices.flat``: partition ``p`` of slice ``s`` is position
``s * num_partitions + p`` (the compiler indexes its per-device tables by ``SliceId *
num_partitions + partition-id``). Parsing needs no JAX, so it is unit-tested on literal strings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

OPS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_MEGASCALE_OPS = {"ALL_REDUCE": "all-reduce", "REDUCE_SCATTER": "reduce-scatter",
                  "ALL_GATHER": "all-gather", "ALL_TO_ALL": "all-to-all",
                  "COLLECTIVE_PERMUTE": "collective-permute",
                  "ONE_TO_ONE": "collective-permute"}  # what libtpu 0.0.42 writes for a shift
# Bytes per element of each HLO element type (mwmae.hlo_cost sizes arrays with it too).
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<shape>.*?) "
    r"(?P<op>" + "|".join(OPS) + r"|send)(?P<start>-start)?\(")
_IOTA = re.compile(r"^\[(?P<shape>[\d,]+)\]<=\[(?P<dims>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?$")
_MESH = re.compile(r"^mesh\[(?P<axes>[^\]]*)\](?:<=\[(?P<dims>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?)?"
                   r"\s*\{(?P<over>[^}]*)\}$")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One communicating instruction; ``groups`` are positions in the device assignment."""

    name: str
    op: str
    network: str  # "ici": inside one slice's program; "dcn": a MegaScale transfer between slices
    groups: tuple[tuple[int, ...], ...]
    reduction: str | None = None
    bytes: int = 0


def _iota(dims: str, perm: str | None) -> np.ndarray:
    ids = np.arange(math.prod(int(n) for n in dims.split(","))).reshape(
        [int(n) for n in dims.split(",")])
    return ids.transpose([int(n) for n in perm.split(",")]) if perm else ids


def _mesh_groups(m: re.Match) -> list[list[int]]:
    """``mesh['x'=2,'y'=4] {'x'}``: one group per position of the axes not named, over the
    named ones (devices in iota order unless a ``<=[...]`` order follows the mesh)."""
    axes = re.findall(r"'([^']+)'=(\d+)", m["axes"])
    over = re.findall(r"'([^']+)'", m["over"])
    if not axes or re.search(r"[:(]", m["over"]) or set(over) - {a for a, _ in axes}:
        raise ValueError(f"unrecognised replica groups {m.group(0)!r}")
    sizes = [int(n) for _, n in axes]
    ids = (_iota(m["dims"], m["perm"]) if m["dims"] else np.arange(math.prod(sizes)))
    ids = ids.reshape(sizes)
    names = [a for a, _ in axes]
    inner = [names.index(a) for a in over]
    outer = [i for i in range(len(names)) if i not in inner]
    group = math.prod(sizes[i] for i in inner)
    return ids.transpose(outer + inner).reshape(-1, group).tolist()


def parse_replica_groups(text: str, num_partitions: int | None = None) -> list[list[int]]:
    """``{{0,1},{2,3}}``, the iota form ``[2,4]<=[8]`` / ``[4,2]<=[2,4]T(1,0)``, the mesh-axes
    form ``mesh['x'=2,'y'=4] {'x'}``, or ``{}`` (every partition in one group, which needs
    ``num_partitions``)."""
    text = text.strip()
    mesh = _MESH.match(text)
    if mesh:
        return _mesh_groups(mesh)
    iota = _IOTA.match(text)
    if iota:
        shape = [int(n) for n in iota["shape"].split(",")]
        return _iota(iota["dims"], iota["perm"]).reshape(shape).tolist()
    if text in ("{}", "{{}}"):
        if num_partitions is None:
            raise ValueError("empty replica groups mean every partition: num_partitions needed")
        return [list(range(num_partitions))]
    groups = re.findall(r"\{([\d,\s]*)\}", text)
    if not groups or not text.startswith("{"):
        raise ValueError(f"unrecognised replica groups {text!r}")
    return [[int(n) for n in g.split(",") if n.strip()] for g in groups]


def _attribute(line: str, key: str) -> str | None:
    """The value of ``key=`` in an instruction line: a quoted string or a balanced ``{...}``,
    ``[...]<=[...]`` expression."""
    at = line.find(key + "=")
    if at < 0:
        return None
    rest = line[at + len(key) + 1:]
    if rest.startswith('"'):
        return rest[1:rest.index('"', 1)]
    if rest.startswith("["):
        m = re.match(r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?", rest)
        return m.group(0) if m else None
    if rest.startswith("mesh["):
        m = re.match(r"mesh\[[^\]]*\](?:<=\[[\d,]+\](?:T\([\d,]+\))?)?\s*\{[^}]*\}", rest)
        return m.group(0) if m else rest.split(", ")[0]
    if not rest.startswith("{"):
        return rest.split(", ")[0]  # a spelling this parser does not know: reported as such
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            return rest[:i + 1]
    return None


def _array_bytes(shape: str) -> int:
    """Bytes of the first array in an HLO result type (``f32[4,128]{1,0:T(4,128)}`` or a tuple)."""
    m = re.search(r"\b([a-z]+\d*)\[([\d,]*)\]", shape)
    if not m or m[1] not in DTYPE_BYTES:
        return 0
    return DTYPE_BYTES[m[1]] * math.prod(int(n) for n in m[2].split(",") if n)


_REDUCER_OPS = {"add": "SUM", "maximum": "MAX", "minimum": "MIN", "multiply": "PROD",
                "and": "AND", "or": "OR"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+) \(.*\) -> .*\{\s*$")


def _reducers(hlo_text: str) -> dict[str, str]:
    """{computation name: SUM/MAX/...} for the small computations collectives apply."""
    out, current = {}, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head["name"]
            continue
        root = re.match(r"^\s*ROOT\s+%?[\w.\-]+ = \S+ (\w+)\(", line)
        if root and current and root[1] in _REDUCER_OPS:
            out[current] = _REDUCER_OPS[root[1]]
    return out


def num_partitions(hlo_text: str) -> int:
    m = re.search(r"\bnum_partitions=(\d+)", hlo_text.split("\n", 1)[0])
    return int(m[1]) if m else 1


def _megascale_groups(target: str, partitions: int, id_to_position: dict[int, int]
                      ) -> tuple[tuple[int, ...], ...]:
    pairs = re.findall(r"(\d+)->(\d+)", target)
    if pairs:
        return tuple((id_to_position[int(a)], id_to_position[int(b)]) for a, b in pairs)
    m = re.fullmatch(r"\{([\d,]+)\}x\{(\d+):(\d+)\}", target)
    if not m:
        raise ValueError(f"unrecognised MegaScale target {target!r}")
    slices = [int(s) - 1 for s in m[1].split(",")]  # MegaScale counts slices from 1
    return tuple(tuple(s * partitions + p for s in slices)
                 for p in range(int(m[2]), int(m[3]) + 1))


def hlo_collectives(hlo_text: str, device_ids: Sequence[int]) -> list[Collective]:
    """Every collective of a compiled module; ``device_ids`` in device-assignment order (all
    slices' devices, ``mesh.devices.flat``)."""
    partitions = num_partitions(hlo_text)
    if len(device_ids) % partitions:
        raise ValueError(f"{len(device_ids)} devices do not split into programs of "
                         f"{partitions} partitions")
    slices = len(device_ids) // partitions
    id_to_position = {int(d): i for i, d in enumerate(device_ids)}
    reducers = _reducers(hlo_text)
    found, computation = [], ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            computation = head["name"]
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        if m["op"] == "send":
            kind = _attribute(line, "_xla_megascale_transfer_type")
            if kind is None:
                continue  # a host transfer of another kind, not communication between devices
            target = _attribute(line, "_xla_megascale_target") or ""
            found.append(Collective(
                m["name"], _MEGASCALE_OPS.get(kind, kind.lower()), "dcn",
                _megascale_groups(target, partitions, id_to_position),
                _attribute(line, "_xla_megascale_reduce_operation"), _array_bytes(m["shape"])))
            continue
        pairs = _attribute(line, "source_target_pairs")
        text = pairs if pairs is not None else _attribute(line, "replica_groups") or "{}"
        local = parse_replica_groups(text, partitions)
        # A per-slice program runs the same ICI collective in every slice.
        groups = tuple(tuple(s * partitions + p for p in g) for s in range(slices) for g in local)
        to_apply = re.search(r"to_apply=%?([\w.\-]+)", line)
        reduction = reducers.get(to_apply[1]) if to_apply else None
        op = m["op"]
        if op == "all-reduce" and computation.startswith("all-reduce-scatter"):
            op = "reduce-scatter"  # TPU fuses a reduce-scatter as an all-reduce + slice
        found.append(Collective(m["name"], op, "ici", groups, reduction,
                                _array_bytes(m["shape"]) if not m["start"] else 0))
    return found


def axes_of_group(group: Sequence[int], mesh_shape: dict[str, int]) -> list[str]:
    """The mesh axes along which the members of a group (positions in ``mesh.devices.flat``)
    differ."""
    coords = np.array(np.unravel_index(np.asarray(group), tuple(mesh_shape.values()))).T
    return [a for i, a in enumerate(mesh_shape) if len(set(coords[:, i])) > 1]


def summary(collectives: Sequence[Collective], slice_of_position: Sequence[int],
            mesh_shape: dict[str, int]) -> list[dict[str, Any]]:
    """Collectives grouped by (op, network, reduction, groups): count, the mesh axes the groups
    span, whether any group spans devices of more than one slice, and bytes per call."""
    rows: dict[tuple, dict[str, Any]] = {}
    for c in collectives:
        key = (c.op, c.network, c.reduction, c.groups)
        row = rows.get(key)
        if row is None:
            axes = sorted({a for g in c.groups for a in axes_of_group(g, mesh_shape)},
                          key=list(mesh_shape).index)
            row = rows[key] = {
                "op": c.op, "network": c.network, "reduction": c.reduction, "count": 0,
                "axes": axes,
                "crosses_slices": any(len({slice_of_position[p] for p in g}) > 1
                                      for g in c.groups),
                "groups": [list(g) for g in c.groups], "bytes": [], "names": []}
        row["count"] += 1
        row["bytes"].append(c.bytes)
        row["names"].append(c.name)
    for row in rows.values():
        row["bytes"] = sum(row["bytes"])
        row["names"] = row["names"][:3]
    return sorted(rows.values(), key=lambda r: (r["network"], r["op"], -r["count"]))
