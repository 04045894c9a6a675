"""The preflight in order: devices, attention, step, input, storage; then the report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from etils import epath

from mwmae import workdir as layout
from mwmae.data import storage as storage_lib
from mwmae.preflight import attention, hardware, pipeline, step, storage
from mwmae.preflight.report import FAIL, OK, SECTIONS, WARN, Printer, Section, worst
from mwmae.train import attention_plan
from mwmae.train.attention_plan import AttentionPlan, Decision
from mwmae.workdir import Workdir, WorkdirError


def task_for(config: ml_collections.ConfigDict) -> type:
    """The training task the config is for: the tagger's for fine-tuning configs."""
    if "tagger" in config:
        from mwmae.finetune.tagging import Tagging

        return Tagging
    from mwmae.train.pretraining import Pretraining

    return Pretraining


def _measured_plan(trainer: Any, choices: dict[str, str]) -> AttentionPlan:
    """The trainer's layers with the implementations just measured (where the config asks for
    ``auto``; an explicit choice stays the config's)."""
    if trainer.model_config.attention_impl != "auto":
        return trainer.attention
    return AttentionPlan(tuple(
        dataclasses.replace(d, implementation=choices[d.layer.name],
                            reason="measured by this preflight")
        if d.layer.name in choices else d for d in trainer.attention.decisions),
        trainer.attention.platform)


_CTRL_C = threading.Event()


@contextlib.contextmanager
def _ctrl_c_at_safe_points() -> Iterator[None]:
    """The first Ctrl-C is noted and acted on at the next safe point (:func:`_stop_if_asked`:
    after each check, before the report). Python drops a KeyboardInterrupt that lands in a
    garbage-collection callback (JAX has one) with a traceback on stderr, and the preflight then
    ran on and wrote its report. A second Ctrl-C stops at once. Main thread only."""
    _CTRL_C.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_ctrl_c(signum: int, frame: Any) -> None:
        if _CTRL_C.is_set():
            raise KeyboardInterrupt
        _CTRL_C.set()

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _CTRL_C.clear()


def _stop_if_asked() -> None:
    if _CTRL_C.is_set():
        raise KeyboardInterrupt


def run(config: ml_collections.ConfigDict, workdir: str | None = None,
        out: str | None = None, print_fn: Callable[[str], None] = print,
        remember: bool = True) -> dict:
    """Run every check; process 0 writes the report to ``out`` (and, when given, the workdir's
    ``preflight.json``, which the trainer reads) and remembers the attention choices in the
    user's cache. Returns the report.

    Refused before anything is written (ConfigError, WorkdirError, LeaseHeld: one line each):
    a config the trainer would refuse, an ``--out`` among a workdir's own files, a workdir the
    trainer would refuse this config in, and a workdir whose writer lease a live trainer or
    preflight holds (this preflight holds it until it returns)."""
    # Every refusal comes before the first write: the config and --out, then what the trainer
    # itself would refuse in this workdir, then the workdir's writer lease.
    # The guard is this preflight's own numerics check; the trainer must not run it first.
    guarded_off = config.copy_and_resolve_references()
    guarded_off.model.attention_guard = "off"
    task = task_for(config)(guarded_off)  # checks the config (integer ranges included)
    check_out(out, workdir)
    if workdir:
        Workdir(workdir).check_resume(json.loads(config.to_json_best_effort()),
                                      task.may_change)
        from mwmae.train.loop import take_lease

        # Held while the checks run: a second preflight (or a trainer) timing or writing the
        # same workdir would skew both measurements and race for its scratch and report.
        lease = take_lease(Workdir(workdir), config, role="preflight")
    else:
        lease = None
    # Without a workdir, a temporary folder stands in (the storage line says where it was).
    temporary = None if workdir else tempfile.mkdtemp(prefix="mwmae-preflight-")
    try:
        with _ctrl_c_at_safe_points():
            return _checks(config, task, workdir, out, print_fn, remember, temporary)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        if lease is not None:
            lease.release()


def _checks(config: ml_collections.ConfigDict, task: Any, workdir: str | None,
            out: str | None, print_fn: Callable[[str], None], remember: bool,
            temporary: str | None) -> dict:
    printer = Printer(print_fn)
    report: dict[str, Any] = {
        "meta": {"started": attention_plan.measured_now(), "host": socket.gethostname(),
                 "jax": jax.__version__, "workdir": workdir,
                 "config": json.loads(config.to_json_best_effort())}}
    sections: dict[str, Section] = {}

    def finish(section: Section) -> Section:
        _stop_if_asked()
        sections[section.name] = section
        printer.show(section)
        return section

    devices = finish(hardware.check_devices(config))
    trainer = None
    if "mesh" in devices.figures:
        from mwmae.train.engine import Engine

        try:
            trainer = Engine(task, workdir or tempfile.gettempdir())
        except ValueError as e:  # e.g. a batch the mesh cannot split
            devices.line(FAIL, f"the config cannot run on these devices: {e}")
            printer.show(devices, len(devices.lines) - 1)
    if trainer is not None:
        layers = trainer.attention_layers()
        sec = finish(attention.check_attention(layers, jax.local_devices()[0]))
        trainer.attention = _measured_plan(trainer, sec.figures.get("choices", {}))
        if sec.verdict == FAIL:
            # A kernel that is wrong is never timed in a step: the step runs on XLA for it.
            trainer.attention = AttentionPlan(tuple(
                Decision(d.layer, "xla", "preflight: no passing choice")
                if d.layer.name not in sec.figures.get("choices", {}) else d
                for d in trainer.attention.decisions), trainer.attention.platform)
        step_sec, state = step.check_step(trainer, devices.figures["memory_bytes_per_device"])
        finish(step_sec)
        step_s = step_sec.figures.get("step_seconds")
        finish(pipeline.check_input(trainer, step_s))
        scratch = (Workdir(workdir).preflight_scratch if workdir else
                   epath.Path(temporary) / "scratch")
        finish(storage.check_storage(trainer, scratch, state, step_s))
    for name in SECTIONS:
        if name not in sections:
            sections[name] = Section(name)
            sections[name].line(FAIL, "not run: the config cannot run on these devices")
            printer.show(sections[name])
    _every_host_counts(sections, printer)
    report.update({name: sections[name].to_dict() for name in SECTIONS})
    report["verdict"] = worst(s.verdict for s in sections.values())
    report["meta"]["finished"] = attention_plan.measured_now()
    _stop_if_asked()
    if jax.process_index() == 0:
        _write(report, workdir, out, print_fn)
        if remember and report["attention"].get("layers"):
            path = attention_plan.remember(report["attention"]["layers"])
            print_fn(f"attention choices remembered in {path}")
    failed = [(n, t) for n in SECTIONS for v, t in sections[n].lines if v == FAIL]
    # The first failure again, last: what a user scrolling a long log needs to see.
    print_fn(f"preflight verdict: {report['verdict']}"
             + (f" ({failed[0][0]}: {failed[0][1]})" if failed else ""))
    return report


def _every_host_counts(sections: dict[str, Section], printer: Printer) -> None:
    """One verdict for the job: a section that is worse on another host says so on process 0
    (whose lines are the ones printed), and every host exits alike."""
    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    rank = {OK: 0, WARN: 1, FAIL: 2}
    mine = np.array([rank[sections[n].verdict] for n in SECTIONS], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(SECTIONS))
    for i, name in enumerate(SECTIONS):
        worse = [h for h in range(every.shape[0]) if every[h, i] > mine[i]]
        if worse:
            verdict = [OK, WARN, FAIL][int(every[:, i].max())]
            sections[name].line(verdict, f"worse on host(s) {worse}: {verdict} (their own "
                                         "output says why)")
            printer.show(sections[name], len(sections[name].lines) - 1)


def check_out(out: str | None, workdir: str | None) -> None:
    """Refuse (WorkdirError, before anything runs) an ``--out`` that would replace something
    that is not a preflight report: a file the workdir owns (its config.json, checkpoints...),
    a folder, or an existing file of another kind."""
    if not out:
        return
    if workdir:
        wd = Workdir(workdir)
        if wd.owns(out) and storage_lib.absolute(out) != str(wd.preflight_path):
            raise WorkdirError(f"--out {out}: a file of the workdir {workdir} (its layout: "
                               "config.json, checkpoints/ ...); the report would replace it. "
                               f"Leave --out out (the report goes to {wd.preflight_path}) or "
                               "name a file elsewhere")
    if storage_lib.is_remote(out):
        return
    _check_not_in_a_workdir(out)
    if os.path.isdir(out):
        raise WorkdirError(f"--out {out}: a folder; --out names the report's JSON file")
    if os.path.exists(out):
        try:
            with open(out) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
        if not (isinstance(previous, dict) and "verdict" in previous):
            raise WorkdirError(f"--out {out}: an existing file that is not a preflight report; "
                               "the report would replace it. Name another file")


def _check_not_in_a_workdir(out: str) -> None:
    """Refuse an ``--out`` among another workdir's own files (local paths; a walk up a bucket
    costs a request per level): a report in its ``checkpoints/`` is a folder its next run sets
    aside as a damaged checkpoint, and its config, lease or logs are not the preflight's to
    replace. Its ``preflight.json`` is a report like any other."""
    path = os.path.realpath(os.path.abspath(out))
    parent = os.path.dirname(path)
    for _ in range(16):
        if _looks_like_a_workdir(parent):
            inside = os.path.relpath(path, parent).split(os.sep)
            if inside[0] in layout.LAYOUT and inside != [layout.PREFLIGHT]:
                raise WorkdirError(
                    f"--out {out}: inside the training workdir {parent}, in its {inside[0]}, "
                    f"which its runs manage (a report in {layout.CHECKPOINTS}/ looks like a "
                    "damaged checkpoint to the next run). Nothing was written. Name a file "
                    "outside it")
        if os.path.dirname(parent) == parent:
            return
        parent = os.path.dirname(parent)


def _looks_like_a_workdir(folder: str) -> bool:
    """A checkpoints/ folder beside the run's config or lease, or holding a step's checkpoint
    (a workdir whose config.json was removed is still one); not a project folder that merely
    has a checkpoints/ folder of its own."""
    checkpoints = os.path.join(folder, layout.CHECKPOINTS)
    if not os.path.isdir(checkpoints):
        return False
    if any(os.path.exists(os.path.join(folder, name))
           for name in (layout.CONFIG_FILE, layout.LEASE_FILE)):
        return True
    try:
        names = os.listdir(checkpoints)
    except OSError:
        return False
    return any(n.isdigit() or layout.DAMAGED_SUFFIX in n for n in names)


def default_out(workdir: str | None) -> str:
    return str(Workdir(workdir).preflight_path) if workdir else "preflight.json"


def _write(report: dict, workdir: str | None, out: str | None,
           print_fn: Callable[[str], None]) -> None:
    text = json.dumps(report, indent=1, default=str) + "\n"
    targets = [out or default_out(workdir)]
    if workdir and str(Workdir(workdir).preflight_path) != storage_lib.absolute(targets[0]):
        targets.append(str(Workdir(workdir).preflight_path))
    for target in targets:
        parent = os.path.dirname(target)
        try:
            if parent and not storage_lib.is_remote(target):
                os.makedirs(parent, exist_ok=True)
            storage_lib.write_text(target, text)
        except OSError as e:
            raise OSError(f"{target}: the report cannot be written there ({e})") from e
        print_fn(f"report: {target}")
