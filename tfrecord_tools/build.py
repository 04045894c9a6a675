"""Build log-mel shards from audio: ``python -m tfrecord_tools.build SOURCE ... --out DIR``.

Sources (subcommands):

* ``folder DIR [--labels-from-subfolder]``: every audio file under DIR;
* ``csv MANIFEST.csv [--audio-root DIR] [--vocabulary CSV]``: rows of ``path,labels``;
* ``audioset --segments CSV [CSV...] --audio-dir DIR --class-labels class_labels_indices.csv``;
* ``fsd50k --root DIR --split dev|train|val|eval``;
* ``hear TASK_DIR --split train|valid|test``: one split of a HEAR scene task, with its labels
  (shards for ``python -m mwmae.finetune``).

Each clip is decoded (libsndfile: wav, flac, mp3, ogg, ...), downmixed, resampled to 16 kHz and
turned into a float32 [frames, 80] log-mel (``mwmae.audio``), stored in the original project's
record schema (``mwmae.data.records``). Shard i holds items i*S .. (i+1)*S-1 of the listing in
its fixed order, so a rerun with the same inputs rebuilds the same shards: finished shards are
skipped (a shard is written under a temporary name, renamed, and only then marked done), so an
interrupted build resumes where it stopped.

Output, beside the shards (``PREFIX-00000-of-00012.tfrecord`` ...):
``PREFIX-manifest.csv`` (shard,num_records), ``PREFIX-rejects.csv`` (path,reason),
``PREFIX-labels.csv`` (index,label) when the source names its labels, ``PREFIX-clip-labels.csv``
(shard,record,labels: every record's label ids, for class-balanced sampling), ``PREFIX-build.json``
(the build's settings, checked on resume) and ``_build/`` (one small file per finished shard).
A JSON summary goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

from mwmae import cli
from mwmae.data import records, storage
from mwmae.data.shards import ARRAY_RECORD, FORMATS, TFRECORD
from tfrecord_tools import sources
from tfrecord_tools.decode import DecodeError, file_to_logmel

DEFAULT_SHARD_SIZE = 512
DEFAULT_ARRAY_RECORD_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    output: str
    shard_size: int = DEFAULT_SHARD_SIZE
    format: str = TFRECORD
    prefix: str = "data"
    workers: int = 0  # 0: all CPU cores; 1: in this process
    compression: str | None = "zlib"  # TFRecord only
    max_seconds: float | None = None
    array_record_options: str = DEFAULT_ARRAY_RECORD_OPTIONS
    progress: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    index: int
    name: str
    items: tuple[sources.Item, ...]
    options: BuildOptions


def shard_name(prefix: str, index: int, count: int, fmt: str) -> str:
    ext = "array_record" if fmt == ARRAY_RECORD else "tfrecord"
    return f"{prefix}-{index:05d}-of-{count:05d}.{ext}"


def _done_marker(options: BuildOptions, name: str) -> str:
    return storage.join(options.output, "_build", name + ".json")


def _write_records(task: _ShardTask, path: str
                   ) -> tuple[int, int, list[tuple[str, str]], list[list[int]]]:
    rejects: list[tuple[str, str]] = []
    labels: list[list[int]] = []  # of every record written, in order
    count = size = 0

    def encoded():
        for item in task.items:
            try:
                logmel = file_to_logmel(item.path, max_seconds=task.options.max_seconds)
            except (DecodeError, ValueError, OSError) as e:
                rejects.append((item.path, str(e) or type(e).__name__))
                continue
            labels.append(list(item.labels))
            yield records.encode_example(logmel, item.labels)

    if task.options.format == ARRAY_RECORD:
        from array_record.python.array_record_module import ArrayRecordWriter

        writer = ArrayRecordWriter(path, task.options.array_record_options)
        try:
            for record in encoded():
                writer.write(record)
                count, size = count + 1, size + len(record)
        finally:
            writer.close()
        return count, size, rejects, labels
    with open(path, "wb") as f:
        writer = records.TFRecordWriter(f, compression=task.options.compression)
        for record in encoded():
            writer.write(record)
            count, size = count + 1, size + len(record)
        writer.close()
    return count, size, rejects, labels


def write_shard(task: _ShardTask) -> dict:
    """Builds one shard and marks it done; runs in a worker process."""
    start = time.perf_counter()
    final = storage.join(task.options.output, task.name)
    remote = storage.is_remote(final)
    tmp_dir = tempfile.mkdtemp(prefix="shard-") if remote else None
    # Local: a temporary name in the destination folder, so the rename cannot cross devices.
    tmp = os.path.join(tmp_dir, task.name) if remote else f"{final}.tmp-{os.getpid()}"
    try:
        count, size, rejects, labels = _write_records(task, tmp)
        if remote:
            storage.put_file(tmp, final)  # a GCS object appears only once fully uploaded
        else:
            storage.replace(tmp, final)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    done = {
        "shard": task.name,
        "num_records": count,
        "record_bytes": size,
        "rejects": rejects,
        "labels": labels,
        "seconds": time.perf_counter() - start,
    }
    storage.write_text(_done_marker(task.options, task.name), json.dumps(done))
    return done


def _listing_digest(listing: sources.Listing) -> str:
    h = hashlib.sha256()
    for item in listing.items:
        h.update(json.dumps([item.path, list(item.labels)]).encode())
    return h.hexdigest()


def _check_or_write_build_info(listing: sources.Listing, options: BuildOptions,
                               num_shards: int) -> None:
    info = {
        "format": options.format,
        "shard_size": options.shard_size,
        "num_shards": num_shards,
        "num_items": len(listing.items),
        "items_sha256": _listing_digest(listing),
        "compression": options.compression if options.format == TFRECORD else None,
        "max_seconds": options.max_seconds,
        "feature": "log-mel float32 [frames, 80], 16 kHz, n_fft 400, hop 160, 50-8000 Hz",
    }
    path = storage.join(options.output, f"{options.prefix}-build.json")
    if storage.exists(path):
        previous = json.loads(storage.read_text(path))
        if previous != info:
            changed = sorted(k for k in info if previous.get(k) != info[k])
            raise ValueError(
                f"{path} records a different build (differs in {changed}); resume needs the "
                "same inputs and settings: use a new --out or --prefix"
            )
        return
    storage.write_text(path, json.dumps(info, indent=1))


def _finished(options: BuildOptions, name: str) -> dict | None:
    marker = _done_marker(options, name)
    if not storage.exists(marker):
        return None
    if not storage.exists(storage.join(options.output, name)):
        return None  # marked but deleted since: build it again
    return json.loads(storage.read_text(marker))


def _clean_stale_temporaries(options: BuildOptions) -> None:
    if storage.is_remote(options.output) or not os.path.isdir(options.output):
        return
    for name in os.listdir(options.output):
        if name.startswith(options.prefix + "-") and ".tmp-" in name:
            os.remove(os.path.join(options.output, name))


def _csv_text(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@contextlib.contextmanager
def _single_threaded_children():
    # One process per core already fills the machine; BLAS/OpenMP threads inside each worker
    # would only oversubscribe it. Children read these at start; this process is unaffected.
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ.setdefault(n, "1")
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)


def build(listing: sources.Listing, options: BuildOptions) -> dict:
    """Builds (or finishes building) the shards of ``listing``; returns the summary."""
    start = time.perf_counter()
    if not listing.items:
        raise ValueError("nothing to build: the source lists no audio")
    storage.makedirs(options.output)
    num_shards = math.ceil(len(listing.items) / options.shard_size)
    _check_or_write_build_info(listing, options, num_shards)
    _clean_stale_temporaries(options)

    results: dict[int, dict] = {}
    todo: list[_ShardTask] = []
    for i in range(num_shards):
        name = shard_name(options.prefix, i, num_shards, options.format)
        done = _finished(options, name)
        if done is not None:
            results[i] = done
            continue
        chunk = listing.items[i * options.shard_size : (i + 1) * options.shard_size]
        todo.append(_ShardTask(i, name, tuple(chunk), options))

    from tqdm import tqdm

    workers = options.workers or os.cpu_count() or 1
    bar = tqdm(total=sum(len(t.items) for t in todo), unit="clip", disable=not options.progress,
               file=sys.stderr, desc="log-mel shards")
    if workers == 1 or len(todo) <= 1:
        for task in todo:
            results[task.index] = write_shard(task)
            bar.update(len(task.items))
    else:
        # spawn: workers start clean rather than inheriting a parent's threads (fork + threads
        # can deadlock), at the price of an import each.
        context = multiprocessing.get_context("spawn")
        with _single_threaded_children(), context.Pool(min(workers, len(todo))) as pool:
            by_name = {t.name: t for t in todo}
            for done in pool.imap_unordered(write_shard, todo):
                task = by_name[done["shard"]]
                results[task.index] = done
                bar.update(len(task.items))
    bar.close()

    ordered = [results[i] for i in range(num_shards)]
    manifest = [(d["shard"], d["num_records"]) for d in ordered if d["num_records"] > 0]
    rejects = [tuple(r) for d in ordered for r in d["rejects"]]
    rejects += [(entry, reason) for entry, reason in listing.missing]
    prefix = storage.join(options.output, options.prefix)
    storage.write_text(f"{prefix}-manifest.csv", _csv_text(("shard", "num_records"), manifest))
    storage.write_text(f"{prefix}-rejects.csv", _csv_text(("path", "reason"), rejects))
    if listing.vocabulary is not None:
        storage.write_text(f"{prefix}-labels.csv",
                           _csv_text(("index", "label"), list(enumerate(listing.vocabulary))))
    # Every record's labels without reading the shards: what class-balanced sampling weighs
    # clips by (shards marked done by an older version lack them: no table then).
    if any(item.labels for item in listing.items) and all("labels" in d for d in ordered):
        storage.write_text(f"{prefix}-clip-labels.csv", _csv_text(
            ("shard", "record", "labels"),
            [(d["shard"], r, ";".join(map(str, ids)))
             for d in ordered for r, ids in enumerate(d["labels"])]))
    seconds = time.perf_counter() - start
    built = [results[t.index] for t in todo]
    clips_built = sum(d["num_records"] for d in built)
    return {
        "output": options.output,
        "manifest": f"{prefix}-manifest.csv",
        "format": options.format,
        "shards": num_shards,
        "shards_built": len(todo),
        "shards_resumed": num_shards - len(todo),
        "records": sum(d["num_records"] for d in ordered),
        "rejected": len(rejects),
        "rejects_csv": f"{prefix}-rejects.csv",
        "seconds": round(seconds, 3),
        "clips_per_second": round(clips_built / seconds, 2) if seconds > 0 else None,
        "workers": workers,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfrecord_tools.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", dest="output", required=True, help="local folder or gs://bucket/path")
    common.add_argument("--format", choices=FORMATS, default=TFRECORD)
    common.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="clips per shard")
    common.add_argument("--prefix", default="data", help="shard file name prefix")
    common.add_argument("--workers", type=int, default=0,
                        help="processes (0: one per CPU core; 1: no subprocesses)")
    common.add_argument("--compression", choices=("zlib", "none"), default="zlib",
                        help="TFRecord compression (the original used zlib)")
    common.add_argument(
        "--array-record-options", default=DEFAULT_ARRAY_RECORD_OPTIONS,
        help="ArrayRecord writer options (default %(default)s). The trainer reads ArrayRecord "
             "by index, in a shuffle over all clips; a read decompresses the whole chunk that "
             "holds the record, so with group_size:G each clip read costs G clips of "
             "decompression and I/O. Float32 log-mels compress little anyway, so one record "
             "per chunk is the layout that fits that read.")
    common.add_argument("--max-seconds", type=float, default=None,
                        help="keep at most this much of each file")
    common.add_argument("--no-progress", action="store_true")
    sub = p.add_subparsers(dest="source", required=True)
    f = sub.add_parser("folder", parents=[common], help="every audio file under a folder")
    f.add_argument("root")
    f.add_argument("--labels-from-subfolder", action="store_true",
                   help="label each file by its first-level subfolder")
    c = sub.add_parser("csv", parents=[common], help="a CSV of path,labels")
    c.add_argument("manifest")
    c.add_argument("--audio-root", default=None)
    c.add_argument("--vocabulary", default=None, help="index,label CSV for label names")
    a = sub.add_parser("audioset", parents=[common], help="AudioSet segment CSVs")
    a.add_argument("--segments", nargs="+", required=True)
    a.add_argument("--audio-dir", required=True)
    a.add_argument("--class-labels", required=True, help="class_labels_indices.csv")
    d = sub.add_parser("fsd50k", parents=[common], help="FSD50K ground truth + audio folders")
    d.add_argument("--root", required=True)
    d.add_argument("--split", choices=sources.FSD50K_SPLITS, required=True)
    h = sub.add_parser("hear", parents=[common], help="one split of a HEAR scene task")
    h.add_argument("task_dir")
    h.add_argument("--split", choices=sources.HEAR_SPLITS, required=True)
    return p


def listing_from_args(args: argparse.Namespace) -> sources.Listing:
    if args.source == "folder":
        return sources.from_folder(args.root, labels_from_subfolder=args.labels_from_subfolder)
    if args.source == "csv":
        return sources.from_csv(args.manifest, audio_root=args.audio_root,
                                vocabulary_csv=args.vocabulary)
    if args.source == "audioset":
        return sources.from_audioset(args.segments, args.audio_dir, args.class_labels)
    if args.source == "hear":
        return sources.from_hear(args.task_dir, args.split)
    return sources.from_fsd50k(args.root, args.split)


def main(argv: Sequence[str] | None = None) -> int:
    args = cli.parse_args(_parser(), argv)
    options = BuildOptions(
        output=args.output, shard_size=args.shard_size, format=args.format, prefix=args.prefix,
        workers=args.workers, compression=None if args.compression == "none" else "zlib",
        max_seconds=args.max_seconds, array_record_options=args.array_record_options,
        progress=not args.no_progress,
    )
    summary = build(listing_from_args(args), options)
    print(json.dumps(summary, indent=1))
    if summary["rejected"]:
        print(f"{summary['rejected']} file(s) rejected: see {summary['rejects_csv']}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
