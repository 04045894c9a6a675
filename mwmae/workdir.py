"""The training workdir: the one module that knows its layout (local or gs://).

    WORKDIR/
      config.json            the run's whole training config (its ``model`` entry: the architecture)
      writer.lease           who is writing this workdir now (see :mod:`mwmae.lease`)
      checkpoints/<step>/    Orbax checkpoints, items ``state``, ``data``, ``meta``
      checkpoints/<step>.damaged   a checkpoint that failed verification, set aside
      tensorboard/           metrics and images
      trace/host<i>.jsonl    per-step loss and clip ids, when ``trace_batches``
      evaluations.jsonl      a tagger's evaluations on its held-out split, one line per step
      goodput.jsonl          where each process's wall time went, one line per log point
                             (appended by process 0; see :mod:`mwmae.goodput`)
      preflight.json         the newest preflight report on this run's hosts (mwmae.preflight):
                             its measured attention choices steer attention_impl="auto"
      preflight-scratch/     what a running preflight writes to time storage (removed after)

A checkpoint's three items: ``state`` (the TrainState as sharded arrays; every host writes its
own shards), ``data`` (every host's input-pipeline position) and ``meta`` (counters, the config,
and a content checksum of every array of ``state``; see :mod:`mwmae.checksum`).

The trainer, :func:`mwmae.load`, export and ``python -m mwmae.checkpoint inspect`` all read and
write workdirs through :class:`Workdir`; steps, completeness and metadata come from Orbax's own
utilities, never from its file names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from etils import epath

from mwmae import checksum, goodput
from mwmae.data import storage

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LEASE_FILE = "writer.lease"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
TRACE = "trace"
EVALUATIONS = "evaluations.jsonl"
GOODPUT = "goodput.jsonl"
PREFLIGHT = "preflight.json"
PREFLIGHT_SCRATCH = "preflight-scratch"
DAMAGED_SUFFIX = ".damaged"
ITEMS = ("state", "data", "meta")
# Every name a workdir uses for itself: nothing else may write there.
LAYOUT = frozenset({CONFIG_FILE, LEASE_FILE, LEASE_FILE + ".lock", CHECKPOINTS, TENSORBOARD,
                    TRACE, EVALUATIONS, GOODPUT, PREFLIGHT, PREFLIGHT_SCRATCH})


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message names the path and what to do."""


class ConfigMismatch(WorkdirError):
    """The new config changes what the workdir's checkpoints are (architecture, optimizer...)."""


class DamagedCheckpoint(WorkdirError):
    """A checkpoint whose files are missing, unreadable or fail their checksum."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _may_change(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                       may_change: Iterable[str]) -> list[str]:
    """'key: old -> new' for every key in both configs whose value differs and that is not
    allowed to change. Keys the old config lacks (written by an older version) are not
    compared."""
    a, b = _flatten(old), _flatten(new)
    may_change = tuple(may_change)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys())
            if a[k] != b[k] and not _may_change(k, may_change)]


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One entry of ``checkpoints/`` as :meth:`Workdir.inspect` reports it."""

    name: str
    status: str          # "complete", "incomplete" (crash mid-write) or "damaged" (set aside)
    bytes: int
    meta: dict[str, Any] | None = None

    @property
    def step(self) -> int | None:
        return int(self.name) if self.name.isdigit() else None


class Workdir:
    """A training workdir, local or gs://."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(storage.absolute(path))

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ layout

    @property
    def config_path(self) -> epath.Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints(self) -> epath.Path:
        return self.path / CHECKPOINTS

    @property
    def tensorboard(self) -> epath.Path:
        return self.path / TENSORBOARD

    @property
    def lease_path(self) -> str:
        return str(self.path / LEASE_FILE)

    def trace_file(self, host: int) -> epath.Path:
        return self.path / TRACE / f"host{host}.jsonl"

    @property
    def preflight_path(self) -> epath.Path:
        return self.path / PREFLIGHT

    @property
    def preflight_scratch(self) -> epath.Path:
        return self.path / PREFLIGHT_SCRATCH

    @property
    def evaluations_path(self) -> epath.Path:
        return self.path / EVALUATIONS

    def read_evaluations(self) -> list[dict[str, Any]]:
        """A tagger's evaluations, one dict per evaluated step (``step`` and its metrics),
        ascending; a step evaluated again after a resume counts once, as last written."""
        try:
            text = self.evaluations_path.read_text()
        except FileNotFoundError:
            return []
        rows: dict[int, dict[str, Any]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[int(row["step"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise WorkdirError(f"{self.evaluations_path}: line {number} is not an "
                                   f"evaluation ({e})") from e
        return [rows[s] for s in sorted(rows)]

    def append_evaluation(self, row: dict[str, Any]) -> None:
        """Add one evaluation (call from one process). Rewritten whole: gs:// has no append."""
        lines = [json.dumps(r) for r in self.read_evaluations() if r["step"] != row["step"]]
        storage.write_text(str(self.evaluations_path), "\n".join([*lines, json.dumps(row)])
                           + "\n")

    @property
    def goodput_path(self) -> epath.Path:
        return self.path / GOODPUT

    def read_goodput(self) -> tuple[list[dict[str, Any]], int]:
        """(the goodput ledger's valid lines as rows, how many lines were skipped). Read with
        :func:`mwmae.goodput.read`: a line cut short by a kill, not UTF-8 or not a ledger
        line is skipped with one warning naming the file, never an error: the ledger is a
        record, not state."""
        lines, skipped = goodput.read(self.goodput_path)
        return [x.to_json() for x in lines], skipped

    def append_goodput(self, row: dict[str, Any]) -> None:
        """Add one ledger line (call from one process). Locally one ``write`` of the whole
        line in append mode, after a newline if the file ends inside a torn line; gs:// has no
        append, so there the file is rewritten whole."""
        line = (json.dumps(row, separators=(",", ":")) + "\n").encode()
        path = str(self.goodput_path)
        if storage.is_remote(path):
            # The old ledger is carried over as bytes: a damaged line in it (not UTF-8, torn)
            # is the reader's to skip, and must not stop this write.
            try:
                old = storage.read_bytes(path)
            except FileNotFoundError:
                old = b""
            storage.write_bytes(path, old + (b"\n" if old and not old.endswith(b"\n") else b"")
                                + line)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
            os.write(fd, (b"\n" if torn else b"") + line)
        finally:
            os.close(fd)

    def checkpoint_path(self, step: int) -> epath.Path:
        return self.checkpoints / str(step)

    def owns(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is this workdir or lies under one of the names its layout uses
        (what another tool's output must never replace)."""
        mine = storage.absolute(str(self.path)).rstrip("/")
        theirs = storage.absolute(str(path)).rstrip("/")
        if not storage.is_remote(mine):
            mine, theirs = os.path.realpath(mine), os.path.realpath(theirs)
        if theirs == mine:
            return True
        if not theirs.startswith(mine + "/"):
            return False
        return theirs[len(mine) + 1:].split("/", 1)[0] in LAYOUT

    @classmethod
    def looks_like_one(cls, path: str | os.PathLike) -> bool:
        """True when ``path`` has a checkpoints folder (what :func:`mwmae.load` checks)."""
        return (epath.Path(storage.absolute(path)) / CHECKPOINTS).is_dir()

    # ------------------------------------------------------------------ config.json

    def read_config(self) -> dict[str, Any] | None:
        """The run's config as written, or None if there is none yet."""
        try:
            text = self.config_path.read_text()
        except FileNotFoundError:
            return None
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkdirError(f"{self.config_path}: not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise WorkdirError(f"{self.config_path}: not a training config (a JSON object)")
        return config

    def model_config(self) -> tuple[Any, dict[str, Any]]:
        """(ModelConfig, the whole config dict) from config.json."""
        from mwmae.model.config import ModelConfig

        full = self.read_config()
        if full is None:
            recorded = self.recorded_config()
            if recorded is None:
                raise WorkdirError(f"{self.config_path}: missing, and no checkpoint records the "
                                   f"run's config; a training workdir has the run's "
                                   f"{CONFIG_FILE} beside {CHECKPOINTS}/")
            log.warning("%s: missing; using the config checkpoint %d records", self.config_path,
                        recorded[0])
            full = recorded[1]
        if not isinstance(full.get("model"), dict):
            raise WorkdirError(f"{self.config_path}: no 'model' entry; not a training config")
        try:
            return ModelConfig.from_dict(full["model"]), full
        except (TypeError, ValueError) as e:
            raise WorkdirError(f"{self.config_path}: bad model config: {e}") from e

    def check_resume(self, new: Mapping[str, Any], may_change: Iterable[str]) -> None:
        """Refuse (before anything is written) a config that changes what the workdir holds.

        ``new`` is the config as a JSON-like dict; ``may_change`` lists the keys (``a.b`` or
        ``a.*``) a resumed run may set differently. The run's identity is the config its newest
        checkpoint records; config.json is compared too (it is all a run without a checkpoint
        yet has), so neither deleting nor editing it lets another run in.
        """
        if self.path.exists() and not self.path.is_dir():
            raise WorkdirError(f"{self.path}: a file, not a folder; --workdir names the folder "
                               "a run writes its checkpoints and logs to")
        old = self.read_config()
        from mwmae.artifact import FORMAT as ARTIFACT_FORMAT

        if old is not None and old.get("format") == ARTIFACT_FORMAT:
            raise WorkdirError(f"{self.path}: an exported artifact, not a training workdir: "
                               "training here would write over it. Nothing was written. Use "
                               "another --workdir (and --config.init_from to start from it)")
        self._check_not_nested()
        recorded = self.recorded_config()
        sources = []
        if recorded is not None:
            step, config = recorded
            sources.append((f"{self.checkpoint_path(step)} (the config it was trained with)",
                            config))
        if old is not None:
            sources.append((str(self.config_path), old))
        for where, config in sources:
            diffs = config_differences(config, new, may_change)
            if diffs:
                raise ConfigMismatch(
                    f"{where}: this workdir holds a run with another configuration; "
                    f"resuming it with these changes would mix two runs: {'; '.join(diffs)}. "
                    "Nothing was written. Use a new --workdir for the new configuration, or "
                    "rerun with the workdir's values.")
        self.check_not_only_damaged()

    def _check_not_nested(self) -> None:
        """Refuse a workdir inside an artifact (export would later replace the folder holding
        it) or inside another run's workdir (its checkpoints, or a run's folder that retention
        or a rerun of that run may rewrite). Local paths only: a walk up a bucket costs a
        request per level and gs:// workdirs are laid out by launchers."""
        if storage.is_remote(str(self.path)):
            return
        from mwmae.artifact import FORMAT as ARTIFACT_FORMAT

        for parent in list(self.path.parents)[:16]:
            if (parent / CHECKPOINTS).is_dir() and (parent / CONFIG_FILE).exists():
                raise WorkdirError(f"{self.path}: inside the training workdir {parent}; a run "
                                   "needs a folder of its own. Nothing was written")
            try:
                parent_config = json.loads((parent / CONFIG_FILE).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(parent_config, dict) and parent_config.get("format") == \
                    ARTIFACT_FORMAT:
                raise WorkdirError(f"{self.path}: inside the exported artifact {parent}, which "
                                   "a later export may replace whole. Nothing was written")

    def check_not_only_damaged(self) -> None:
        """Refuse to start a run from step 0 in a workdir whose every checkpoint was set aside
        as damaged: that would silently retrain the whole run (and, with ``keep_last=1``, the
        first save would be the only copy of anything)."""
        if self.steps() or not self.checkpoints.exists():
            return
        damaged = sorted(p.name for p in self.checkpoints.iterdir()
                         if DAMAGED_SUFFIX in p.name)
        if damaged:
            raise DamagedCheckpoint(
                f"{self.checkpoints}: no checkpoint verifies (set aside: {', '.join(damaged)}); "
                "training would start again from step 0 and redo every step. Nothing was "
                "trained. To start over on purpose, move the set-aside folders out of "
                f"{CHECKPOINTS}/ (or use a new --workdir); to recover, restore the checkpoint "
                "files from a copy.")

    def write_config(self, config_json: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        storage.write_text(str(self.config_path), config_json)

    # ------------------------------------------------------------------ checkpoints

    def manager(self, options: Any = None, *, read_only: bool = False,
                partial_state: bool = False) -> Any:
        """An Orbax CheckpointManager over ``checkpoints/`` with this workdir's items
        (``partial_state``: the state item restores parts of the tree, for params-only reads)."""
        import orbax.checkpoint as ocp

        _quiet_abandoned_reads()
        if options is None:
            options = ocp.CheckpointManagerOptions(read_only=read_only, create=not read_only,
                                                   save_interval_steps=0 if read_only else 1)
        # Handlers named up front, so metadata reads work before any restore.
        state = ocp.PyTreeCheckpointHandler() if partial_state else ocp.StandardCheckpointHandler()
        handlers = {"state": state,
                    "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        assert tuple(handlers) == ITEMS
        return ocp.CheckpointManager(self.checkpoints, item_handlers=handlers, options=options)

    def steps(self) -> list[int]:
        """Finished checkpoint steps, ascending (in-progress and set-aside ones excluded)."""
        import orbax.checkpoint as ocp

        if not self.checkpoints.exists():
            return []
        return sorted(int(s) for s in ocp.utils.checkpoint_steps(self.checkpoints))

    def save(self, manager: Any, step: int, state: Any, hosts: list[dict], meta: dict, *,
             force: bool = False, metrics: dict | None = None) -> bool:
        """Save (all hosts call it) if the policies or ``force`` say so; whether a save started.

        ``hosts`` is every host's input position; ``meta`` gets the state's checksums (and the
        evaluation ``metrics``, which Orbax also keeps for its best-checkpoint policy).
        """
        import orbax.checkpoint as ocp

        if not force and not manager.should_save(step):
            return False
        meta = {**meta, "checksums": checksum.tree_checksums(state)}
        if metrics is not None:
            meta["evaluation"] = metrics
        data = {"hosts": hosts}
        # The JSON items are checksummed too: an input position or a counter edited after the
        # save would resume on other batches without a word.
        meta = checksum.seal_meta(meta, data)
        return manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

    def read_meta(self, step: int, manager: Any = None) -> dict[str, Any]:
        """A checkpoint's ``meta`` item (counters, config, checksums), verified against its own
        checksum (DamagedCheckpoint if it changed after the save)."""
        import orbax.checkpoint as ocp

        manager = manager or self.manager(read_only=True)
        meta = dict(manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta)
        problems = checksum.json_problems(meta)
        if problems:
            raise DamagedCheckpoint(f"{self.checkpoint_path(step)}: {problems[0]}")
        return meta

    def newest_meta(self) -> tuple[int, dict[str, Any]] | None:
        """(step, meta) of the newest finished checkpoint whose ``meta`` verifies; None if
        there is none."""
        steps = self.steps()
        if not steps:
            return None
        manager = self.manager(read_only=True)
        for step in reversed(steps):
            try:
                return step, self.read_meta(step, manager)
            except Exception:  # noqa: BLE001 - damaged: the restore sets it aside; try older
                continue
        return None

    def recorded_config(self) -> tuple[int, dict[str, Any]] | None:
        """(step, config) of the newest verified checkpoint: the config the run was trained
        with, its identity, which config.json (a file that can be deleted or overwritten) only
        mirrors. None when no checkpoint records one."""
        newest = self.newest_meta()
        if newest is None or not isinstance(newest[1].get("config"), dict):
            return None
        return newest[0], newest[1]["config"]

    def _check_structure(self, manager: Any, step: int, abstract_state: Any) -> None:
        """Raise ConfigMismatch if the checkpoint's arrays are not the shapes of the state
        (another architecture), which is not damage."""
        import jax

        try:
            tree = manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata is damage; restore will say so
            return
        if tree is None:
            return
        tree = getattr(tree, "tree", tree)
        want = {checksum.leaf_name(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        got = {checksum.leaf_name(p): tuple(getattr(x, "shape", ()) or ())
               for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        problems = [f"{k}: stored {got[k]}, this config {want[k]}"
                    for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
        missing = sorted(want.keys() - got.keys())
        if missing and len(missing) < len(want):
            problems += [f"{k}: not in the checkpoint" for k in missing[:5]]
        if problems:
            raise ConfigMismatch(
                f"{self.checkpoint_path(step)}: the checkpoint holds another model or optimizer "
                f"than this config builds ({'; '.join(problems[:5])}). Nothing was changed. Use "
                "a new --workdir, or rerun with the config this workdir was trained with.")

    def restore_step(self, manager: Any, step: int, abstract_state: Any
                     ) -> tuple[Any, dict, dict]:
        """(state, data, meta) of one checkpoint, verified against its checksums.

        Raises DamagedCheckpoint for missing/unreadable files or a failed checksum, and
        ConfigMismatch for a checkpoint of another architecture.
        """
        import orbax.checkpoint as ocp

        path = self.checkpoint_path(step)
        self._check_structure(manager, step, abstract_state)
        try:
            r = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - structure was checked: this is damage
            raise DamagedCheckpoint(f"{path}: unreadable: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:300] if str(e) else ''}") from e
        problems = checksum.json_problems(dict(r.meta or {}), dict(r.data or {}))
        if problems:
            raise DamagedCheckpoint(f"{path}: {'; '.join(problems)}")
        recorded = (r.meta or {}).get("checksums")
        if recorded is None:
            log.warning("%s has no checksums (written by an older version): not verified", path)
        else:
            bad = checksum.differing(recorded, checksum.tree_checksums(r.state))
            if bad:
                raise DamagedCheckpoint(
                    f"{path}: {len(bad)} array(s) fail their checksum (e.g. {bad[0]}): the "
                    "files changed after the save")
        return r.state, dict(r.data), dict(r.meta)

    def set_aside(self, step: int) -> epath.Path:
        """Move a damaged checkpoint to ``<step>.damaged`` (kept for inspection, never restored,
        never listed as a step). Call from one process."""
        src = self.checkpoint_path(step)
        dst = self.checkpoints / f"{step}{DAMAGED_SUFFIX}"
        n = 1
        while dst.exists():
            n += 1
            dst = self.checkpoints / f"{step}{DAMAGED_SUFFIX}{n}"
        src.rename(dst)
        return dst

    def restore_latest(self, manager: Any, abstract_state: Any, *, is_primary: bool = True,
                       sync: Any = None) -> tuple[Any, dict, dict] | None:
        """(state, data, meta) of the newest checkpoint that restores and verifies, onto
        ``abstract_state``'s shardings (any mesh); None if there is none.

        A damaged checkpoint is reported, moved aside by the primary process (``sync``, if
        given, is called after that so every process sees the same listing) and the previous one
        is tried.
        """
        manager.reload()
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                return self.restore_step(manager, step, abstract_state)
            except DamagedCheckpoint as e:
                log.warning("%s", e)
                if is_primary:
                    moved = self.set_aside(step)
                    log.warning("set aside as %s; trying the previous checkpoint", moved)
                if sync is not None:
                    sync()
                manager.reload()
        self.check_not_only_damaged()
        return None

    # ------------------------------------------------------------------ params only

    def read_params(self, step: int | None = None, *, with_decoder: bool | None = False
                    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(ModelConfig, params as numpy, info) of one checkpoint, latest by default.

        Only the encoder's parameters are read unless ``with_decoder`` (None: the decoder's
        too when the checkpoint has one; a tagger's has none). The optimizer moments, twice the
        parameters' size, never are; whole arrays on the host whatever mesh wrote them,
        verified against the checkpoint's checksums.
        """
        import orbax.checkpoint as ocp
        from flax.traverse_util import flatten_dict, unflatten_dict

        from mwmae.model import param_problems, param_shapes

        config, full_config = self.model_config()
        steps = self.steps()
        if not steps:
            raise WorkdirError(f"{self.checkpoints}: no finished checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise WorkdirError(f"{self.checkpoints}: no checkpoint for step {step}; finished "
                               f"steps: {steps}")
        path = self.checkpoint_path(step)
        manager = self.manager(read_only=True, partial_state=True)
        try:
            tree = manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - any failure: the metadata is unreadable
            raise DamagedCheckpoint(f"{path}: unreadable checkpoint metadata ({e})") from e
        tree = getattr(tree, "tree", tree)
        if tree is None or "params" not in tree:
            raise WorkdirError(f"{path}: no 'params' in the checkpoint's state (entries: "
                               f"{sorted(tree or ())})")
        if with_decoder is None:
            stored = set(tree["params"])
            with_decoder = set(param_shapes(config)) <= stored
        want_flat = flatten_dict(param_shapes(config, encoder_only=not with_decoder))
        # The checkpoint holds the decoder too: an encoder-only read takes a subset.
        problems = param_problems(config, tree["params"], encoder_only=not with_decoder,
                                  allow_extra=True)
        if problems:
            raise WorkdirError(f"{path}: the checkpoint does not match the model in "
                               f"{self.config_path}:\n  " + "\n  ".join(problems[:20]))

        item = {"params": unflatten_dict(
            {k: np.zeros(v.shape, v.dtype) for k, v in want_flat.items()})}
        restore_args = {"params": unflatten_dict(
            {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in want_flat})}
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                             partial_restore=True),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - shapes matched: this is damage
            raise DamagedCheckpoint(f"{path}: unreadable: {type(e).__name__}: {e}") from e
        flat = {k: np.asarray(v) for k, v in flatten_dict(restored.state["params"]).items()}
        problems = checksum.json_problems(dict(restored.meta or {}))
        if problems:
            raise DamagedCheckpoint(f"{path}: {problems[0]}")
        recorded = (restored.meta or {}).get("checksums")
        if recorded is not None:
            actual = {"params/" + "/".join(map(str, k)): checksum.array_checksum_np(v)
                      for k, v in flat.items()}
            bad = checksum.differing({k: v for k, v in recorded.items() if k in actual}, actual)
            if bad:
                raise DamagedCheckpoint(f"{path}: {len(bad)} parameter array(s) fail their "
                                        f"checksum (e.g. {bad[0]}): the files changed after "
                                        "the save")
        params = unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()})
        info = {"workdir": str(self.path), "step": int(step), "seed": full_config.get("seed"),
                "verified": recorded is not None}
        return config, params, info

    # ------------------------------------------------------------------ inspect

    def inspect(self) -> list[CheckpointInfo]:
        """Every entry of ``checkpoints/``: finished, in progress (or abandoned), set aside."""
        from orbax.checkpoint import path as ocp_path

        if not self.checkpoints.exists():
            raise FileNotFoundError(f"{self.checkpoints}: no {CHECKPOINTS} directory (is "
                                    f"{self.path} a workdir?)")
        finished = set(self.steps())
        manager = self.manager(read_only=True) if finished else None
        rows = []
        for p in sorted(self.checkpoints.iterdir(), key=lambda p: (len(p.name), p.name)):
            if not p.is_dir():
                continue
            if DAMAGED_SUFFIX in p.name:
                status = "damaged"
            elif p.name.isdigit() and int(p.name) in finished:
                status = "complete"
            elif ocp_path.step.is_tmp_checkpoint(p) or p.name.isdigit():
                status = "incomplete"
            else:
                continue
            meta = None
            if status == "complete":
                try:
                    meta = self.read_meta(int(p.name), manager)
                except Exception as e:  # noqa: BLE001 - report it, list the rest
                    status, meta = "damaged", {"error": f"{type(e).__name__}: {e}"}
            rows.append(CheckpointInfo(p.name, status, _size(p), meta))
        return rows


_quiet_installed = False


def _quiet_abandoned_reads() -> None:
    """When one read of a restore fails, the reads still in flight finish on an event loop that
    Orbax has already closed, and each prints a 'RuntimeError: Event loop is closed' traceback
    (20-240 of them) through ``sys.unraisablehook``, burying the one warning that matters.
    Installed with the first checkpoint manager, it drops those, and only those."""
    import sys

    global _quiet_installed
    if _quiet_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _quiet_installed = True


def _size(path: epath.Path) -> int:
    # A walk by hand: recursive globs are refused on gs:// paths.
    if not path.is_dir():
        return int(path.stat().length)
    return sum(_size(p) for p in path.iterdir())

