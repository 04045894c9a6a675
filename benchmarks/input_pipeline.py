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

Unless ``--no-read-build``, also (under ``read_and_build``, ~1 min):

* ``read_local`` / ``read_gcs_emulator``: clips/s and MB/s (of serialized records) of the
  in-process pipeline (``num_workers=0``) with 1 and 2 reader threads (``cycle_length``) on
  10 s AudioSet-like clips (1001 x 80 float32), from local disk and from a local GCS emulator
  through the same gs:// code path a TPU VM uses;
* ``build``: shard-building clips/s (decode 44.1 kHz flac + resample to 16 kHz + log-mel +
  write) with one worker process and with one per core.
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
    sys.path.insert(0, REPO)
    from mwmae.data import ShardSet

    manifest = ShardSet(os.path.join(folder, "shards"), "data").manifest
    if os.path.exists(manifest):
        return manifest
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-m", "mwmae.demo.corpus", os.path.join(folder, "corpus"),
                    "--clips", "1200"], check=True, env=env, cwd=REPO)
    subprocess.run([sys.executable, "-m", "tfrecord_tools.build", "folder",
                    os.path.join(folder, "corpus"), "--out", os.path.join(folder, "shards"),
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
    it = make_input_iterator(manifest, PipelineConfig(**kw), process_index=0, process_count=1)
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


# ------------------------------------------------------------------ 10 s clips, GCS, build


def _write_record_shards(folder: str, clips: int, frames: int, per_shard: int):
    """Shards of random log-mels; returns (manifest path, bytes of serialized records)."""
    import numpy as np

    from mwmae.data import ShardSet, records

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, total = ["shard,num_records"], 0
    num_shards = -(-clips // per_shard)
    for s in range(num_shards):
        name = f"bench-{s:05d}-of-{num_shards:05d}.tfrecord"
        n = min(per_shard, clips - s * per_shard)
        with open(os.path.join(folder, name), "wb") as f:
            writer = records.TFRecordWriter(f)
            for _ in range(n):
                logmel = (rng.standard_normal((frames, 80)) - 6).astype(np.float32)
                record = records.encode_example(logmel, [int(rng.integers(527))])
                total += len(record)
                writer.write(record)
            writer.close()
        rows.append(f"{name},{n}")
    manifest = ShardSet(folder, "bench").manifest
    with open(manifest, "w") as f:
        f.write("\n".join(rows) + "\n")
    return manifest, total


def _measure_read(manifest: str, clips: int, record_bytes: float, threads: int) -> dict:
    from mwmae.data import PipelineConfig, make_input_iterator

    batch = 32
    cfg = PipelineConfig(global_batch_size=batch, seed=0, shuffle_buffer=256,
                         cycle_length=threads, prefetch_batches=2, num_workers=0)
    it = make_input_iterator(manifest, cfg, process_index=0, process_count=1)
    next(it)  # open files, start threads (and fill the 256-clip shuffle window)
    steps = max(1, 2 * clips // batch)  # two passes: the pre-filled window is a small part
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    seconds = time.perf_counter() - start
    it.close()
    rate = steps * batch / seconds
    return {"threads": threads, "clips_per_s": round(rate, 1),
            "MB_per_s": round(rate * record_bytes / 1e6, 1)}


def _measure_build(folder: str, clips: int, seconds: float, workers: int) -> dict:
    import numpy as np

    from tfrecord_tools import build as build_lib
    from tfrecord_tools import sources

    audio = os.path.join(folder, "audio")
    if not os.path.isdir(audio):
        import soundfile

        os.makedirs(audio)
        rng = np.random.default_rng(1)
        t = np.arange(int(seconds * 44100)) / 44100
        for i in range(clips):
            x = 0.3 * np.sin(2 * np.pi * (100 + 7 * i) * t) + 0.05 * rng.standard_normal(t.size)
            soundfile.write(os.path.join(audio, f"clip{i:05d}.flac"), x.astype(np.float32), 44100)
    summary = build_lib.build(sources.from_folder(audio), build_lib.BuildOptions(
        output=os.path.join(folder, f"shards-{workers}"), shard_size=max(1, clips // 8),
        workers=workers, progress=False))
    return {"workers": summary["workers"], "clips": summary["records"],
            "clips_per_s": summary["clips_per_second"]}


def read_and_build(folder: str, *, gcs: bool, clips: int = 512, build_clips: int = 96,
                   seconds: float = 10.0) -> dict:
    """The 10 s-clip read figures (local disk, GCS emulator) and the shard-building rate."""
    sys.path.insert(0, REPO)
    frames = 1 + int(seconds * 16000) // 160
    cores = os.cpu_count() or 1
    out: dict = {"clip_seconds": seconds, "frames": frames,
                 "load_average_before": os.getloadavg()}
    manifest, total = _write_record_shards(os.path.join(folder, "records"), clips, frames,
                                           per_shard=max(1, clips // 8))
    record_bytes = total / clips
    out["record_bytes"] = int(record_bytes)
    out["read_local"] = [_measure_read(manifest, clips, record_bytes, t) for t in (1, 2)]
    if gcs:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        import gcs_emulator

        from mwmae.data import ShardSet, storage

        with gcs_emulator.emulated_gcs():
            bucket = "gs://test-bucket/bench"
            for name in os.listdir(os.path.join(folder, "records")):
                storage.put_file(os.path.join(folder, "records", name), f"{bucket}/{name}")
            out["read_gcs_emulator"] = [
                _measure_read(ShardSet(bucket, "bench").manifest, clips, record_bytes, t)
                for t in (1, 2)]
    out["build"] = [_measure_build(folder, build_clips, seconds, w) for w in sorted({1, cores})]
    out["load_average_after"] = os.getloadavg()
    return out


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
    p.add_argument("--no-read-build", action="store_true",
                   help="skip the 10 s-clip read (local, GCS emulator) and shard-build figures")
    p.add_argument("--no-gcs", action="store_true", help="skip the GCS emulator read")
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
                result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
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
        if not args.no_read_build:
            out["read_and_build"] = read_and_build(os.path.join(tmp, "rb"), gcs=not args.no_gcs)
        if "tf.data" in summary:
            best = max((v["clips_per_s"], k) for k, v in summary.items() if k.startswith("mwmae"))
            out["best_mwmae"] = best[1]
            out["best_over_tf_data"] = round(best[0] / summary["tf.data"]["clips_per_s"], 3)
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
