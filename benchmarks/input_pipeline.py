"""Input pipeline and shard-building throughput; prints JSON.

    python benchmarks/input_pipeline.py [--clips 512] [--seconds 10] [--no-gcs]

* ``read``: clips/s and MB/s (of serialized records) that the training pipeline delivers
  (read + zlib + parse + normalise + random 200-frame crop + shuffle + batch), for 1 and 2
  reader threads (``cycle_length``), from local disk and from a local GCS emulator through the
  same gs:// code path a TPU VM uses. Records hold 10 s AudioSet-like clips (1001 x 80 float32).
* ``build``: shard-building clips/s (decode flac + resample 44.1 -> 16 kHz + log-mel + write),
  with one worker process and with one per core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mwmae.data import PipelineConfig, make_input_iterator, records  # noqa: E402
from tfrecord_tools import build as build_lib  # noqa: E402
from tfrecord_tools import sources  # noqa: E402


def write_record_shards(folder: str, clips: int, frames: int, per_shard: int) -> tuple[str, int]:
    """Shards of random log-mels; returns (manifest path, bytes of serialized records)."""
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
    manifest = os.path.join(folder, "bench-manifest.csv")
    with open(manifest, "w") as f:
        f.write("\n".join(rows) + "\n")
    return manifest, total


def measure_read(manifest: str, clips: int, record_bytes: float, threads: int) -> dict:
    batch = 32
    cfg = PipelineConfig(global_batch_size=batch, seed=0, shuffle_buffer=256,
                         cycle_length=threads, prefetch_batches=2)
    it = make_input_iterator(manifest, cfg, process_index=0, process_count=1, as_numpy=True)
    next(it)  # open files, start threads
    steps = max(1, clips // batch - 1)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    seconds = time.perf_counter() - start
    it.close()
    rate = steps * batch / seconds
    return {"threads": threads, "clips_per_s": round(rate, 1),
            "MB_per_s": round(rate * record_bytes / 1e6, 1)}


def measure_build(folder: str, clips: int, seconds: float, workers: int) -> dict:
    audio = os.path.join(folder, "audio")
    if not os.path.isdir(audio):
        import soundfile

        os.makedirs(audio)
        rng = np.random.default_rng(1)
        t = np.arange(int(seconds * 44100)) / 44100
        for i in range(clips):
            x = 0.3 * np.sin(2 * np.pi * (100 + 7 * i) * t) + 0.05 * rng.standard_normal(t.size)
            soundfile.write(os.path.join(audio, f"clip{i:05d}.flac"), x.astype(np.float32), 44100)
    listing = sources.from_folder(audio)
    summary = build_lib.build(listing, build_lib.BuildOptions(
        output=os.path.join(folder, f"shards-{workers}"), shard_size=max(1, clips // 8),
        workers=workers, progress=False))
    return {"workers": summary["workers"], "clips": summary["records"],
            "clips_per_s": summary["clips_per_second"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=512, help="clips per read measurement")
    p.add_argument("--build-clips", type=int, default=96)
    p.add_argument("--seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--no-gcs", action="store_true", help="skip the emulator measurements")
    args = p.parse_args()
    frames = 1 + int(args.seconds * 16000) // 160
    cores = os.cpu_count() or 1
    out: dict = {"cpu_cores": cores, "clip_seconds": args.seconds, "frames": frames}
    with tempfile.TemporaryDirectory() as tmp:
        manifest, total = write_record_shards(os.path.join(tmp, "records"), args.clips, frames,
                                              per_shard=max(1, args.clips // 8))
        record_bytes = total / args.clips
        out["record_bytes"] = int(record_bytes)
        out["shard_bytes_on_disk"] = sum(
            os.path.getsize(os.path.join(tmp, "records", n))
            for n in os.listdir(os.path.join(tmp, "records")) if n.endswith(".tfrecord"))
        out["read_local"] = [measure_read(manifest, args.clips, record_bytes, t) for t in (1, 2)]
        if not args.no_gcs:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            import gcs_emulator

            from mwmae.data import storage

            with gcs_emulator.emulated_gcs():
                folder = "gs://test-bucket/bench"
                for name in os.listdir(os.path.join(tmp, "records")):
                    storage.put_file(os.path.join(tmp, "records", name), f"{folder}/{name}")
                out["read_gcs_emulator"] = [
                    measure_read(f"{folder}/bench-manifest.csv", args.clips, record_bytes, t)
                    for t in (1, 2)
                ]
        out["build"] = [measure_build(tmp, args.build_clips, args.seconds, w)
                        for w in sorted({1, cores})]
    best = max(r["clips_per_s"] for r in out["read_local"])
    out["read_local_clips_per_s_per_core"] = round(best / cores, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
