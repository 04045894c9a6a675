"""Two processes x 4 CPU devices (jax.distributed on localhost) reading one set of shards.

The test writes shards, starts this file twice as a worker (process 0 and 1), and checks what
the workers report: an epoch covers every clip exactly once across hosts, the global batch is
split over the batch axis, and a finite pass ends on the same step on both hosts.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(port: int, process_id: int, train_manifest: str, eval_manifest: str,
            out_path: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 4)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from mwmae.data import PipelineConfig, make_input_iterator, to_global

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    report: dict = {"devices": jax.device_count(), "local_devices": jax.local_device_count()}
    cfg = PipelineConfig(global_batch_size=8, seed=7, shuffle_buffer=4, cycle_length=2,
                         max_labels=1)
    it = make_input_iterator(train_manifest, cfg)
    shardings = {"audio": NamedSharding(mesh, PartitionSpec("data", None, None, None)),
                 "label": NamedSharding(mesh, PartitionSpec("data", None))}
    labels, rows = [], []
    for _ in range(3):  # 24 clips / 8 = one epoch
        batch = to_global(next(it), shardings, 8)
        labels.append(multihost_utils.process_allgather(batch["label"], tiled=True)[:, 0]
                      .tolist())
        rows.append(sorted((s.index[0].start, s.index[0].stop)
                           for s in batch["audio"].addressable_shards))
        report["shape"] = list(batch["audio"].shape)
        report["spec_is_data"] = batch["audio"].sharding.spec == shardings["audio"].spec
        audio = multihost_utils.process_allgather(batch["audio"], tiled=True)
        report["finite"] = bool(np.isfinite(audio).all())
    report["epoch_labels"], report["rows"] = labels, rows
    # Batch axes that stay inside each host: both hosts would have to supply the same rows.
    per_host = jax.make_mesh((2, 4), ("hosts", "data"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    try:
        to_global({"label": np.zeros((4, 1), np.int32)},
                  {"label": NamedSharding(per_host, PartitionSpec("data", None))}, 8)
        report["refused"] = ""
    except ValueError as e:
        report["refused"] = str(e)
    report["state"] = it.get_state()

    # 5 shards over 2 hosts: 12 and 8 clips, so both stop after min(12, 8) // 4 = 2 batches.
    ev = make_input_iterator(eval_manifest, PipelineConfig(global_batch_size=8, train=False,
                                                           max_labels=1),
                             )
    report["eval_steps"] = sum(1 for _ in ev)
    multihost_utils.sync_global_devices("done")
    with open(out_path, "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    portpicker = pytest.importorskip("portpicker")
    sys.path.insert(0, HERE)
    from test_data import write_dataset

    root = tmp_path_factory.mktemp("multihost")
    train = write_dataset(root / "train", num_shards=4, per_shard=6)
    evaluation = write_dataset(root / "eval", num_shards=5, per_shard=4)
    port = portpicker.pick_unused_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs, outs = [], []
    for pid in range(2):
        out = root / f"report{pid}.json"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, str(port), str(pid), train, evaluation, str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process input pipeline timed out (a host waiting on another)")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return [json.loads(o.read_text()) for o in outs]


def test_epoch_covers_every_clip_once_across_hosts(results):
    a, b = results
    assert a["devices"] == 8 and a["local_devices"] == 4
    assert a["epoch_labels"] == b["epoch_labels"]  # both see the same global batches
    seen = [k for batch in a["epoch_labels"] for k in batch]
    assert sorted(seen) == list(range(24))
    assert a["state"]["process_index"] == 0 and b["state"]["process_index"] == 1


def test_global_batch_sharding(results):
    a, b = results
    assert a["shape"] == [8, 200, 80, 1] and a["spec_is_data"]
    assert "rows, not 4: the batch axes must span all 2 processes" in a["refused"]
    assert a["finite"]
    # Each process holds its own 4 rows, one per local device.
    assert a["rows"][0] == [[0, 1], [1, 2], [2, 3], [3, 4]]
    assert b["rows"][0] == [[4, 5], [5, 6], [6, 7], [7, 8]]


def test_finite_pass_stops_together_on_unequal_hosts(results):
    assert [r["eval_steps"] for r in results] == [2, 2]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
