"""`skipped_records` under on_error="skip": the records passed over up to the consumed position.

A skipped record keeps its place in the stream (it takes a slot of the shuffle window, of the
interleave, of a worker's slice), so the reference for a run over shards with damaged records is
the same run over *twin* shards in which every damaged record is a good clip labelled
``STAND_IN + k``: the damaged run's count after ``n`` batches is the number of stand-ins that the
twin's stream holds before the clip that ended the ``n``-th batch. Read-ahead (prefetch threads,
the shuffle window, worker processes) must not show in it, and a resume must not count again
what the checkpoint already counted.
"""

import json
import logging
import os

import numpy as np
import pytest
from test_data import config, iterator, logmel_of, take

from mwmae.data import records, sequential, shards
from mwmae.data.errors import summarize

STAND_IN = 1000
BAD = {1, 5, 10, 11, 19, 26, 31}  # 31: the last record of the last shard
NUM_SHARDS, PER_SHARD, BATCH = 4, 8, 4


def _write_array_record(path: str, payloads: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(path, "group_size:1")
    for p in payloads:
        w.write(p)
    w.close()


def write_shards(folder, fmt: str, *, twin: bool, short: int | None = None) -> str:
    """Shards of clips 0..31 whose records in BAD are damaged (or, in the twin, stand-ins).
    Shard ``short`` is listed with one record more than it has (the twin has it: a stand-in)."""
    os.makedirs(folder, exist_ok=True)
    rows = ["shard,num_records"]
    for s in range(NUM_SHARDS):
        payloads = []
        for k in range(s * PER_SHARD, (s + 1) * PER_SHARD):
            if k not in BAD:
                payloads.append(records.encode_example(logmel_of(k), [k]))
            elif twin:
                payloads.append(records.encode_example(logmel_of(k), [STAND_IN + k]))
            else:  # a readable record outside the schema (64 mels): skipped when prepared
                payloads.append(records.encode_example(np.zeros((300, 64), np.float32), [k]))
        if s == short and twin:
            payloads.append(records.encode_example(logmel_of(s), [STAND_IN + 100 + s]))
        name = f"clips-{s:05d}-of-{NUM_SHARDS:05d}.{fmt}"
        path = os.path.join(folder, name)
        if fmt == "array_record":
            _write_array_record(path, payloads)
        else:
            with open(path, "wb") as f:
                w = records.TFRecordWriter(f)
                for p in payloads:
                    w.write(p)
                w.close()
        rows.append(f"{name},{PER_SHARD + (s == short)}")
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w") as f:
        f.write("\n".join(rows) + "\n")
    return manifest


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """format -> (damaged manifest, twin manifest), written on first use."""
    built: dict[str, tuple[str, str]] = {}

    def pair(fmt: str) -> tuple[str, str]:
        if fmt not in built:
            root = tmp_path_factory.mktemp(fmt)
            built[fmt] = (write_shards(root / "damaged", fmt, twin=False),
                          write_shards(root / "twin", fmt, twin=True))
        return built[fmt]
    return pair


def slow(*values):
    return pytest.param(*values, marks=pytest.mark.slow)


# Worker processes take seconds to start: the default run keeps TFRecord training with workers
# (the count and the resume); the other worker cases join the slow group.
IN_PROCESS = [("tfrecord", 0), ("array_record", 0)]


def labels(batch) -> list[int]:
    return [int(k) for k in batch["label"][:, 0]]


def expected_counts(twin_batches, n: int, *, workers: int, endless: bool) -> int:
    """Stand-ins before the last consumed clip of each stream, after ``n`` damaged batches.

    Endless runs batch in the workers, which take turns batch by batch: each worker's stream is
    then its own batches, and it consumed ``BATCH`` clips per damaged batch it gave. A finite
    pass (and a run without workers) is one stream, batched after the workers.
    """
    per_stream = workers if (workers and endless) else 1
    streams: list[list[int]] = [[] for _ in range(per_stream)]
    for j, batch in enumerate(twin_batches):
        streams[j % per_stream] += labels(batch)
    total = 0
    for w, stream in enumerate(streams):
        clips = BATCH * len(range(w, n, per_stream))
        seen = 0
        for k in stream:
            if seen == clips:
                break
            if k >= STAND_IN:
                total += 1
            else:
                seen += 1
        assert seen == clips, "the twin run is too short for this many damaged batches"
    return total


def skip_config(**kw):
    return config(on_error="skip", global_batch_size=BATCH, **kw)


def count(it) -> int:
    report = it.errors
    # The figure the trainer logs and the one its checkpoint stores are the same.
    assert summarize(json.loads(json.dumps(it.get_state()))["grain"]).count == report.count
    return report.skipped_records


@pytest.mark.parametrize(("fmt", "workers"),
                         [*IN_PROCESS, ("tfrecord", 2), slow("array_record", 2)])
def test_training_count_is_the_skips_before_the_consumed_position(pairs, fmt, workers):
    damaged, twin = pairs(fmt)
    cfg = skip_config(num_workers=workers)
    reference = iterator(twin, cfg)
    twin_batches = take(reference, 24)
    reference.close()
    it = iterator(damaged, cfg)
    got, want = [], []
    for n in range(1, 13):  # 48 clips: windows and an epoch (25 good clips) crossed
        batch = next(it)
        assert not set(labels(batch)) & BAD
        got.append(count(it))
        want.append(expected_counts(twin_batches, n, workers=workers, endless=True))
    it.close()
    assert got == want
    assert want[0] < len(BAD) < want[-1]  # read-ahead and a second epoch are covered


@pytest.mark.parametrize(("fmt", "workers"),
                         [*IN_PROCESS, slow("tfrecord", 2), slow("array_record", 2)])
def test_evaluation_count_follows_the_pass_and_ends_at_every_damaged_record(pairs, fmt, workers):
    damaged, twin = pairs(fmt)
    cfg = skip_config(train=False, num_workers=workers)
    twin_batches = list(iterator(twin, cfg))
    it = iterator(damaged, cfg)
    got, want = [], []
    for n in range(1, 7):  # 25 good clips: 6 batches, one clip left over
        next(it)
        got.append(count(it))
        want.append(expected_counts(twin_batches, n, workers=workers, endless=False))
    assert got == want and want[-1] < len(BAD)  # the last damaged record comes after
    with pytest.raises(StopIteration):
        next(it)
    # The pass is over: every damaged record was passed, each counted once.
    assert it.errors.skipped_records == len(it.errors) == len(BAD)
    assert sorted(r for _, r, _ in it.errors.entries) == sorted(k % PER_SHARD for k in BAD)
    it.close()


@pytest.mark.parametrize(("fmt", "workers", "stop_at"), [
    ("tfrecord", 0, 1), ("tfrecord", 0, 3), ("tfrecord", 0, 8), ("tfrecord", 2, 3),
    ("array_record", 0, 2), slow("array_record", 2, 5)])
def test_resume_counts_each_skip_once(tmp_path, fmt, workers, stop_at):
    # TFRecord: also a shard shorter than its manifest says (its missing record counts at its
    # end). ArrayRecord reads by the manifest's counts, so there it must be right.
    short = 2 if fmt == "tfrecord" else None
    damaged = write_shards(tmp_path / "damaged", fmt, twin=False, short=short)
    cfg = skip_config(num_workers=workers)
    total = 12
    twin = iterator(write_shards(tmp_path / "twin", fmt, twin=True, short=short), cfg)
    twin_batches = take(twin, 2 * total)
    twin.close()

    def expected(n: int) -> int:
        return expected_counts(twin_batches, n, workers=workers, endless=True)

    whole = iterator(damaged, cfg)
    reference = take(whole, stop_at)
    state = json.loads(json.dumps(whole.get_state()))  # what a checkpoint stores
    saved = summarize(state["grain"]).count
    assert saved == expected(stop_at)
    reference += take(whole, total - stop_at)
    reference_count = count(whole)
    whole.close()

    resumed = iterator(damaged, cfg)
    resumed.set_state(state)
    assert count(resumed) == saved  # restored, not re-counted
    rest = take(resumed, total - stop_at)
    final = count(resumed)
    resumed.close()
    assert [labels(b) for b in rest] == [labels(b) for b in reference[stop_at:]]
    assert final == reference_count == expected(total)


# ------------------------------------------------ a damaged long clip, met again every epoch

LONG_FRAMES = 6000  # a minute of log-mel frames: long enough to tell apart by its size


def _write_with_long_damaged_clip(folder, fmt: str, *, break_stream: bool) -> tuple[str, str]:
    """Two shards of 3 good clips each; the first also holds a long clip that is unusable
    (NaN in its last frame, found only after normalising all of it) or, with
    ``break_stream``, its first record with a corrupt CRC (the rest of that shard is
    unreadable). Returns (manifest, the damaged shard's path)."""
    os.makedirs(folder, exist_ok=True)
    long = logmel_of(0).repeat(LONG_FRAMES // len(logmel_of(0)) + 1, axis=0)[:LONG_FRAMES]
    long[-1, -1] = np.nan
    shards_payloads = [[records.encode_example(logmel_of(k), [k]) for k in range(3)],
                       [records.encode_example(logmel_of(k), [k]) for k in range(3, 6)]]
    shards_payloads[0].insert(0 if break_stream else 1, records.encode_example(long, [99]))
    rows, paths = ["shard,num_records"], []
    for s, payloads in enumerate(shards_payloads):
        name = f"long-{s}.{fmt}"
        path = os.path.join(folder, name)
        if fmt == "array_record":
            _write_array_record(path, payloads)
        else:
            framed = b"".join(records.frame_record(p) for p in payloads)
            if break_stream and s == 0:
                at = 12 + len(payloads[0]) // 2  # inside the long clip's data: its CRC fails
                framed = framed[:at] + bytes([framed[at] ^ 0xFF]) + framed[at + 1:]
            with open(path, "wb") as f:
                f.write(framed)
        rows.append(f"{name},{len(payloads)}")
        paths.append(path)
    manifest = os.path.join(folder, "manifest.csv")
    with open(manifest, "w") as f:
        f.write("\n".join(rows) + "\n")
    return manifest, paths[0]


def _skip_warnings(caplog, path: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and path in r.getMessage()]


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_a_damaged_long_clip_is_decoded_and_named_once_across_epochs(tmp_path, monkeypatch,
                                                                      caplog, fmt):
    manifest, damaged = _write_with_long_damaged_clip(tmp_path, fmt, break_stream=False)
    decoded_long = []
    decode = sequential.decode_example

    def counting_decode(raw):
        if len(raw) > LONG_FRAMES * 80 * 4:
            decoded_long.append(len(raw))
        return decode(raw)

    monkeypatch.setattr(sequential, "decode_example", counting_decode)
    it = iterator(manifest, skip_config(num_workers=0, tfrecord_compression=None))
    with caplog.at_level(logging.WARNING):
        batches = take(it, 15)  # 60 clips: 10 epochs of 6 good clips
    skips = count(it)
    it.close()
    assert not {99} & {k for b in batches for k in labels(b)}
    assert skips >= 8  # met (and counted) in nearly every epoch...
    assert len(decoded_long) == 1  # ...but decoded only the first time
    warnings = _skip_warnings(caplog, damaged)
    assert len(warnings) == 1 and "NaN" in warnings[0], warnings


def test_a_shard_that_broke_off_is_not_read_again(tmp_path, monkeypatch, caplog):
    manifest, damaged = _write_with_long_damaged_clip(tmp_path, "tfrecord", break_stream=True)
    opened = []
    open_records = shards.iter_records

    def counting_open(shard, **kw):
        if shard.path == damaged:
            opened.append(kw.get("start", 0))
        return open_records(shard, **kw)

    monkeypatch.setattr(shards, "iter_records", counting_open)
    it = iterator(manifest, skip_config(num_workers=0, tfrecord_compression=None))
    with caplog.at_level(logging.WARNING):
        take(it, 6)  # 24 clips: 8 epochs of the other shard's 3
    skips = count(it)
    it.close()
    assert skips >= 4 * 4  # the shard's 4 listed records lost in each epoch consumed
    assert opened == [0]  # where its stream broke off is remembered, not read again
    warnings = _skip_warnings(caplog, damaged)
    assert len(warnings) == 1 and "CRC" in warnings[0], warnings
