"""Input pipeline: output layout, epoch coverage, determinism, exact resume, errors, sharding."""

import json
import logging
import os

import jax
import numpy as np
import pytest

from mwmae import audio as audio_lib
from mwmae.data import PipelineConfig, RecordError, make_input_iterator, records, shards

# Clip k has a distinctive log-mel and the single label k, so batches say which clips they hold.
FRAMES = [260, 120, 201, 333, 200, 410]  # some shorter than the 200-frame crop


def logmel_of(k: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + k)
    frames = FRAMES[k % len(FRAMES)]
    return (rng.standard_normal((frames, 80)) * (1 + k % 3) - 5 + k).astype(np.float32)


def write_dataset(folder, num_shards: int, per_shard: int, fmt: str = "tfrecord") -> str:
    """Shards of clips 0..num_shards*per_shard-1 plus a manifest; returns the manifest path."""
    os.makedirs(folder, exist_ok=True)
    rows = ["shard,num_records"]
    for s in range(num_shards):
        ids = range(s * per_shard, (s + 1) * per_shard)
        name = f"clips-{s:05d}-of-{num_shards:05d}.{fmt}"
        path = os.path.join(folder, name)
        if fmt == "array_record":
            from array_record.python.array_record_module import ArrayRecordWriter

            w = ArrayRecordWriter(path, "group_size:1")
            for k in ids:
                w.write(records.encode_example(logmel_of(k), [k]))
            w.close()
        else:
            with open(path, "wb") as f:
                w = records.TFRecordWriter(f)
                for k in ids:
                    w.write(records.encode_example(logmel_of(k), [k]))
                w.close()
        rows.append(f"{name},{per_shard}")
    manifest = os.path.join(folder, "clips-manifest.csv")
    with open(manifest, "w") as f:
        f.write("\n".join(rows) + "\n")
    return manifest


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shards"), num_shards=4, per_shard=6)


def config(**kw):
    base = dict(global_batch_size=4, seed=3, shuffle_buffer=8, cycle_length=2, max_labels=2)
    base.update(kw)
    return PipelineConfig(**base)


def iterator(source, cfg, **kw):
    return make_input_iterator(source, cfg, process_index=0, process_count=1, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def ids(batches):
    return [int(k) for b in batches for k in b["label"][:, 0]]


def test_one_epoch_is_every_clip_once_and_layout(dataset):
    it = iterator(dataset, config())
    batches = take(it, 6)  # 24 clips, batch 4
    assert sorted(ids(batches)) == list(range(24))
    b = batches[0]
    assert b["audio"].shape == (4, 200, 80, 1) and b["audio"].dtype == np.float32
    assert b["label"].shape == (4, 2) and b["label"].dtype == np.int32
    assert (b["label"][:, 1] == -1).all()
    # Training crops: a window of the clip normalised over all its frames.
    for batch in batches:
        for row, k in zip(batch["audio"][..., 0], batch["label"][:, 0], strict=True):
            full = audio_lib.normalize_for_pretraining(logmel_of(int(k)))
            if full.shape[0] <= 200:
                np.testing.assert_allclose(row[: full.shape[0]], full, atol=1e-6)
                assert (row[full.shape[0]:] == 0).all()
            else:
                starts = [s for s in range(full.shape[0] - 199)
                          if np.allclose(full[s : s + 200], row, atol=1e-6)]
                assert len(starts) == 1
    # The second epoch is again every clip once, in another order.
    second = take(it, 6)
    assert sorted(ids(second)) == list(range(24))
    assert ids(second) != ids(batches)
    it.close()


def test_same_seed_same_batches_other_seed_differs(dataset):
    a = take(iterator(dataset, config()), 5)
    b = take(iterator(dataset, config()), 5)
    c = take(iterator(dataset, config(seed=4)), 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["audio"], y["audio"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert ids(a) != ids(c)


@pytest.mark.parametrize("stop_at", [1, 3, 6, 7])
def test_restore_continues_exactly(dataset, stop_at):
    total = 11  # crosses the epoch boundary (6 batches per epoch)
    reference = take(iterator(dataset, config()), total)
    run = iterator(dataset, config())
    take(run, stop_at)
    state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
    run.close()
    resumed = iterator(dataset, config())
    resumed.set_state(state)
    rest = take(resumed, total - stop_at)
    for x, y in zip(reference[stop_at:], rest, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["audio"], y["audio"])


def test_evaluation_is_one_centred_ordered_pass(dataset):
    cfg = config(train=False)
    it = iterator(dataset, cfg)
    batches = list(it)
    assert len(batches) == 6 and ids(batches) == ids(list(iterator(dataset, cfg)))
    assert sorted(ids(batches)) == list(range(24))
    k = int(batches[0]["label"][0, 0])
    full = audio_lib.normalize_for_pretraining(logmel_of(k))
    start = max(0, (full.shape[0] - 200) // 2)
    np.testing.assert_allclose(batches[0]["audio"][0, : min(200, full.shape[0]), :, 0],
                               full[start : start + 200], atol=1e-6)


def test_multi_hot_labels(dataset):
    batch = next(iterator(dataset, config(num_classes=30, train=False)))
    assert batch["label"].shape == (4, 30) and batch["label"].dtype == np.float32
    assert (batch["label"].sum(axis=1) == 1).all()


@pytest.fixture(scope="module")
def array_records(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ar"), num_shards=4, per_shard=6,
                         fmt="array_record")


def by_label(batches):
    return {int(k): row for b in batches for k, row in zip(b["label"][:, 0], b["audio"],
                                                            strict=True)}


def test_array_record_epoch_is_a_shuffle_over_all_clips(array_records, dataset):
    it = iterator(array_records, config())
    first, second = take(it, 6), take(it, 6)
    it.close()
    for epoch in (first, second):
        assert sorted(ids(epoch)) == list(range(24))  # every clip exactly once
    # Not the file order, and not shard by shard: clips of one shard end up spread out.
    assert ids(first) != list(range(24)) and ids(first) != ids(second)
    assert len({k // 6 for k in ids(first)[:6]}) >= 3
    # A clip's crop depends on (seed, epoch, shard, record), not on the format.
    tf_epoch = by_label(take(iterator(dataset, config()), 6))
    for k, row in by_label(first).items():
        np.testing.assert_array_equal(row, tf_epoch[k])


@pytest.mark.parametrize("stop_at", [2, 8])
def test_array_record_resume_mid_epoch_continues_the_order(array_records, stop_at):
    reference = ids(take(iterator(array_records, config()), 12))
    run = iterator(array_records, config())
    take(run, stop_at)
    state = json.loads(json.dumps(run.get_state()))
    run.close()
    # The position is a handful of integers, however many clips there are.
    assert len(json.dumps(state["grain"])) < 400, state
    resumed = iterator(array_records, config())
    resumed.set_state(state)
    assert ids(take(resumed, 12 - stop_at)) == reference[stop_at * 4:]
    resumed.close()


def _damage(manifest, shard_index, how):
    path = shards.resolve(manifest)[shard_index].path
    data = open(path, "rb").read()
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(data)
        data[len(data) // 2] ^= 0xFF
        data = bytes(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("how", ["truncate", "corrupt"])
def test_damaged_shard_raises_naming_the_file_or_is_skipped(tmp_path, how):
    manifest = write_dataset(tmp_path, num_shards=4, per_shard=6)
    bad = _damage(manifest, 2, how)
    with pytest.raises(RecordError, match=os.path.basename(bad)):
        list(iterator(manifest, config(train=False)))
    it = iterator(manifest, config(train=False, on_error="skip", global_batch_size=1))
    seen = ids(list(it))
    assert len(it.errors) == 1 and it.errors.entries[0][0] == bad
    good = set(range(24)) - set(range(12, 18))
    assert good <= set(seen) and len(seen) == len(set(seen)) < 24


def test_record_outside_the_schema(tmp_path):
    path = tmp_path / "odd.tfrecord"
    with open(path, "wb") as f:
        w = records.TFRecordWriter(f)
        w.write(records.encode_example(np.zeros((300, 64), np.float32), [1]))  # 64 mels
        w.write(records.encode_example(logmel_of(1), [1]))
        w.close()
    with pytest.raises(RecordError, match=r"odd.tfrecord: record 0: .*expected \[frames, 80\]"):
        next(iterator(str(path), config(train=False, global_batch_size=1)))
    it = iterator(str(path), config(train=False, global_batch_size=1, on_error="skip"))
    assert len(list(it)) == 1 and len(it.errors) == 1


def test_missing_shard_and_too_few_shards(tmp_path):
    manifest = write_dataset(tmp_path, num_shards=2, per_shard=3)
    with pytest.raises(ValueError, match="2 shard.* for 3 hosts"):
        make_input_iterator(manifest, config(global_batch_size=3), process_index=0,
                            process_count=3)
    gone = shards.resolve(manifest)[1].path
    os.remove(gone)
    with pytest.raises(FileNotFoundError, match=f"shard missing: {gone}"):
        iterator(manifest, config())


def test_missing_shard_is_an_error_at_the_start_even_with_skip(tmp_path):
    """As the README says: a shard missing when the run starts is a listing error, whatever
    on_error; one that vanishes during the run is skipped and counted under skip."""
    manifest = write_dataset(tmp_path, num_shards=3, per_shard=4)
    gone = shards.resolve(manifest)[1].path
    it = iterator(manifest, config(train=False, on_error="skip", global_batch_size=1))
    os.remove(gone)   # after the listing: vanished mid-run
    seen = ids(list(it))
    assert sorted(seen) == [k for k in range(12) if k not in range(4, 8)]
    assert len(it.errors) == 1 and it.errors.skipped_records == 4   # the manifest's count
    with pytest.raises(FileNotFoundError, match=f"shard missing: {gone}"):
        iterator(manifest, config(on_error="skip"))


def test_record_count_is_checked_against_the_manifest(tmp_path):
    manifest = write_dataset(tmp_path, num_shards=2, per_shard=4)
    text = open(manifest).read().replace(",4\n", ",6\n", 1)   # first shard: listed 6, has 4
    with open(manifest, "w") as f:
        f.write(text)
    first = shards.resolve(manifest)[0].path
    with pytest.raises(RecordError, match=f"{os.path.basename(first)}: 4 records, the "
                                          "manifest lists 6"):
        list(iterator(manifest, config(train=False, global_batch_size=1)))
    it = iterator(manifest, config(train=False, on_error="skip", global_batch_size=1))
    assert sorted(ids(list(it))) == list(range(8))
    assert len(it.errors) == 1 and it.errors.skipped_records == 2


def test_a_short_shard_leaves_one_marker_after_its_last_clip(tmp_path):
    # The shortfall takes one place in the stream, after the clips, and the state there is past
    # it: a restore neither yields it again (counting it twice) nor loses it.
    from mwmae.data import sequential
    from mwmae.data.errors import Skipped

    manifest = write_dataset(tmp_path, num_shards=1, per_shard=3)
    shard = shards.resolve(manifest)[0]
    listed = shards.Shard(shard.path, shard.format, num_records=5)

    def shard_iterator(state=None):
        it = sequential._ShardIterator(listed, 0, 0, config(train=False, on_error="skip"),
                                       sequential._EmptyGuard(8))
        if state is not None:
            it.set_state(state)
        return it

    it = shard_iterator()
    assert [int(next(it)["label"][0]) for _ in range(3)] == [0, 1, 2]
    assert it.get_state() == {"record": 3, "done": 0}
    marker = next(it)
    assert isinstance(marker, Skipped) and (marker.record, marker.records) == (3, 2)
    assert it.get_state() == {"record": 3, "done": 1}
    with pytest.raises(StopIteration):
        next(it)
    assert isinstance(next(shard_iterator({"record": 3, "done": 0})), Skipped)
    with pytest.raises(StopIteration):
        next(shard_iterator({"record": 3, "done": 1}))


def test_global_batch_is_sharded_over_the_batch_axes(dataset, monkeypatch):
    from jax.sharding import NamedSharding, PartitionSpec

    from mwmae.data import to_global
    from mwmae.data.global_batch import check_rows_per_process

    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "model"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shardings = {"audio": NamedSharding(mesh, PartitionSpec("data", None, None, None)),
                 "label": NamedSharding(mesh, PartitionSpec("data", None))}
    local = next(iterator(dataset, config(global_batch_size=8)))
    batch = to_global(local, shardings, 8)
    assert batch["audio"].shape == (8, 200, 80, 1)
    assert batch["audio"].sharding == shardings["audio"]
    shard_rows = {s.device: s.index[0] for s in batch["audio"].addressable_shards}
    assert {(r.start, r.stop) for r in shard_rows.values()} == {(0, 2), (2, 4), (4, 6), (6, 8)}
    np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])
    with pytest.raises(ValueError, match="batch array 'audio': this host has 8 rows .* expected "
                                         "6 = 6 / 1 hosts"):
        to_global(local, shardings, 6)
    with pytest.raises(KeyError, match="batch array 'ids' has no sharding"):
        to_global({"ids": local["label"]}, shardings, 8)
    # Were there two hosts, this process would hold every row of a layout whose batch axes stay
    # on it: the other host's rows would have nowhere to go.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="gives process 0 8 of 8 rows, not 4: the batch axes "
                                         "must span all 2 processes"):
        check_rows_per_process.__wrapped__(shardings["label"], 8)


def test_large_records_span_read_chunks(tmp_path):
    # Records bigger than the reader's 1 MiB refill, in a zlib stream, back to back.
    rng = np.random.default_rng(5)
    clips = [rng.standard_normal((n, 80)).astype(np.float32) for n in (4000, 3500, 10, 5000)]
    path = tmp_path / "big.tfrecord"
    with open(path, "wb") as f:
        w = records.TFRecordWriter(f)
        for k, c in enumerate(clips):
            w.write(records.encode_example(c, [k]))
        w.close()
    shard = shards.Shard(str(path), "tfrecord")
    got = [records.decode_example(r) for r in shards.iter_records(shard)]
    assert [lab.tolist() for _, lab in got] == [[0], [1], [2], [3]]
    for (a, _), c in zip(got, clips, strict=True):
        np.testing.assert_array_equal(a, c)
    resumed = [records.decode_example(r)[1].tolist() for r in shards.iter_records(shard, start=2)]
    assert resumed == [[2], [3]]


def test_num_train_examples_defaults_to_the_manifest_sum(tmp_path, dataset, array_records):
    from mwmae.train import config as train_config
    from mwmae.train.engine import schedule_lengths

    c = train_config.default_config()
    assert c.data.num_train_examples == -1  # the default: count, don't assume AudioSet
    c.data.source, c.data.train_shards, c.batch_size = "shards", dataset, 4
    c.steps_per_epoch, c.num_train_steps, c.num_epochs = -1, -1, 2
    assert train_config.train_examples(c) == 24  # 4 shards x 6 in the manifest
    assert schedule_lengths(c) == (6, 12)
    # The manifest's counts are what is summed (not the files): edit one and the sum follows.
    edited = tmp_path / "edited-manifest.csv"
    rows = open(dataset).read().splitlines()
    rows[1] = rows[1].rsplit(",", 1)[0] + ",10"
    edited.write_text("\n".join(rows) + "\n")
    for row in rows[1:]:  # shard paths in a manifest are relative to it
        os.symlink(os.path.join(os.path.dirname(dataset), row.split(",")[0]),
                   tmp_path / row.split(",")[0])
    c.data.train_shards = str(edited)
    assert train_config.train_examples(c) == 28
    # ArrayRecord shards named without a manifest: counted from the files' own index.
    c.data.train_shards = os.path.join(os.path.dirname(array_records), "*.array_record")
    assert train_config.train_examples(c) == 24
    # TFRecord shards without a manifest cannot be counted cheaply: a clear error.
    c.data.train_shards = os.path.join(os.path.dirname(dataset), "*.tfrecord")
    with pytest.raises(ValueError, match="manifest"):
        train_config.train_examples(c)
    # A value > 0 overrides.
    c.data.num_train_examples = 1000
    assert train_config.train_examples(c) == 1000 and schedule_lengths(c) == (250, 500)


def test_training_crop_starts_cover_every_offset_evenly():
    from mwmae.data import clips

    # 300 frames, crop 200: 101 possible starts; 30,300 keyed crops, ~300 each.
    starts = np.bincount([clips.crop_start(300, 200, clips.crop_key(3, e, s, r))
                          for e in range(3) for s in range(10) for r in range(1010)],
                         minlength=101)
    assert starts.size == 101 and starts.min() > 200 and starts.max() < 400
    assert clips.crop_start(300, 200, None) == 50 and clips.crop_start(150, 200, 123) == 0
    # Different keys, different crops: the key is not ignored.
    assert len({clips.crop_key(0, 0, 0, r) % 101 for r in range(20)}) > 10


def test_prepare_audio_is_normalise_then_crop_bit_for_bit():
    from mwmae.data import clips

    rng = np.random.default_rng(7)
    for frames in (1, 57, 200, 201, 260, 999):
        x = (rng.standard_normal((frames, 80)) * rng.uniform(0.1, 20) - 40).astype(np.float32)
        key = int(rng.integers(0, 1 << 62))
        got = clips.prepare_audio(x, crop_frames=200, n_mels=80, crop=key)
        full = audio_lib.normalize_for_pretraining(x)
        start = clips.crop_start(frames, 200, key)
        want = np.zeros((200, 80, 1), np.float32)
        want[: min(200, frames), :, 0] = full[start : start + 200]
        np.testing.assert_array_equal(got, want)
    bad = np.zeros((250, 80), np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(RecordError, match="NaN"):
        clips.prepare_audio(bad, crop_frames=200, n_mels=80, crop=None)


def _clip_labels(manifest, label_of) -> str:
    """A clip-labels table for ``write_dataset``'s shards (clip k labelled ``label_of(k)``)."""
    rows = ["shard,record,labels"]
    for shard in shards.resolve(manifest):
        for r in range(shard.num_records):
            k = int(shard.path.rsplit("-", 3)[1]) * shard.num_records + r
            rows.append(f"{shard.path.rsplit('/', 1)[-1]},{r},{label_of(k)}")
    path = manifest.replace("-manifest.csv", "-clip-labels.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def test_balanced_sampling_draws_a_rare_class_as_often_as_a_common_one(array_records):
    # 24 clips: 3 of class "rare" (1), 21 of class 0: balanced, each class is half the draws.
    table = _clip_labels(array_records, lambda k: "1" if k in (2, 11, 19) else "0")
    it = iterator(array_records, config(balanced_labels=table))
    drawn = ids(take(it, 60))   # 10 epochs of 24 draws
    it.close()
    rare = sum(k in (2, 11, 19) for k in drawn) / len(drawn)
    assert 0.4 < rare < 0.6, rare          # 3/24 = 0.125 unweighted
    assert len(set(drawn)) == 24           # the common clips still all come up
    # A resume draws exactly what an uninterrupted run draws.
    run = iterator(array_records, config(balanced_labels=table))
    take(run, 7)
    state = run.get_state()
    run.close()
    resumed = iterator(array_records, config(balanced_labels=table))
    resumed.set_state(state)
    assert ids(take(resumed, 53)) == drawn[7 * 4:]
    resumed.close()


def test_balanced_sampling_refuses_sequential_shards_and_a_foreign_table(array_records, dataset,
                                                                         tmp_path):
    table = _clip_labels(array_records, lambda k: "0")
    with pytest.raises(ValueError, match="needs ArrayRecord shards"):
        next(iterator(dataset, config(balanced_labels=table)))
    short = tmp_path / "short-clip-labels.csv"
    short.write_text("shard,record,labels\n" + "".join(
        open(table).read().splitlines(keepends=True)[1:10]))
    with pytest.raises(ValueError, match=r"short-clip-labels.csv: 3 rows for "
                                         r"clips-00001-of-00004.array_record \(6 records\)"):
        next(iterator(array_records, config(balanced_labels=str(short))))


def test_a_damaged_first_header_is_refused_at_the_start_or_named_once_under_skip(tmp_path,
                                                                                caplog):
    manifest = write_dataset(tmp_path, num_shards=4, per_shard=6)
    bad = shards.resolve(manifest)[1].path
    data = bytearray(open(bad, "rb").read())
    data[2] ^= 0xFF  # the zlib stream's first block: the first record's header is unreadable
    with open(bad, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(RecordError, match=f"^{bad}: .*corrupt .*listed in {manifest}"):
        iterator(manifest, config(train=False))  # at the start, before any batch is drawn
    with caplog.at_level(logging.WARNING):
        it = iterator(manifest, config(train=False, on_error="skip", global_batch_size=1))
        seen = ids(list(it))
    assert sorted(seen) == [k for k in range(24) if k not in range(6, 12)]
    named = [r.getMessage() for r in caplog.records
             if r.levelno >= logging.WARNING and bad in r.getMessage()]
    assert len(named) == 1 and "corrupt" in named[0], named


def test_the_start_check_reads_a_shard_s_head_not_the_shard(tmp_path, monkeypatch):
    path = tmp_path / "big.tfrecord"
    noise = np.random.default_rng(0).standard_normal((4000, 80)).astype(np.float32)
    with open(path, "wb") as f:
        w = records.TFRecordWriter(f)
        for k in range(4):
            w.write(records.encode_example(noise + k, [k]))
        w.close()
    read = []
    open_read = shards.storage.open_read

    class Counting:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            data = self._f.read(n)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    monkeypatch.setattr(shards.storage, "open_read", lambda p, **kw: Counting(open_read(p, **kw)))
    assert shards.check_shards([shards.Shard(str(path), shards.TFRECORD, 4)]) == []
    assert 0 < sum(read) <= 64 * 1024 < os.path.getsize(path) // 10
