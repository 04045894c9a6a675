"""Input pipeline throughput on the demo's shards: mwmae.data per worker count vs tf.data.

    python benchmarks/input_pipeline.py [--shards DIR] [--batches 300] [--workers 0,1,2]
                                        [--rounds 2] [--today-ref main]

Builds the demo's shards (12 x 100 clips of 2.5 s, ZLIB TFRecord) into DIR (a temporary folder by
default) unless a manifest is there, then, in one run, alternating settings round after round so
that other load on the machine hits all of them alike, measures each pipeline alone in a fresh
process over ``--batches`` batches of 64 (300 batches = 16 passes over the shards, so epoch
boundaries count):

* ``mwmae num_workers=N`` for each N: this repository's pipeline;
* ``today``: the pipeline of git ref ``--today-ref`` (the in-process pipeline before worker
  processes), exported to a temporary folder and run the same way;
* ``tf.data``: the original's way of reading the same shards: ``TFRecordDataset`` (ZLIB),
  ``parse_single_example``, ``parse_tensor``, per-clip mean/std, a random 200-frame crop, files
  interleaved with AUTOTUNE, shuffle, batch.

All use a 512-clip shuffle. Printed (JSON): clips/s (median over rounds, and each round),
CPU-seconds per 1,000 clips (the process and its worker processes, measured over the timed
batches only) and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64
SHUFFLE = 512
WARMUP_BATCHES = 5


def build_demo_shards(folder: str) -> str:
    manifest = os.path.join(folder, "shards", "data-manifest.csv")
    if os.path.exists(manifest):
        return manifest
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-m", "mwmae.demo.corpus", os.path.join(folder, "corpus"),
                    "--clips", "1200"], check=True, env=env, cwd=REPO)
    subprocess.run([sys.executable, "-m", "tfrecord_tools.build", "folder",
                    os.path.join(folder, "corpus"), "--output", os.path.join(folder, "shards"),
                    "--shard-size", "100", "--workers", "2", "--labels-from-subfolder"],
                   check=True, env=env, cwd=REPO)
    return manifest


# ----------------------------------------------------------------------------- one measurement


def _cpu_seconds() -> float:
    """CPU time of this process and all its live descendants (worker processes)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _mwmae_batches(manifest: str, workers: int, code_root: str):
    sys.path.insert(0, code_root)
    from mwmae.data import PipelineConfig, make_input_iterator

    kw = dict(global_batch_size=BATCH, seed=0, shuffle_buffer=SHUFFLE, cycle_length=4,
              max_labels=4)
    if workers >= 0:
        kw["num_workers"] = workers
    it = make_input_iterator(manifest, PipelineConfig(**kw), process_index=0, process_count=1,
                             as_numpy=True)
    return lambda: next(it)["audio"], it.close


def _tf_batches(manifest: str):
    import csv

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    folder = os.path.dirname(manifest)
    with open(manifest) as f:
        paths = [os.path.join(folder, row["shard"]) for row in csv.DictReader(f)]
    spec = {"audio": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.VarLenFeature(tf.int64)}

    def prepare(serialized):
        example = tf.io.parse_single_example(serialized, spec)
        x = tf.io.parse_tensor(example["audio"], tf.float32)
        x = (x - tf.reduce_mean(x)) / (tf.math.reduce_std(x) + 1e-8)
        frames = tf.shape(x)[0]
        pad = tf.maximum(0, 200 - frames)
        x = tf.pad(x, [[0, pad], [0, 0]])
        start = tf.random.uniform([], 0, tf.shape(x)[0] - 200 + 1, dtype=tf.int32)
        return x[start:start + 200, :, None]

    files = tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths)).repeat()
    ds = files.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="ZLIB").map(prepare),
        cycle_length=tf.data.AUTOTUNE, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.shuffle(SHUFFLE).batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    it = iter(ds)
    return lambda: next(it).numpy(), lambda: None


def measure(setting: str, manifest: str, batches: int, code_root: str) -> dict:
    if setting == "tf.data":
        next_batch, close = _tf_batches(manifest)
    else:
        workers = int(setting.split("=")[1]) if "=" in setting else -1
        next_batch, close = _mwmae_batches(manifest, workers, code_root)
    for _ in range(WARMUP_BATCHES):  # processes started, files open, buffers full
        batch = next_batch()
    assert batch.shape == (BATCH, 200, 80, 1), batch.shape
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next_batch()
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    close()
    clips = batches * BATCH
    return {"clips_per_s": round(clips / seconds, 1),
            "cpu_s_per_1000_clips": round(1000 * cpu / clips, 3)}


# ----------------------------------------------------------------------------- driver


def export_ref(ref: str, folder: str) -> str:
    """``mwmae/`` as of git ``ref``, unpacked under ``folder``."""
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "mwmae"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="folder for the demo corpus and shards (default: temporary)")
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--workers", default=None, help="comma-separated worker counts "
                   "(default: 0, 1, 2, and up to the core count in powers of two)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--today-ref", default="", help="git ref of the pipeline to compare with "
                   "in process (empty: skip)")
    p.add_argument("--no-tf", action="store_true", help="skip the tf.data baseline")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--code-root", default=REPO, help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a child: one measurement, JSON on the last line
        print(json.dumps(measure(args.one, args.manifest, args.batches, args.code_root)))
        return

    cores = os.cpu_count() or 1
    if args.workers:
        counts = [int(w) for w in args.workers.split(",")]
    else:
        counts = sorted({0, 1, 2, *(w for w in (4, 8, 16, 32) if w <= cores)})
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build_demo_shards(args.shards or tmp)
        settings = [(f"mwmae num_workers={w}", REPO) for w in counts]
        if args.today_ref:
            root = export_ref(args.today_ref, tempfile.mkdtemp(dir=tmp))
            settings.append((f"today ({args.today_ref})", root))
        if not args.no_tf:
            settings.append(("tf.data", REPO))
        out: dict = {"cpu_cores": cores, "batch": BATCH, "batches": args.batches,
                     "shuffle": SHUFFLE, "manifest": "demo shards (12 x 100 clips of 2.5 s)",
                     "load_average_before": os.getloadavg(), "results": {}}
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
        for r in range(args.rounds):
            for name, root in settings:
                one = "tf.data" if name == "tf.data" else (
                    name.split()[-1] if name.startswith("mwmae") else "in-process")
                cmd = [sys.executable, os.path.abspath(__file__), "--one", one,
                       "--manifest", manifest, "--batches", str(args.batches),
                       "--code-root", root]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                if done.returncode:
                    raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                out["results"].setdefault(name, []).append(result)
                print(f"round {r + 1}: {name}: {result}", file=sys.stderr)
        out["load_average_after"] = os.getloadavg()
        summary = {}
        for name, runs in out["results"].items():
            summary[name] = {
                "clips_per_s": statistics.median(x["clips_per_s"] for x in runs),
                "cpu_s_per_1000_clips": statistics.median(x["cpu_s_per_1000_clips"]
                                                          for x in runs)}
        out["median"] = summary
        if "tf.data" in summary:
            best = max((v["clips_per_s"], k) for k, v in summary.items() if k.startswith("mwmae"))
            out["best_mwmae"] = best[1]
            out["best_over_tf_data"] = round(best[0] / summary["tf.data"]["clips_per_s"], 3)
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
