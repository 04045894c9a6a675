"""The input pipeline with worker processes: same guarantees as in process, per worker count."""

import json
import os

import numpy as np
import pytest
from test_data import _damage, config, ids, iterator, take, write_dataset

from mwmae.data import RecordError
from mwmae.data.workers import default_num_workers, resolve_num_workers

WORKERS = 2


@pytest.fixture(scope="module", params=["tfrecord",
                                       pytest.param("array_record", marks=pytest.mark.slow)])
def source(request, tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp(request.param), num_shards=4, per_shard=6,
                         fmt=request.param)


def test_deterministic_epochs_and_exact_resume_with_workers(source):
    total, stop_at = 11, 7  # 6 batches per epoch: the resume point is in the second epoch
    run = iterator(source, config(num_workers=WORKERS))
    reference = take(run, total)
    run.close()
    assert sorted(ids(reference[:6])) == list(range(24))  # an epoch is every clip once
    assert ids(reference[:6]) != ids(take(iterator(source, config()), 6))  # not in-process order

    run = iterator(source, config(num_workers=WORKERS))
    first = take(run, stop_at)
    state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
    run.close()
    assert ids(first) == ids(reference[:stop_at])  # same (seed, hosts, workers): same batches
    resumed = iterator(source, config(num_workers=WORKERS))
    resumed.set_state(state)
    rest = take(resumed, total - stop_at)
    resumed.close()
    for x, y in zip(reference[stop_at:], rest, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["audio"], y["audio"])

    with pytest.raises(ValueError, match="num_workers=2"):
        iterator(source, config(num_workers=0)).set_state(state)


def test_skipped_records_are_counted_over_workers_and_raise_names_the_file(tmp_path):
    manifest = write_dataset(tmp_path, num_shards=4, per_shard=6)
    bad = [_damage(manifest, 1, "corrupt"), _damage(manifest, 2, "truncate")]
    with pytest.raises(RecordError, match=os.path.basename(bad[0])) as raised:
        list(iterator(manifest, config(train=False, num_workers=WORKERS)))
    # No banner printed after the error (Python prints an exception's notes after it).
    assert not getattr(raised.value, "__notes__", None)
    it = iterator(manifest, config(train=False, on_error="skip", global_batch_size=1,
                                   num_workers=WORKERS))
    seen = ids(list(it))
    report = it.errors
    it.close()
    # Shards 1 and 2 are read by different workers; the host's count is their sum. The count is
    # of records lost: shard 1 breaks at record 0 (all 6 lost), shard 2 at record 3 (3 lost).
    assert len(report) == 2 and sorted(e[0] for e in report.entries) == sorted(bad)
    assert report.skipped_records == report.count == 9
    assert set(range(6)) | set(range(18, 24)) <= set(seen) and len(seen) == len(set(seen)) < 24


def test_default_worker_count_leaves_a_core_to_the_trainer(caplog):
    assert [default_num_workers(c) for c in (1, 2, 16, 240)] == [0, 1, 15, 32]
    assert resolve_num_workers(-1, cores=16) == 15 and resolve_num_workers(0, cores=16) == 0
    with pytest.raises(ValueError, match="num_workers=-5: use -1"):
        resolve_num_workers(-5, cores=16)
    assert resolve_num_workers(64, cores=2) == 64 and "64 on a host with 2 cores" in caplog.text


def test_a_killed_worker_is_named_as_such(source):
    import signal

    import psutil

    it = iterator(source, config(num_workers=WORKERS))
    take(it, 1)
    workers = [p for p in psutil.Process().children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline())]
    assert workers
    for p in workers:
        p.send_signal(signal.SIGKILL)
    with pytest.raises(RuntimeError, match="input worker process killed by SIGKILL.*"
                                           "num_workers"):
        take(it, 50)
    it.close()
