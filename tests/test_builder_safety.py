"""The shard builder as a careless user meets it: reruns into someone else's output, odd flags,
damaged side files, two builders at once. Every refusal is one line ``error: ...`` naming the
file or flag, exit status 2, and nothing already on disk is changed by it."""

import csv
import fcntl
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from mwmae.data import records, shards
from tfrecord_tools import build as build_lib
from tfrecord_tools import inspect as inspect_lib
from tfrecord_tools import sources

RATE = 16000


def _clips(folder: pathlib.Path, count: int, *, seed: int = 0, seconds: float = 0.2,
           names: str = "c{:03d}.wav") -> list[pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * RATE)) / RATE
    paths = []
    for i in range(count):
        path = folder / names.format(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tone = 0.3 * np.sin(2 * np.pi * (150 + 97 * seed + 31 * i) * t)
        soundfile.write(path, tone.astype(np.float32), RATE)
        paths.append(path)
    return paths


def _cli(capsys, *argv: str, module=build_lib) -> tuple[int, str, list[str]]:
    try:
        status = module.main([*argv, *(("--workers", "1", "--no-progress")
                                       if module is build_lib and "--workers" not in argv
                                       else ())])
    except SystemExit as e:  # only --help may leave this way
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip().splitlines()


def _refused(capsys, *argv: str, module=build_lib) -> str:
    """The one error line of a refused run (exit 2, nothing on stdout)."""
    status, out, err = _cli(capsys, *argv, module=module)
    assert status == 2, (status, out, err)
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def _snapshot(folder: pathlib.Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(manifest: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for shard in shards.resolve(manifest):
        out.extend(records.decode_example(r) for r in shards.iter_records(shard))
    return out


# ------------------------------------------------------------------ 9: reuse needs proof


def test_shards_of_another_build_are_not_resumed_without_build_json(tmp_path, capsys):
    _clips(tmp_path / "old", 12, seed=0)
    _clips(tmp_path / "new", 6, seed=5)
    out = tmp_path / "out"
    assert _cli(capsys, "folder", str(tmp_path / "old"), "--out", str(out),
                "--shard-size", "2")[0] == 0
    (out / "data-build.json").unlink()
    before = _snapshot(out)
    # Six shards either way: the same file names, other clips in them.
    line = _refused(capsys, "folder", str(tmp_path / "new"), "--out", str(out),
                    "--shard-size", "1")
    assert str(out) in line and "--out" in line and "remove" in line
    assert _snapshot(out) == before  # build.json is not written over the evidence either


def test_same_build_resumes_without_build_json_and_restores_it(tmp_path, capsys):
    _clips(tmp_path / "a", 4)
    out = tmp_path / "out"
    argv = ("folder", str(tmp_path / "a"), "--out", str(out), "--shard-size", "2")
    assert _cli(capsys, *argv)[0] == 0
    recorded = (out / "data-build.json").read_text()
    (out / "data-build.json").unlink()
    status, stdout, _ = _cli(capsys, *argv)
    assert status == 0 and json.loads(stdout)["shards_resumed"] == 2
    assert (out / "data-build.json").read_text() == recorded


def test_shard_of_changed_audio_is_not_reused(tmp_path, capsys):
    clips = _clips(tmp_path / "a", 4)
    out = tmp_path / "out"
    argv = ("folder", str(tmp_path / "a"), "--out", str(out), "--shard-size", "2")
    assert _cli(capsys, *argv)[0] == 0
    (out / "data-00001-of-00002.tfrecord").unlink()  # an interrupted build, to be resumed
    _clips(tmp_path / "a", 1, seed=9, seconds=0.5)  # c000.wav is now another sound
    before = _snapshot(out)
    line = _refused(capsys, *argv)
    assert "data-00000-of-00002.tfrecord" in line and "changed" in line
    assert _snapshot(out) == before
    assert clips[0].exists()


def test_foreign_shard_without_a_marker_is_not_overwritten(tmp_path, capsys):
    _clips(tmp_path / "a", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "data-00000-of-00001.tfrecord").write_bytes(b"someone else's shard")
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(out))
    assert "data-00000-of-00001.tfrecord" in line
    assert (out / "data-00000-of-00001.tfrecord").read_bytes() == b"someone else's shard"


def test_marker_of_another_shard_count_refuses(tmp_path, capsys):
    _clips(tmp_path / "a", 4)
    out = tmp_path / "out"
    assert _cli(capsys, "folder", str(tmp_path / "a"), "--out", str(out),
                "--shard-size", "2")[0] == 0
    (out / "data-build.json").unlink()
    for shard in out.glob("data-0000*.tfrecord"):
        shard.unlink()  # the shards are gone, their markers and manifest are not
    before = _snapshot(out)
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(out),
                    "--shard-size", "4")
    assert "_build" in line and str(out) in line
    assert _snapshot(out) == before


def test_damaged_build_json_is_a_refusal(tmp_path, capsys):
    _clips(tmp_path / "a", 2)
    out = tmp_path / "out"
    assert _cli(capsys, "folder", str(tmp_path / "a"), "--out", str(out))[0] == 0
    (out / "data-build.json").write_text('{"format": "tfrec')
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(out))
    assert "data-build.json" in line and "damaged" in line
    assert (out / "data-build.json").read_text() == '{"format": "tfrec'


def test_other_settings_into_the_same_out_is_a_one_line_refusal(tmp_path, capsys):
    _clips(tmp_path / "a", 3)
    out = tmp_path / "out"
    assert _cli(capsys, "folder", str(tmp_path / "a"), "--out", str(out))[0] == 0
    before = _snapshot(out)
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(out),
                    "--max-seconds", "0.1")
    assert "data-build.json" in line and "max_seconds" in line
    assert _snapshot(out) == before


def test_truncated_shard_is_rebuilt_not_resumed(tmp_path, capsys):
    _clips(tmp_path / "a", 4)
    out = tmp_path / "out"
    argv = ("folder", str(tmp_path / "a"), "--out", str(out), "--shard-size", "2")
    assert _cli(capsys, *argv)[0] == 0
    shard = out / "data-00001-of-00002.tfrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    status, stdout, _ = _cli(capsys, *argv)
    summary = json.loads(stdout)
    assert status == 0 and summary["shards_built"] == 1 and summary["shards_resumed"] == 1
    assert inspect_lib.inspect_shards([summary["manifest"]])["ok"]


def test_damaged_side_files_are_rewritten_from_the_markers(tmp_path, capsys):
    _clips(tmp_path / "a", 4, names="k{}/c.wav")
    out = tmp_path / "out"
    argv = ("folder", str(tmp_path / "a"), "--labels-from-subfolder", "--out", str(out),
            "--shard-size", "2")
    assert _cli(capsys, *argv)[0] == 0
    good = {n: (out / n).read_text() for n in ("data-manifest.csv", "data-clip-labels.csv",
                                               "data-labels.csv")}
    (out / "data-manifest.csv").write_text("shard,num")
    (out / "data-clip-labels.csv").unlink()
    status, stdout, _ = _cli(capsys, *argv)
    assert status == 0 and json.loads(stdout)["shards_built"] == 0
    assert {n: (out / n).read_text() for n in good} == good


# ------------------------------------------------------------------ 10: vocabularies


@pytest.mark.parametrize("vocabulary, where", [
    ("0,cat\n0,dog\n", ":2: index 0"),
    ("0,cat\n1,cat\n", ":2: label 'cat'"),
    ("index,label\n0,cat\n-1,dog\n", ":3:"),
    ("0,cat\nx1,dog\n", ":2:"),
    ("0,cat\n1.5,dog\n", ":2:"),
])
def test_bad_vocabulary_is_refused_naming_the_line(tmp_path, capsys, vocabulary, where):
    _clips(tmp_path / "a", 2)
    (tmp_path / "m.csv").write_text("path,labels\na/c000.wav,cat\na/c001.wav,cat\n")
    (tmp_path / "v.csv").write_text(vocabulary)
    line = _refused(capsys, "csv", str(tmp_path / "m.csv"), "--vocabulary",
                    str(tmp_path / "v.csv"), "--out", str(tmp_path / "out"))
    assert f"{tmp_path / 'v.csv'}{where}" in line
    assert not (tmp_path / "out").exists()


def test_vocabulary_gaps_keep_their_ids(tmp_path, capsys):
    _clips(tmp_path / "a", 2)
    (tmp_path / "m.csv").write_text("path,labels\na/c000.wav,cat\na/c001.wav,dog\n")
    (tmp_path / "v.csv").write_text("index,label\n0,cat\n2,dog\n")
    out = tmp_path / "out"
    assert _cli(capsys, "csv", str(tmp_path / "m.csv"), "--vocabulary", str(tmp_path / "v.csv"),
                "--out", str(out))[0] == 0
    assert [lab.tolist() for _, lab in _records(str(out / "data-manifest.csv"))] == [[0], [2]]
    with open(out / "data-labels.csv") as f:
        assert list(csv.reader(f))[1:] == [["0", "cat"], ["1", ""], ["2", "dog"]]
    # The labels CSV written is itself a vocabulary (one --vocabulary for train and eval).
    again = tmp_path / "again"
    assert _cli(capsys, "csv", str(tmp_path / "m.csv"), "--vocabulary",
                str(out / "data-labels.csv"), "--out", str(again))[0] == 0
    assert (again / "data-labels.csv").read_text() == (out / "data-labels.csv").read_text()


# ------------------------------------------------------------------ 11: no comment syntax


def test_hash_paths_are_paths_not_comments(tmp_path, capsys):
    _clips(tmp_path, 1, names="#take{}.wav")
    _clips(tmp_path, 1, seed=3, names="plain{}.wav")
    (tmp_path / "m.csv").write_text("path,labels\n#take0.wav,1\nplain0.wav,2\n#gone.wav,3\n")
    out = tmp_path / "out"
    status, stdout, _ = _cli(capsys, "csv", str(tmp_path / "m.csv"), "--out", str(out))
    summary = json.loads(stdout)
    assert status == 0 and summary["records"] == 2 and summary["rejected"] == 1
    assert [lab.tolist() for _, lab in _records(summary["manifest"])] == [[1], [2]]
    with open(summary["rejects_csv"]) as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(tmp_path / "#gone.wav")]


def test_audioset_segment_comments_still_skipped(tmp_path):
    (tmp_path / "audio").mkdir()
    _clips(tmp_path / "audio", 1, names="abc{}.wav")
    (tmp_path / "cl.csv").write_text("index,mid,display_name\n0,/m/a,A\n")
    (tmp_path / "seg.csv").write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                                      'abc0, 0.000, 10.000, "/m/a"\n')
    listing = sources.from_audioset([str(tmp_path / "seg.csv")], str(tmp_path / "audio"),
                                    str(tmp_path / "cl.csv"))
    assert [i.labels for i in listing.items] == [(0,)] and not listing.missing


def test_csv_rows_that_cannot_be_a_clip_are_rejected_not_dropped(tmp_path, capsys):
    _clips(tmp_path, 3)
    (tmp_path / "m.csv").write_text("path,labels\nc000.wav,1\n,2\nc001.wav,3\nc000.wav,1\n"
                                    "c002.wav,-4\n")
    out = tmp_path / "out"
    status, stdout, _ = _cli(capsys, "csv", str(tmp_path / "m.csv"), "--out", str(out))
    summary = json.loads(stdout)
    assert status == 0 and summary["records"] == 2 and summary["rejected"] == 3
    with open(summary["rejects_csv"]) as f:
        reasons = [r["reason"] for r in csv.DictReader(f)]
    assert any("empty path" in r for r in reasons)
    assert any("line 2" in r for r in reasons)  # the duplicate names its first listing
    assert any("negative label" in r for r in reasons)


def test_huge_csv_field_is_a_one_line_refusal(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("path,labels\na.wav,1\nb.wav," + "1;" * 100_000 + "\n")
    line = _refused(capsys, "csv", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"))
    assert f"{tmp_path / 'm.csv'}:3" in line and "field" in line


# ------------------------------------------------------------------ 12: numeric flags


@pytest.mark.parametrize("flag, value", [
    ("--max-seconds", "-1"), ("--max-seconds", "0"), ("--max-seconds", "nan"),
    ("--max-seconds", "inf"), ("--max-seconds", "0.001"),
    ("--shard-size", "0"), ("--shard-size", "-3"),
    ("--workers", "-1"), ("--workers", "100000"),
    ("--prefix", ""), ("--prefix", "a/b"),
])
def test_odd_numeric_flags_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    _clips(tmp_path / "a", 2)
    out = tmp_path / "out"
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(out), flag, value)
    assert flag in line
    assert not out.exists()


def test_long_max_seconds_keeps_every_frame(tmp_path, capsys):
    _clips(tmp_path / "a", 1, seconds=1.0)
    out = tmp_path / "out"
    assert _cli(capsys, "folder", str(tmp_path / "a"), "--out", str(out),
                "--max-seconds", "1e306")[0] == 0
    (logmel, _), = _records(str(out / "data-manifest.csv"))
    assert logmel.shape[0] == 101


def test_flags_the_format_would_ignore_are_refused(tmp_path, capsys):
    _clips(tmp_path / "a", 1)
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
                    "--format", "array_record", "--compression", "none")
    assert "--compression" in line
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
                    "--array-record-options", "group_size:4")
    assert "--array-record-options" in line
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
                    "--format", "array_record", "--array-record-options", "group_size:x")
    assert "--array-record-options" in line
    assert not (tmp_path / "o").exists()


def test_inspect_refuses_a_negative_top_labels(capsys, tmp_path):
    line = _refused(capsys, str(tmp_path / "x.tfrecord"), "--top-labels", "-1",
                    module=inspect_lib)
    assert "--top-labels" in line


def test_all_clips_rejected_is_a_failure_with_the_rejects_kept(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.wav").write_bytes(b"RIFF not audio")
    out = tmp_path / "out"
    status, _, err = _cli(capsys, "folder", str(tmp_path / "a"), "--out", str(out))
    assert status == 1 and err[-1].startswith("error: ") and "rejects" in err[-1]
    with open(out / "data-rejects.csv") as f:
        assert len(list(csv.DictReader(f))) == 1


# ------------------------------------------------------------------ one-line refusals


def test_refusals_are_one_line_naming_the_file_or_flag(tmp_path, capsys):
    _clips(tmp_path / "a", 1)
    out = str(tmp_path / "out")
    missing = tmp_path / "nowhere"
    assert str(missing) in _refused(capsys, "folder", str(missing), "--out", out)
    (tmp_path / "empty.csv").write_text("path,labels\n")
    assert "empty.csv" in _refused(capsys, "csv", str(tmp_path / "empty.csv"), "--out", out)
    (tmp_path / "bad.csv").write_text("clip,labels\na/c000.wav,1\n")
    assert "bad.csv" in _refused(capsys, "csv", str(tmp_path / "bad.csv"), "--out", out)
    (tmp_path / "ok.csv").write_text("path,labels\na/c000.wav,cat\n")
    assert "nope.csv" in _refused(capsys, "csv", str(tmp_path / "ok.csv"), "--vocabulary",
                                  str(tmp_path / "nope.csv"), "--out", out)
    (tmp_path / "latin1.csv").write_bytes(b"path,labels\nca\xe9.wav,1\n")
    assert "latin1.csv" in _refused(capsys, "csv", str(tmp_path / "latin1.csv"), "--out", out)
    assert "--format" in _refused(capsys, "folder", str(tmp_path / "a"), "--out", out,
                                  "--format", "parquet")
    assert "--out" in _refused(capsys, "folder", str(tmp_path / "a"))
    assert _refused(capsys)  # no source at all
    (tmp_path / "file").write_text("x")
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(tmp_path / "file"))
    assert str(tmp_path / "file") in line and "folder" in line
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out",
                    str(tmp_path / "file" / "sub"))
    assert str(tmp_path / "file" / "sub") in line
    assert not (tmp_path / "out").exists()


def test_missing_audioset_segments_file_is_named(tmp_path, capsys):
    _clips(tmp_path / "a", 1)
    (tmp_path / "cl.csv").write_text("index,mid,display_name\n0,/m/a,A\n")
    line = _refused(capsys, "audioset", "--segments", str(tmp_path / "seg.csv"),
                    "--audio-dir", str(tmp_path / "a"), "--class-labels",
                    str(tmp_path / "cl.csv"), "--out", str(tmp_path / "out"))
    assert str(tmp_path / "seg.csv") in line


def test_everything_rejected_by_the_listing_is_a_refusal_naming_why(tmp_path, capsys):
    _clips(tmp_path / "a", 1)
    (tmp_path / "m.csv").write_text("path,labels\na/c000.wav,bird\n")
    (tmp_path / "v.csv").write_text("0,cat\n")
    line = _refused(capsys, "csv", str(tmp_path / "m.csv"), "--vocabulary",
                    str(tmp_path / "v.csv"), "--out", str(tmp_path / "out"))
    assert "bird" in line and "all 1" in line


# ------------------------------------------------------------------ output beside the input


def test_output_never_overwrites_an_input_file(tmp_path, capsys):
    _clips(tmp_path, 2)
    manifest = tmp_path / "data-manifest.csv"  # the user's own list, named like our output
    manifest.write_text("path,labels\nc000.wav,1\nc001.wav,2\n")
    line = _refused(capsys, "csv", str(manifest), "--out", str(tmp_path))
    assert str(manifest) in line and "--out" in line
    assert manifest.read_text() == "path,labels\nc000.wav,1\nc001.wav,2\n"


def test_out_inside_the_audio_folder_resumes_and_keeps_inputs(tmp_path, capsys):
    clips = _clips(tmp_path, 3)
    # An input whose name looks like one of our temporaries must survive the clean-up.
    odd = _clips(tmp_path, 1, seed=2, names="data-x.tmp-{}.wav")[0]
    argv = ("folder", str(tmp_path), "--out", str(tmp_path), "--shard-size", "2")
    status, stdout, _ = _cli(capsys, *argv)
    assert status == 0 and json.loads(stdout)["records"] == 4 and odd.exists()
    status, stdout, _ = _cli(capsys, *argv)
    summary = json.loads(stdout)
    assert status == 0 and summary["shards_resumed"] == 2 and summary["records"] == 4
    assert all(p.exists() for p in clips)


# ------------------------------------------------------------------ two builders at once


def _hold_lock(path: pathlib.Path, holder: dict) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps(holder).encode())
    return fd


def test_second_builder_into_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    _clips(tmp_path / "a", 2)
    out = tmp_path / "out"
    fd = _hold_lock(out / "_build" / "data.lock", {"pid": 4242, "host": "box7"})
    try:
        line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(out))
        assert "4242" in line and "box7" in line and str(out) in line
        assert not list(out.glob("data-*"))
    finally:
        os.close(fd)
    # Released (the holder died or finished): the next build goes ahead.
    assert _cli(capsys, "folder", str(tmp_path / "a"), "--out", str(out))[0] == 0
    assert not (out / "_build" / "data.lock").exists()


def test_lock_left_by_a_dead_builder_is_stale(tmp_path, capsys):
    _clips(tmp_path / "a", 2)
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock = out / "_build" / "data.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    assert _cli(capsys, "folder", str(tmp_path / "a"), "--out", str(out))[0] == 0


def test_other_prefix_in_the_same_out_is_not_locked_out(tmp_path, capsys):
    _clips(tmp_path / "a", 2)
    out = tmp_path / "out"
    fd = _hold_lock(out / "_build" / "data.lock", {"pid": 4242, "host": "box7"})
    try:
        assert _cli(capsys, "folder", str(tmp_path / "a"), "--out", str(out),
                    "--prefix", "other")[0] == 0
    finally:
        os.close(fd)


# ------------------------------------------------------------------ more of the same classes


def test_manifest_saved_with_a_byte_order_mark_is_read(tmp_path, capsys):
    _clips(tmp_path, 1)
    (tmp_path / "m.csv").write_bytes("\ufeffpath,labels\nc000.wav,4\n".encode())
    status, stdout, _ = _cli(capsys, "csv", str(tmp_path / "m.csv"), "--out",
                             str(tmp_path / "out"))
    assert status == 0 and json.loads(stdout)["records"] == 1


def test_missing_audio_root_is_named(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("path,labels\nc000.wav,4\n")
    line = _refused(capsys, "csv", str(tmp_path / "m.csv"), "--audio-root",
                    str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert "--audio-root" in line and str(tmp_path / "nowhere") in line


def test_inspect_names_a_folder_given_instead_of_a_manifest(tmp_path):
    report = inspect_lib.inspect_shards([str(tmp_path)])
    assert not report["ok"] and "manifest.csv" in report["problems"][0]


@pytest.mark.parametrize("with_build_json", [True, False])
def test_damaged_done_marker(tmp_path, capsys, with_build_json):
    _clips(tmp_path / "a", 4)
    out = tmp_path / "out"
    argv = ("folder", str(tmp_path / "a"), "--out", str(out), "--shard-size", "2")
    assert _cli(capsys, *argv)[0] == 0
    (out / "_build" / "data-00001-of-00002.tfrecord.json").write_text("{not json")
    if not with_build_json:
        (out / "data-build.json").unlink()
        before = _snapshot(out)
        assert "data-00001-of-00002.tfrecord.json" in _refused(capsys, *argv)
        assert _snapshot(out) == before
        return
    # build.json vouches for the folder: the shard is this build's, unproven, so built again.
    status, stdout, _ = _cli(capsys, *argv)
    assert status == 0 and json.loads(stdout)["shards_built"] == 1


def test_array_record_options_changed_mid_build_is_refused(tmp_path, capsys):
    _clips(tmp_path / "a", 4)
    out = tmp_path / "out"
    argv = ("folder", str(tmp_path / "a"), "--out", str(out), "--shard-size", "2",
            "--format", "array_record")
    assert _cli(capsys, *argv)[0] == 0
    (out / "data-00001-of-00002.array_record").unlink()
    line = _refused(capsys, *argv, "--array-record-options", "group_size:2")
    assert "array_record_options" in line


def test_output_through_a_symlink_never_overwrites_an_input(tmp_path, capsys):
    _clips(tmp_path / "real", 1)
    manifest = tmp_path / "real" / "data-manifest.csv"
    manifest.write_text("path,labels\nc000.wav,1\n")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    line = _refused(capsys, "csv", str(manifest), "--out", str(tmp_path / "alias"))
    assert str(manifest) in line
    assert manifest.read_text() == "path,labels\nc000.wav,1\n"


def _hear_task(root: pathlib.Path, vocabulary: str) -> pathlib.Path:
    task = root / "task"
    _clips(task / "16000" / "train", 2)
    (task / "task_metadata.json").write_text(json.dumps({"embedding_type": "scene"}))
    (task / "labelvocabulary.csv").write_text(vocabulary)
    (task / "train.json").write_text(json.dumps({"c000.wav": ["yes"], "c001.wav": ["no"]}))
    return task


def test_hear_split_and_its_vocabulary(tmp_path, capsys):
    task = _hear_task(tmp_path, "idx,label\n0,no\n1,yes\n")
    listing = sources.from_hear(str(task), "train")
    assert [i.labels for i in listing.items] == [(1,), (0,)]
    assert listing.vocabulary == ["no", "yes"]
    bad = _hear_task(tmp_path / "bad", "idx,label\n0,no\n0,yes\n")
    line = _refused(capsys, "hear", str(bad), "--split", "train", "--out", str(tmp_path / "o"))
    assert f"{bad / 'labelvocabulary.csv'}:3: index 0" in line


def test_a_flag_given_dashes_for_its_value_is_a_one_line_refusal(tmp_path, capsys):
    _clips(tmp_path / "a", 1)
    line = _refused(capsys, "folder", str(tmp_path / "a"), "--out", str(tmp_path / "out"),
                    "--max-seconds=--")
    assert line == "error: argument --max-seconds: expected one value, got '--'", line
    assert not (tmp_path / "out").exists()


def test_a_listed_file_that_is_not_there_is_rejected_as_not_found(tmp_path, capsys):
    _clips(tmp_path / "a", 1)
    (tmp_path / "list.csv").write_text("path,labels\nc000.wav,a\ngone.wav,a\n")
    status, _, _ = _cli(capsys, "csv", str(tmp_path / "list.csv"), "--audio-root",
                        str(tmp_path / "a"), "--out", str(tmp_path / "out"))
    assert status == 0
    rejects = (tmp_path / "out" / "data-rejects.csv").read_text().splitlines()
    assert rejects[1:] == [f"{tmp_path / 'a' / 'gone.wav'},not found: "
                           f"{tmp_path / 'a' / 'gone.wav'}"], rejects
