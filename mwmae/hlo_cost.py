"""Matmul FLOPs and memory traffic of a compiled program, read from its optimised HLO text.

XLA's own cost analysis counts a ``while`` body once, however many times it runs, and the
model's layers run under a scan: for the base model it would see one encoder layer of twelve.
This walk multiplies each loop body by the trip count XLA proved for it (``known_trip_count``
in the loop's backend config) and counts:

* **matmul FLOPs**: ``2 x output elements x contracted size`` of every ``dot`` (inside fusions
  too, Triton GEMM fusions included), cuBLAS GEMM call and convolution (plain or cuDNN), so
  that the figure is comparable with the analytic count of :mod:`mwmae.train.perf`. Elementwise
  work is left out, as there. Other custom calls (Pallas kernels) are opaque: their FLOPs are
  not counted, and the summary says how many such calls there were.
* **bytes accessed**: operands plus results of every instruction that reads or writes device
  memory (fusions, custom calls, copies, collectives...), fusion internals excluded, as a
  kernel's traffic is what goes in and out of it. An upper bound on HBM traffic: a cache hit or
  an operand a kernel reads only in part still counts whole.

One program is one device's (SPMD programs are per device). Parsing needs no JAX.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from mwmae.collectives import DTYPE_BYTES

_COMPUTATION = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+) \(.*\) -> .*\{\s*$")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = ")
# The opcode is the first lower-case word followed by "(" after the result type; a tuple type
# starts with "(" but no word precedes it.
_OPCODE = re.compile(r"(?:^|\s)(?P<op>[a-z][a-z0-9\-]*)\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)"
                     r"=%?(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{(?P<names>[^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')
_TARGET = re.compile(r'custom_call_target="(?P<target>[^"]+)"')
_DIM_LABELS = re.compile(r"\bdim_labels=(?P<input>\w+)_(?P<kernel>\w+)->(?P<output>\w+)")
_CONTRACTING = re.compile(r"\blhs_contracting_dims=\{(?P<dims>[\d,]*)\}")
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[(?P<dims>[^\]]*)\]')

# Instructions that move no data of their own: bookkeeping, or control flow whose bodies are
# counted instead.
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
               "conditional", "after-all", "opt-barrier", "partition-id", "replica-id", "iota",
               "add-dependency", "domain"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    op: str
    result: str  # the result type's text
    operands: str  # the operands' types, comma-separated (names resolved in the computation)
    attributes: str  # the rest of the line


def _split_call(text: str, start: int) -> tuple[str, str]:
    """(the text inside the parenthesis opening at ``start``, the text after its match)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], text[i + 1:]
    return text[start + 1:], ""


def _top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces and parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _operand_types(operands: str, types: dict[str, str]) -> str:
    """Each operand's type: written inline (``f32[8,2]{1,0} %x``) or the one its name was given
    in the computation (optimised GPU programs print names only)."""
    out = []
    for operand in _top_level(operands):
        typed, _, name = operand.rpartition("%")
        out.append(typed.strip() if "[" in typed else types.get(name.strip(), ""))
    return ", ".join(out)


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Computations by name (each a list of instructions) and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    types: dict[str, str] = {}  # the current computation's values: name -> result type
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header["name"], [])
            types = {}
            if header["entry"]:
                entry = header["name"]
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        head = _HEAD.match(line)
        if not head:
            continue
        rest = line[head.end():]
        op = _OPCODE.search(rest)
        if not op:
            continue
        operands, attributes = _split_call(rest, op.end() - 1)
        result = rest[:op.start()].strip()
        types[head["name"]] = result
        current.append(Instruction(head["name"], op["op"], result,
                                   _operand_types(operands, types), attributes))
    return computations, entry


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
            for m in _ARRAY.finditer(text) if m["dtype"] in DTYPE_BYTES]


def _bytes(text: str) -> int:
    return sum(math.prod(dims) * DTYPE_BYTES[dtype] for dtype, dims in _arrays(text))


def _conv_flops(ins: Instruction, target: str) -> float:
    """2 x (forward output elements) x (kernel elements per output feature)."""
    labels = _DIM_LABELS.search(ins.attributes)
    operands, result = _arrays(ins.operands), _arrays(ins.result)
    if not labels or len(operands) < 2 or not result:
        return 0.0
    # Which array is the forward output and which the kernel, by the convolution's direction.
    if "BackwardFilter" in target:
        output, kernel = operands[1][1], result[0][1]
    elif "BackwardInput" in target:
        output, kernel = operands[0][1], operands[1][1]
    else:
        output, kernel = result[0][1], operands[1][1]
    o = labels["kernel"].find("o")
    if o < 0 or o >= len(kernel) or not kernel[o]:
        return 0.0
    return 2.0 * math.prod(output) * math.prod(kernel) / kernel[o]


def _dot_flops(ins: Instruction, contracting: str) -> float:
    operands, result = _arrays(ins.operands), _arrays(ins.result)
    if not operands or not result:
        return 0.0
    lhs = operands[0][1]
    dims = [int(d.strip().strip('"')) for d in contracting.split(",") if d.strip()]
    return 2.0 * math.prod(result[0][1]) * math.prod(lhs[d] for d in dims if d < len(lhs))


def matmul_flops(ins: Instruction) -> float:
    """This instruction's own matmul FLOPs (not those of computations it calls)."""
    if ins.op == "dot":
        found = _CONTRACTING.search(ins.attributes)
        return _dot_flops(ins, found["dims"]) if found else 0.0
    if ins.op == "convolution":
        return _conv_flops(ins, "forward")
    if ins.op == "custom-call":
        target = (_TARGET.search(ins.attributes) or {"target": ""})["target"]
        if target.startswith("__cublas"):
            found = _GEMM_CONTRACTING.search(ins.attributes)
            return _dot_flops(ins, found["dims"]) if found else 0.0
        if target.startswith("__cudnn$conv"):
            return _conv_flops(ins, target)
    return 0.0


def _is_counted_custom_call(ins: Instruction) -> bool:
    target = (_TARGET.search(ins.attributes) or {"target": ""})["target"]
    return target.startswith(("__cublas", "__cudnn$conv"))


@dataclasses.dataclass
class _Totals:
    flops: float = 0.0
    bytes: float = 0.0
    opaque_calls: int = 0
    unknown_trips: int = 0


def program_cost(hlo_text: str, trip_counts: bool = True) -> dict[str, Any]:
    """Matmul FLOPs and bytes accessed of one device's program (see the module's docstring).

    ``trip_counts=False`` counts every loop body once, as XLA's cost analysis does (to compare
    the two). A loop whose trip count XLA did not prove counts once and is reported.
    """
    computations, entry = parse(hlo_text)
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text")
    totals = _Totals()

    def walk(name: str, times: float, seen: tuple[str, ...]) -> None:
        if name in seen:  # recursion cannot occur in HLO; guard against a misread anyway
            return
        for ins in computations.get(name, []):
            if ins.op == "while":
                trip = _TRIP.search(ins.attributes)
                if trip is None:
                    totals.unknown_trips += 1
                n = int(trip["n"]) if trip is not None and trip_counts else 1
                for called in _CALLED.findall(ins.attributes):
                    walk(called, times * n, (*seen, name))
                continue
            if ins.op == "conditional":
                # One branch runs: count the costliest.
                branches = _BRANCHES.search(ins.attributes)
                names = ([b.strip().lstrip("%") for b in branches["names"].split(",")]
                         if branches else _CALLED.findall(ins.attributes))
                best = None
                for branch in names:
                    sub = _Totals()
                    _walk_into(branch, times, (*seen, name), sub)
                    if best is None or sub.flops + sub.bytes > best.flops + best.bytes:
                        best = sub
                if best is not None:
                    totals.flops += best.flops
                    totals.bytes += best.bytes
                    totals.opaque_calls += best.opaque_calls
                    totals.unknown_trips += best.unknown_trips
                continue
            if ins.op in ("call", "async-start"):
                for called in _CALLED.findall(ins.attributes):
                    walk(called, times, (*seen, name))
                continue
            if ins.op == "fusion":
                totals.flops += times * sum(_fusion_flops(computations, c)
                                            for c in _CALLED.findall(ins.attributes))
            else:
                totals.flops += times * matmul_flops(ins)
            if ins.op == "custom-call" and not _is_counted_custom_call(ins):
                totals.opaque_calls += 1
            if ins.op not in _NO_TRAFFIC and not ins.op.endswith("-done"):
                totals.bytes += times * (_bytes(ins.operands) + _bytes(ins.result))

    def _walk_into(name: str, times: float, seen: tuple[str, ...], into: _Totals) -> None:
        nonlocal totals
        outer, totals = totals, into
        try:
            walk(name, times, seen)
        finally:
            totals = outer

    walk(entry, 1.0, ())
    return {"matmul_flops": totals.flops, "bytes_accessed": totals.bytes,
            "opaque_custom_calls": totals.opaque_calls,
            "loops_without_trip_count": totals.unknown_trips}



# ---------------------------------------------------------------- the train step, part by part

_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')
# Instructions whose only work is moving data into another layout or size.
_LAYOUT_WORK = ("transpose", "copy", "pad", "slice", "concatenate")


def step_part(ins: Instruction) -> tuple[str, str]:
    """(part, pass) of one instruction of a compiled train step, from the op name JAX recorded
    for it: part is e.g. "encoder attention" or "optimizer update", pass "forward", "backward" or
    "update" (outside the model's differentiation: gradient norm, AdamW)."""
    m = _OP_NAME.search(ins.attributes)
    name = m["name"] if m else ""
    if "transpose(jvp(" in name:
        phase = "backward"
    elif "jvp(" in name:
        phase = "forward"
    else:
        return ("collectives" if ins.op.startswith(("all-", "reduce-scatter", "collective"))
                else "optimizer update"), "update"
    stack = "encoder" if "/encoder/" in name else "decoder" if "/decoder/" in name else ""
    if stack:
        if "/attn/qkv" in name or "/attn/proj" in name:
            what = "qkv and output projections"
        elif "/attn/" in name:
            what = "attention"
        elif "/mlp/" in name:
            what = "MLP"
        elif "/norm" in name:
            what = "layer norms"
        else:
            what = "residuals"
        return f"{stack} {what}", phase
    for key, part in (("loss", "loss"), ("take_along_axis", "masking and gathers"),
                      ("mask", "masking and gathers"), ("gather", "masking and gathers"),
                      ("scatter", "masking and gathers"), ("sort", "masking and gathers"),
                      ("embed", "patch and position embedding"), ("norm", "final norms"),
                      ("decoder_pred", "prediction head")):
        if key in name:
            return part, phase
    return "other model work", phase


def traffic_by_part(hlo_text: str, examples: float) -> dict[str, Any]:
    """Bytes (operands + results, MB per example) and matmul GFLOP per example of each part of a
    compiled train step whose layers are unrolled (no loops: run the model with
    ``scan_unroll`` = depth), split by pass, with what custom calls (library and Pallas kernels)
    and pure layout work (transposes, copies, pads, slices, concatenations) account for.

    XLA's own cost analysis counts a custom call as moving nothing: the ``xla_visible`` figures
    leave custom calls out the same way, to be compared with it."""
    computations, entry = parse(hlo_text)
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text")
    if any(ins.op == "while" for ins in computations[entry]):
        raise ValueError("the program has loops: compile it with its layers unrolled")
    mb = lambda n: round(n / examples / 1e6, 3)
    parts: dict[str, dict[str, float]] = {}
    totals = {"bytes": 0.0, "custom_call_bytes": 0.0, "layout_bytes": 0.0, "gflop": 0.0}
    for ins in computations[entry]:
        if ins.op in _NO_TRAFFIC or ins.op.endswith("-done"):
            continue
        nbytes = _bytes(ins.operands) + _bytes(ins.result)
        if ins.op == "fusion":
            flops = sum(_fusion_flops(computations, c) for c in _CALLED.findall(ins.attributes))
        else:
            flops = matmul_flops(ins)
        part, phase = step_part(ins)
        row = parts.setdefault(part, {"forward": 0.0, "backward": 0.0, "update": 0.0,
                                      "custom_calls": 0.0, "layout": 0.0, "gflop": 0.0})
        row[phase] += nbytes
        row["gflop"] += flops
        totals["bytes"] += nbytes
        totals["gflop"] += flops
        if ins.op == "custom-call":
            row["custom_calls"] += nbytes
            totals["custom_call_bytes"] += nbytes
        elif ins.op in _LAYOUT_WORK or any(w in ins.name for w in _LAYOUT_WORK):
            row["layout"] += nbytes
            totals["layout_bytes"] += nbytes
    table = {
        part: {k: (round(v / examples / 1e9, 3) if k == "gflop" else mb(v)) for k, v in row.items()}
        | {"total": mb(row["forward"] + row["backward"] + row["update"])}
        for part, row in sorted(parts.items(), key=lambda kv: -sum(
            kv[1][p] for p in ("forward", "backward", "update")))}
    return {"mb_per_example": mb(totals["bytes"]),
            "xla_visible_mb_per_example": mb(totals["bytes"] - totals["custom_call_bytes"]),
            "custom_call_mb_per_example": mb(totals["custom_call_bytes"]),
            "layout_mb_per_example": mb(totals["layout_bytes"]),
            "matmul_gflop_per_example": round(totals["gflop"] / examples / 1e9, 3),
            "parts": table}


def _fusion_flops(computations: dict[str, list[Instruction]], name: str,
                  seen: tuple[str, ...] = ()) -> float:
    """A fusion's FLOPs: the dots of its computation and of the fusions nested in it."""
    if name in seen:  # recursion cannot occur in HLO; guard against a misread anyway
        return 0.0
    total = 0.0
    for ins in computations.get(name, []):
        total += matmul_flops(ins)
        if ins.op == "fusion":
            total += sum(_fusion_flops(computations, c, (*seen, name))
                         for c in _CALLED.findall(ins.attributes))
    return total
