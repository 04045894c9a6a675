"""Shard building: decode -> log-mel -> records, resumable, rejects, original schema, inspect."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile

from mwmae import audio as audio_lib
from mwmae.data import records, shards
from tfrecord_tools import build as build_lib
from tfrecord_tools import inspect as inspect_lib
from tfrecord_tools import sources
from tfrecord_tools.decode import file_to_logmel, load_audio


def _signal(kind: str, seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    if kind == "tone":
        x = 0.4 * np.sin(2 * np.pi * (220 + 40 * seed) * t)
    elif kind == "chirp":
        x = 0.3 * np.sin(2 * np.pi * (100 * t + 900 * t**2))
    else:
        x = 0.1 * rng.standard_normal(t.size)
    x = np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], axis=1)
    return x.astype(np.float32)


# (relative path, kind, seconds, sample rate, channels, soundfile format)
CLIPS = [
    ("dog/a.wav", "tone", 1.3, 16000, 1, "WAV"),
    ("dog/b.flac", "chirp", 2.2, 44100, 2, "FLAC"),
    ("cat/c.ogg", "noise", 1.0, 22050, 1, "OGG"),
    ("cat/d.wav", "chirp", 0.7, 8000, 1, "WAV"),
    ("cat/e.mp3", "tone", 1.5, 48000, 2, "MP3"),
    ("owl/f.wav", "noise", 3.1, 16000, 1, "WAV"),
    ("owl/g.flac", "tone", 0.9, 32000, 1, "FLAC"),
]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    for seed, (rel, kind, seconds, rate, channels, fmt) in enumerate(CLIPS):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, _signal(kind, seconds, rate, seed, channels), rate, format=fmt)
    broken = root / "owl" / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return root


def _options(out, **kw):
    return build_lib.BuildOptions(output=str(out), shard_size=3, workers=1, progress=False, **kw)


def _read_back(manifest: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for shard in shards.resolve(manifest):
        out.extend(records.decode_example(r) for r in shards.iter_records(shard))
    return out


def test_decoding_resamples_and_downmixes(audio_dir):
    flac = load_audio(str(audio_dir / "dog/b.flac"))
    assert flac.dtype == np.float32 and flac.ndim == 1
    assert abs(flac.size - round(2.2 * 16000)) <= 1
    wav = load_audio(str(audio_dir / "dog/a.wav"))  # 16-bit PCM at 16 kHz: no resampling
    expected = soundfile.read(audio_dir / "dog/a.wav", dtype="float32")[0]
    np.testing.assert_array_equal(wav, expected)


def test_round_trip_folder_with_rejects(audio_dir, tmp_path):
    listing = sources.from_folder(str(audio_dir), labels_from_subfolder=True)
    assert listing.vocabulary == ["cat", "dog", "owl"]
    summary = build_lib.build(listing, _options(tmp_path / "out"))
    assert summary["shards"] == 3 and summary["shards_built"] == 3
    assert summary["records"] == len(CLIPS) and summary["rejected"] == 1
    with open(summary["rejects_csv"]) as f:
        rejects = list(csv.DictReader(f))
    assert len(rejects) == 1 and rejects[0]["path"].endswith("broken.wav")
    assert "decode" in rejects[0]["reason"]

    got = _read_back(summary["manifest"])
    good = [i for i in listing.items if not i.path.endswith("broken.wav")]
    assert len(got) == len(good)
    for (logmel, labels), item in zip(got, good, strict=True):
        expected = file_to_logmel(item.path)
        assert logmel.dtype == np.float32 and logmel.shape[1] == 80
        np.testing.assert_array_equal(logmel, expected)
        assert labels.tolist() == list(item.labels)
    # The 16 kHz wav's spectrogram is exactly the front end applied to its samples.
    samples = soundfile.read(audio_dir / "dog/a.wav", dtype="float32")[0]
    first = next(i for i, it in enumerate(good) if it.path.endswith("dog/a.wav"))
    np.testing.assert_array_equal(got[first][0], audio_lib.log_mel_spectrogram_numpy(samples))
    assert got[first][0].shape[0] == audio_lib.num_frames(samples.size)

    with open(tmp_path / "out" / "data-labels.csv") as f:
        assert list(csv.reader(f))[1:] == [["0", "cat"], ["1", "dog"], ["2", "owl"]]
    # Every record's labels, in shard and record order (what balanced sampling weighs).
    with open(tmp_path / "out" / "data-clip-labels.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["labels"]) for r in table] == [labels.tolist()[0] for _, labels in got]
    assert [r["shard"] for r in table] == sorted(r["shard"] for r in table)
    report = inspect_lib.inspect_shards([summary["manifest"]])
    assert report["ok"] and report["records"] == len(CLIPS) and report["mel_bins"] == [80]
    assert report["label_histogram"] == {0: 3, 1: 2, 2: 2}


def test_resume_skips_finished_shards(audio_dir, tmp_path):
    listing = sources.from_folder(str(audio_dir))
    out = tmp_path / "out"
    first = build_lib.build(listing, _options(out))
    names = sorted(p for p in os.listdir(out) if p.endswith(".tfrecord"))
    assert len(names) == 3
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in names}
    os.remove(out / names[1])  # as if the run had died before this shard
    (out / f"{names[2]}.tmp-999").write_bytes(b"half a shard")
    second = build_lib.build(listing, _options(out))
    assert second["shards_built"] == 1 and second["shards_resumed"] == 2
    assert os.stat(out / names[0]).st_mtime_ns == mtimes[names[0]]
    assert not any(".tmp-" in p for p in os.listdir(out))
    assert second["records"] == first["records"]
    assert [a.tolist() for a, _ in _read_back(second["manifest"])] == [
        a.tolist() for a, _ in _read_back(first["manifest"])
    ]
    with pytest.raises(ValueError, match="different build"):
        build_lib.build(listing, build_lib.BuildOptions(output=str(out), shard_size=2,
                                                        workers=1, progress=False))


def test_array_record_output_and_worker_processes(audio_dir, tmp_path):
    listing = sources.from_folder(str(audio_dir))
    tf_summary = build_lib.build(listing, _options(tmp_path / "tf"))
    options = build_lib.BuildOptions(output=str(tmp_path / "ar"), shard_size=3, workers=2,
                                     format="array_record", progress=False)
    summary = build_lib.build(listing, options)
    assert summary["workers"] == 2
    assert all(s.format == "array_record" for s in shards.resolve(summary["manifest"]))
    a = _read_back(summary["manifest"])
    b = _read_back(tf_summary["manifest"])
    assert len(a) == len(b) == len(CLIPS)
    for (x, lx), (y, ly) in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(lx, ly)


def test_csv_audioset_and_fsd50k_layouts(audio_dir, tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,labels\ndog/a.wav,\"3,5\"\ncat/c.ogg,7\nowl/missing.wav,1\n")
    listing = sources.from_csv(str(manifest), audio_root=str(audio_dir))
    assert [i.labels for i in listing.items] == [(3, 5), (7,), (1,)]
    summary = build_lib.build(listing, _options(tmp_path / "csv_out"))
    assert summary["records"] == 2 and summary["rejected"] == 1  # missing.wav: file not found

    # AudioSet: segment CSV + class_labels_indices.csv + clips named by YTID.
    aset = tmp_path / "audioset"
    (aset / "audio").mkdir(parents=True)
    for name, src in (("YabcDEF12345.wav", "dog/a.wav"), ("xyz_30.000.flac", "dog/b.flac")):
        (aset / "audio" / name).write_bytes((audio_dir / src).read_bytes())
    (aset / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man"\n'
        '2,/m/0jbk,"Animal"\n'
    )
    (aset / "segments.csv").write_text(
        "# Segments csv created\n# num_ytids=3\n# YTID, start_seconds, end_seconds, "
        'positive_labels\nabcDEF12345, 0.000, 10.000, "/m/0jbk,/m/09x0r"\n'
        'xyz, 30.000, 40.000, "/m/05zppz"\nnotdownloaded, 0.000, 10.000, "/m/0jbk"\n'
    )
    listing = sources.from_audioset([str(aset / "segments.csv")], str(aset / "audio"),
                                    str(aset / "class_labels_indices.csv"))
    assert [i.labels for i in listing.items] == [(0, 2), (1,)]
    assert listing.missing[0][0] == "notdownloaded"
    assert listing.vocabulary == ["Speech", "Male speech, man", "Animal"]

    # FSD50K: ground truth CSVs with comma-separated label names, vocabulary.csv.
    fsd = tmp_path / "fsd"
    (fsd / "FSD50K.ground_truth").mkdir(parents=True)
    (fsd / "FSD50K.dev_audio").mkdir()
    for name, src in (("101.wav", "dog/a.wav"), ("102.wav", "owl/f.wav")):
        (fsd / "FSD50K.dev_audio" / name).write_bytes((audio_dir / src).read_bytes())
    (fsd / "FSD50K.ground_truth" / "vocabulary.csv").write_text(
        "0,Bark,/m/05tny_\n1,Dog,/m/0bt9lr\n2,Wind,/m/03m9d0z\n"
    )
    (fsd / "FSD50K.ground_truth" / "dev.csv").write_text(
        'fname,labels,mids,split\n101,"Bark,Dog","/m/05tny_,/m/0bt9lr",train\n'
        "102,Wind,/m/03m9d0z,val\n"
    )
    dev = sources.from_fsd50k(str(fsd), "dev")
    assert [i.labels for i in dev.items] == [(0, 1), (2,)]
    val = sources.from_fsd50k(str(fsd), "val")
    assert [os.path.basename(i.path) for i in val.items] == ["102.wav"]
    summary = build_lib.main(["fsd50k", "--root", str(fsd), "--split", "train", "--out",
                              str(tmp_path / "fsd_out"), "--workers", "1", "--no-progress"])
    assert summary == 0
    assert [lab.tolist() for _, lab in _read_back(str(tmp_path / "fsd_out/data-manifest.csv"))
            ] == [[0, 1]]


def test_original_writer_layout_both_ways(tmp_path):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal((n, 80)).astype(np.float32), lab)
             for n, lab in ((250, [1, 4]), (1001, []), (37, [526]))]
    # Written the way the original project wrote them: tf.train.Example, ZLIB TFRecord.
    theirs = str(tmp_path / "orig-00000-of-00001.tfrec")
    with tf.io.TFRecordWriter(theirs, options="ZLIB") as w:
        for logmel, lab in clips:
            ex = tf.train.Example(features=tf.train.Features(feature={
                "audio": tf.train.Feature(bytes_list=tf.train.BytesList(
                    value=[tf.io.serialize_tensor(logmel).numpy()])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=lab)),
            }))
            w.write(ex.SerializeToString())
    got = [records.decode_example(r) for r in shards.iter_records(shards.Shard(theirs, "tfrecord"))]
    for (logmel, lab), (a, b) in zip(clips, got, strict=True):
        np.testing.assert_array_equal(a, logmel)
        assert b.tolist() == lab
    # Ours, read by TensorFlow.
    ours = tmp_path / "ours.tfrecord"
    with open(ours, "wb") as f:
        writer = records.TFRecordWriter(f)
        for logmel, lab in clips:
            writer.write(records.encode_example(logmel, lab))
        writer.close()
    spec = {"audio": tf.io.FixedLenFeature([], tf.string), "label": tf.io.VarLenFeature(tf.int64)}
    parsed = list(tf.data.TFRecordDataset(str(ours), compression_type="ZLIB"))
    assert len(parsed) == len(clips)
    for raw, (logmel, lab) in zip(parsed, clips, strict=True):
        ex = tf.io.parse_single_example(raw, spec)
        np.testing.assert_array_equal(tf.io.parse_tensor(ex["audio"], tf.float32).numpy(), logmel)
        assert tf.sparse.to_dense(ex["label"]).numpy().tolist() == lab
    assert records.serialize_tensor(clips[0][0]) == tf.io.serialize_tensor(clips[0][0]).numpy()


def test_inspect_reports_truncated_and_missing_shards(audio_dir, tmp_path, capsys):
    summary = build_lib.build(sources.from_folder(str(audio_dir)), _options(tmp_path / "out"))
    paths = [s.path for s in shards.resolve(summary["manifest"])]
    data = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(data[: len(data) // 2])
    status = inspect_lib.main([summary["manifest"]])
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and not report["ok"]
    assert any(paths[1] in p and "truncated" in p for p in report["problems"])
    os.remove(paths[2])
    report = inspect_lib.inspect_shards([summary["manifest"]])
    assert any("shard missing" in p and paths[2] in p for p in report["problems"])
