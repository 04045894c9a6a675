"""Which attention each layer of a run takes, and why: measured where it runs, then guarded.

``attention_impl="auto"`` resolves, per layer (the encoder on its tokens, the decoder with its
window list), to the choice a preflight (:mod:`mwmae.preflight`) recorded for this device kind,
layer shape, compute dtype and JAX version, read from the workdir's ``preflight.json`` or the
user's cache; with no such record, to the default rule of :func:`mwmae.kernels.
resolve_implementation`. Then, on an accelerator, a numerics guard runs every chosen kernel
against the float32 XLA reference on the run's own per-device shapes
(:func:`mwmae.kernels.numerics.check`); a kernel outside the tolerance is dropped for XLA with a
warning naming the layer and the error (``model.attention_guard="fallback"``), stops the run
(``"error"``), or is trusted (``"off"``). Every host ends with the same plan: process 0's choices
are broadcast and a guard failure on any host counts on all.

The records are advice, never state: a file that cannot be read, or a record with a field of the
wrong type, or one choosing a kernel the device cannot run, is named (file and problem) in one
warning and ignored, and the next preflight rewrites the cache. A kernel the config names
explicitly that the target devices cannot run is refused in one line, before the run writes
anything (:func:`check_requested`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from mwmae.kernels import IMPLEMENTATIONS, numerics, resolve_implementation
from mwmae.kernels.plan import Layer, PlanKey
from mwmae.model.config import ModelConfig

log = logging.getLogger(__name__)

GUARDS = ("fallback", "error", "off")
CACHE_FILE = "attention_choices.json"


class AttentionGuardError(RuntimeError):
    """The chosen kernel disagrees with the reference and ``attention_guard="error"``."""


def model_layers(mc: ModelConfig, batch: int, encoder_tokens: int,
                 decoder: bool = True) -> list[Layer]:
    """The attention calls of one step as a device runs them (``batch`` per device): the encoder
    over ``encoder_tokens`` (the kept patches in pretraining, all of them when fine-tuning),
    and the decoder over every patch; shifted-window layers as their own calls."""
    stacks = [("encoder", mc.num_heads, mc.embed_dim, mc.window_sizes, encoder_tokens)]
    if decoder:
        stacks.append(("decoder", mc.decoder_num_heads, mc.decoder_embed_dim,
                       mc.decoder_window_sizes, mc.num_patches + mc.num_extra_tokens))
    layers = []
    for name, heads, dim, windows, length in stacks:
        shifts = (False, True) if mc.shifting_windows and any(windows) else (False,)
        for shift in shifts:
            layers.append(Layer(name + (" shifted" if shift else ""), batch, heads, length,
                                dim // heads, tuple(windows), shift, mc.dtype))
    return layers


# ---------------------------------------------------------------- records of measured choices

def cache_dir() -> pathlib.Path:
    """Where measured choices are kept for every run of this user: ``$MWMAE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mwmae``, else ``~/.cache/mwmae``."""
    if os.environ.get("MWMAE_CACHE_DIR"):
        return pathlib.Path(os.environ["MWMAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "mwmae"


def cache_path() -> pathlib.Path:
    return cache_dir() / CACHE_FILE


# The fields of a record's ``layer`` (:class:`mwmae.kernels.plan.Layer`) and their types.
_LAYER_FIELDS = {"name": str, "batch": int, "heads": int, "length": int, "head_dim": int,
                 "window_sizes": list, "shift": bool, "dtype": str}
# What a record may choose: a concrete implementation ("auto" and "pallas" stand for one).
_CHOICES = tuple(i for i in IMPLEMENTATIONS if i not in ("auto", "pallas"))


def _kind_of(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a bool", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not an attention record the trainer can take (every field it reads
    has its type and range checked), or None when it is one."""
    if not isinstance(record, dict):
        return f"{_kind_of(record)}, not an object"
    for key in ("device_kind", "jax", "choice"):
        if not isinstance(record.get(key), str):
            return f"{key} is {_kind_of(record.get(key))}, not a string"
    if record["choice"] not in _CHOICES:
        return f"choice {record['choice']!r} is none of {', '.join(_CHOICES)}"
    if not isinstance(record.get("measured", ""), str):
        return f"measured is {_kind_of(record['measured'])}, not a string"
    layer = record.get("layer")
    if not isinstance(layer, dict):
        return f"layer is {_kind_of(layer)}, not an object"
    if set(layer) != set(_LAYER_FIELDS):
        return (f"layer has the fields {sorted(layer)}, not {sorted(_LAYER_FIELDS)}")
    for key, kind in _LAYER_FIELDS.items():
        value = layer[key]
        if kind is int and not (_is_int(value) and value >= 1):
            return f"layer.{key} is {value!r}, not a whole number >= 1"
        if kind is not int and not isinstance(value, kind):
            return f"layer.{key} is {_kind_of(value)}, not {_kind_of(kind())}"
    if not all(_is_int(w) and w >= 0 for w in layer["window_sizes"]):
        return f"layer.window_sizes is {layer['window_sizes']!r}, not whole numbers >= 0"
    return None


def parse_records(data: bytes, where: str) -> tuple[list[dict], str | None]:
    """(the valid attention records of a preflight report or of the cache file, both of which
    keep them under ``attention.layers``; what was wrong with the rest, or None)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        return [], f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
    except json.JSONDecodeError as e:
        return [], f"not JSON ({e})"
    attention = doc.get("attention") if isinstance(doc, dict) else None
    if not isinstance(attention, dict):
        return [], (f"{_kind_of(doc)}, not an object" if not isinstance(doc, dict) else
                    "no attention object: not a preflight report or attention cache")
    # A report whose attention check did not run has no records: nothing to ignore.
    rows = attention.get("layers", [])
    if not isinstance(rows, list):
        return [], f"attention.layers is {_kind_of(rows)}, not a list"
    good, bad = [], []
    for i, row in enumerate(rows, 1):
        problem = record_problem(row)
        if problem is None:
            good.append(dict(row, source=where))
        else:
            bad.append(f"record {i} of {len(rows)}: {problem}")
    if not bad:
        return good, None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return good, bad[0] + more


def _ignoring(where: Any, problem: str) -> None:
    log.warning("attention: ignoring %s: %s; the next preflight rewrites it", where, problem)


def _read_bytes(path: Any) -> tuple[bytes | None, str | None]:
    """(the file's bytes, or None with why it could not be read; None, None: no such file)."""
    try:
        return path.read_bytes(), None
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except IsADirectoryError:
        return None, "a folder, not a file"
    except OSError as e:
        return None, f"unreadable ({type(e).__name__}: {e})"


def read_records(paths: Iterable[Any]) -> list[dict]:
    """Records from every file of ``paths`` that exists (local or gs:// paths). They are
    advice: a file or record that is not readable is named in one warning and ignored."""
    from etils import epath

    out: list[dict] = []
    for p in paths:
        path = epath.Path(p)
        data, problem = _read_bytes(path)
        if data is not None:
            records, problem = parse_records(data, str(path))
            out += records
        if problem:
            _ignoring(path, problem)
    return out


def record_matches(record: dict, device_kind: str, jax_version: str, layer: Layer) -> bool:
    want = layer.to_dict()
    got = record.get("layer")
    if not isinstance(got, dict):
        return False
    same_shape = all(got.get(k) == want[k] for k in want if k != "name")
    return (same_shape and record.get("device_kind") == device_kind
            and record.get("jax") == jax_version)


def find_record(records: Sequence[dict], device_kind: str, jax_version: str,
                layer: Layer) -> dict | None:
    """The newest record for exactly this device kind, JAX version and layer shape."""
    found = [r for r in records if record_matches(r, device_kind, jax_version, layer)
             and r.get("choice") in IMPLEMENTATIONS]
    return max(found, key=lambda r: str(r.get("measured", ""))) if found else None


def remember(records: Sequence[dict], path: pathlib.Path | None = None) -> pathlib.Path:
    """Merge ``records`` into the user's cache (a newer record of the same key replaces the
    older) and return its path. This is the cache's writer, so it repairs it: what of the old
    file is not a valid record is dropped (said in one warning), and a folder in its place is
    moved aside."""
    path = path or cache_path()
    if path.is_dir():
        aside = path.with_name(f"{path.name}.set-aside-{int(time.time())}")
        path.rename(aside)
        log.warning("attention: %s was a folder, not the cache file; moved it to %s", path,
                    aside)
    data, problem = _read_bytes(path)
    old: list[dict] = []
    if data is not None:
        old, problem = parse_records(data, str(path))
    if problem:
        log.warning("attention: dropping from %s what is not a valid record: %s", path,
                    problem)
    new = [{k: v for k, v in r.items() if k != "source"} for r in records]
    kept = [{k: v for k, v in r.items() if k != "source"} for r in old
            if not any(record_matches(r, n["device_kind"], n["jax"], Layer(**n["layer"]))
                       for n in new)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"attention": {"layers": kept + new}}, indent=1))
    tmp.replace(path)
    return path


def check_requested(implementation: str, target: Any) -> None:
    """Refuse (:class:`mwmae.train.config.ConfigError`, one line) an ``attention_impl`` the
    target devices cannot run, before anything of the run is written; the compile would
    otherwise fail later naming neither the setting nor the device."""
    why = cannot_run(implementation, target)
    if why:
        from mwmae.train.config import ConfigError

        raise ConfigError(f"model.attention_impl={implementation!r}: {why}; use 'auto', "
                          "'xla' or an interpreted kernel such as 'pallas_interpret'")


def cannot_run(implementation: str, target: Any) -> str | None:
    """Why ``target`` (a device, or anything with ``platform`` and ``device_kind``) cannot run
    ``implementation``, or None when it can. The interpreted kernels run anywhere."""
    platform = str(getattr(target, "platform", ""))
    kind = str(getattr(target, "device_kind", "")) or platform
    where = kind if kind == platform else f"{kind} ({platform})"
    gpu = platform in ("gpu", "cuda", "rocm")
    if implementation == "pallas_gpu" and not gpu:
        return f"the Triton GPU kernel does not run on {where}"
    if implementation == "cudnn" and (not gpu or platform == "rocm"):
        return f"cuDNN attention does not run on {where}"
    if implementation == "pallas_tpu" and platform != "tpu":
        return f"the Mosaic TPU kernel does not run on {where}"
    if implementation == "pallas" and not gpu and platform != "tpu":
        return f"no compiled Pallas kernel runs on {where}"
    if implementation in ("pallas", "pallas_tpu") and platform == "tpu":
        try:  # the generations whose Mosaic cannot compile the kernel
            resolve_implementation("pallas", devices=[target])
        except ValueError as e:
            return str(e).split("; use")[0]
    return None


# ---------------------------------------------------------------- the decision

@dataclasses.dataclass(frozen=True)
class Decision:
    """One layer's implementation, why, and the guard's finding (None when it did not run)."""

    layer: Layer
    implementation: str
    reason: str
    guard: numerics.Numerics | None = None

    def describe(self) -> str:
        return f"attention: {self.layer.describe()} -> {self.implementation} ({self.reason})"


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    decisions: tuple[Decision, ...]
    platform: str = "cpu"  # of the devices the step is compiled for

    @property
    def plan(self) -> dict[PlanKey, str]:
        """What ``"auto"`` takes per traced call (:func:`mwmae.kernels.plan.use_plan`)."""
        return {d.layer.key: d.implementation for d in self.decisions}

    def lines(self) -> list[str]:
        return [d.describe() for d in self.decisions]

    def implementation_of(self, name: str) -> str:
        return next(d.implementation for d in self.decisions if d.layer.name == name)


def decide(layers: Sequence[Layer], requested: str, target: Any, run_on: jax.Device | None,
           records: Sequence[dict], guard: str, *, jax_version: str = jax.__version__,
           check: Callable[..., numerics.Numerics] = numerics.check) -> AttentionPlan:
    """The implementation of every layer for ``requested`` (the config's ``attention_impl``)
    on ``target`` (the device kind the step is compiled for), guarded on ``run_on`` (a local
    device of the mesh; None when nothing can run here, as in an AOT compile for a TPU
    topology on a CPU host, so the guard is skipped)."""
    if guard not in GUARDS:
        raise ValueError(f"model.attention_guard={guard!r}: expected one of {GUARDS}")
    if requested != "auto":
        check_requested(requested, target)
    kind = str(getattr(target, "device_kind", ""))
    chosen: list[tuple[str, str]] = []
    unrunnable: dict[str, list[str]] = {}  # by file: the records' layers and why
    for layer in layers:
        rule = resolve_implementation(requested, layer.length, devices=[target],
                                      window_sizes=layer.window_sizes, shift=layer.shift,
                                      dtype=layer.dtype, head_dim=layer.head_dim)
        record = find_record(records, kind, jax_version, layer) if requested == "auto" else None
        why = cannot_run(record["choice"], target) if record is not None else None
        if why:
            # A record naming a kernel this device cannot compile is advice gone wrong (an
            # edited or foreign cache): the default rule decides instead.
            unrunnable.setdefault(str(record.get("source", "?")), []).append(
                f"{layer.name} chooses {record['choice']}: {why}")
            record = None
        if requested != "auto":
            chosen.append((rule, f"attention_impl={requested!r}"))
        elif record is not None:
            chosen.append((record["choice"], f"measured by the preflight of "
                           f"{record.get('measured', '?')}, {record.get('source', '?')}"))
        else:
            chosen.append((rule, f"no preflight record for {kind or target.platform} with "
                           f"JAX {jax_version}: the default rule"))
    for source, found in unrunnable.items():
        log.warning("attention: ignoring records in %s: %s; the default rule decides", source,
                    "; ".join(found))
    chosen = _agree(chosen)
    guarded = guard != "off" and run_on is not None and target.platform != "cpu"
    results: list[numerics.Numerics | str | None] = [
        _guard(check, impl, layer, run_on) if guarded and impl != "xla" else None
        for layer, (impl, _) in zip(layers, chosen)]
    failed = _any_host([r is not None and (isinstance(r, str) or not r.ok) for r in results])
    decisions = []
    for layer, (impl, reason), result, bad in zip(layers, chosen, results, failed):
        if isinstance(result, str) or bad:
            finding = (result if isinstance(result, str) else result.describe()
                       if result is not None else
                       f"{impl} failed the numerics guard on another host")
            result = result if isinstance(result, numerics.Numerics) else None
            if guard == "error":
                raise AttentionGuardError(f"attention guard: {finding}; set "
                                          "model.attention_guard='fallback' to run on XLA")
            log.warning("attention guard: %s; this run uses the XLA attention for %s",
                        finding, layer.name)
            decisions.append(Decision(layer, "xla", f"guard: {finding}", result))
        else:
            note = f"; guard: {result.worst[0]} error {result.worst[1]:.1e}" if result else ""
            decisions.append(Decision(layer, impl, reason + note, result))
    return AttentionPlan(tuple(decisions), str(target.platform))


def _guard(check: Callable[..., numerics.Numerics], impl: str, layer: Layer,
           device: jax.Device) -> numerics.Numerics | str:
    """The guard's finding: the comparison, or why the kernel could not run at all."""
    try:
        return check(impl, layer, device.platform, device=device)
    except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is refuted too
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return f"{impl} on {layer.describe()} failed to run: {type(e).__name__}: {first}"


def _agree(chosen: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Process 0's choices on every host: hosts whose caches differ must still compile one
    program."""
    if jax.process_count() == 1:
        return chosen
    from jax.experimental import multihost_utils

    ids = np.array([IMPLEMENTATIONS.index(impl) for impl, _ in chosen], np.int32)
    ids = np.asarray(multihost_utils.broadcast_one_to_all(ids))
    return [(IMPLEMENTATIONS[int(i)], reason if IMPLEMENTATIONS[int(i)] == impl
             else "process 0's choice") for i, (impl, reason) in zip(ids, chosen)]


def _any_host(flags: list[bool]) -> list[bool]:
    if jax.process_count() == 1 or not flags:
        return flags
    from jax.experimental import multihost_utils

    every = multihost_utils.process_allgather(np.array(flags, np.int32))
    return [bool(x) for x in np.asarray(every).reshape(-1, len(flags)).max(axis=0)]


def measured_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
