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

A finished shard is reused only when its done marker proves it is this build's: the marker keeps
a fingerprint of the settings and of the shard's clips (paths, labels, and for local files their
size and modification time), and ``PREFIX-build.json``, when present, must record the same build.
Anything of the prefix already in ``--out`` that does not match (another build's shards or
markers, clips changed since, a damaged build.json) refuses the build with one line naming the
folder and the difference, and nothing there is touched. A shard whose file no longer has the
size its marker recorded (truncated, half-copied) is built again.

One builder at a time per ``--out`` and prefix: a local ``--out`` is locked (``_build/PREFIX.lock``,
held with flock, so a builder that died holds nothing); a second one is refused, naming the
holder. A gs:// ``--out`` is not locked.

Refusals (bad flags, unreadable inputs, output that would overwrite an input or another build)
print one line ``error: ...`` to stderr, last, and exit with status 2; a build in which no clip
could be encoded writes its rejects and exits with status 1.

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
import errno
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from mwmae import audio as audio_lib
from mwmae import cli
from mwmae.data import records, storage
from mwmae.data.shard_set import ShardSet
from mwmae.data.shards import ARRAY_RECORD, FORMATS, TFRECORD
from tfrecord_tools import sources
from tfrecord_tools.decode import DecodeError, file_to_logmel

DEFAULT_SHARD_SIZE = 512
DEFAULT_ARRAY_RECORD_OPTIONS = "group_size:1"
# The shortest cut that still leaves a clip one analysis window (more samples than n_fft // 2).
MIN_SECONDS = (audio_lib.N_FFT // 2 + 1) / audio_lib.SAMPLE_RATE
MAX_WORKERS_PER_CORE = 4  # beyond this, more processes only queue for the same cores
# The set's files a build writes after its shards (build_record is written first).
_SIDE_KINDS = ("manifest", "rejects", "labels", "clip_labels")


class BuildRefused(ValueError):
    """A build that would mix, lose or overwrite something, or cannot start; the message is one
    line naming the file or flag and the problem."""


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
            raise BuildRefused(f"--format must be one of {FORMATS}, got {self.format!r}")
        if self.shard_size < 1:
            raise BuildRefused(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.workers < 0:
            raise BuildRefused(f"--workers must be >= 0 (0: one per CPU core), got {self.workers}")
        if self.compression not in ("zlib", None):
            raise BuildRefused(f"compression must be 'zlib' or None, got {self.compression!r}")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds)
                                                 and self.max_seconds >= MIN_SECONDS):
            raise BuildRefused(f"--max-seconds must be a finite number >= {MIN_SECONDS:g} (one "
                               f"analysis window), got {self.max_seconds}")
        problem = _prefix_problem(self.prefix)
        if problem:
            raise BuildRefused(f"--prefix {self.prefix!r}: {problem}")


def _prefix_problem(prefix: str) -> str | None:
    if not prefix:
        return "empty"
    if prefix in (".", "..") or any(c in prefix for c in "/\\*?[") or prefix != prefix.strip():
        return "a file name prefix, without / \\ * ? [ or surrounding spaces"
    return None


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    index: int
    name: str
    items: tuple[sources.Item, ...]
    options: BuildOptions
    identity: dict  # what the done marker records, to prove on resume whose shard this is


def shard_name(prefix: str, index: int, count: int, fmt: str) -> str:
    ext = "array_record" if fmt == ARRAY_RECORD else "tfrecord"
    return f"{prefix}-{index:05d}-of-{count:05d}.{ext}"


def _shard_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"-\d{5,}-of-\d{5,}\.(tfrecord|array_record)")


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
        file_bytes = os.path.getsize(tmp)
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
        "file_bytes": file_bytes,
        "rejects": rejects,
        "labels": labels,
        "seconds": time.perf_counter() - start,
        **task.identity,
    }
    storage.write_text(_done_marker(task.options, task.name), json.dumps(done))
    return done


def _listing_digest(items: Sequence[sources.Item]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps([item.path, list(item.labels)]).encode())
    return h.hexdigest()


def _build_info(listing: sources.Listing, options: BuildOptions, num_shards: int) -> dict:
    return {
        "format": options.format,
        "shard_size": options.shard_size,
        "num_shards": num_shards,
        "num_items": len(listing.items),
        "items_sha256": _listing_digest(listing.items),
        "compression": options.compression if options.format == TFRECORD else None,
        "max_seconds": options.max_seconds,
        "feature": "log-mel float32 [frames, 80], 16 kHz, n_fft 400, hop 160, 50-8000 Hz",
    }


def _clip_state(path: str) -> list[int] | None:
    """Size and modification time of a local clip: a file replaced under the same name makes
    its shard another shard. Remote clips go by name only (a request per clip is too dear)."""
    if storage.is_remote(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _shard_identity(settings: dict, name: str, items: Sequence[sources.Item]) -> dict:
    clips = _listing_digest(items)
    state = json.dumps([settings, name, clips, [_clip_state(i.path) for i in items]])
    return {"settings": settings, "clips_sha256": clips,
            "fingerprint": hashlib.sha256(state.encode()).hexdigest()}


def _file_size(path: str) -> int | None:
    try:
        if storage.is_remote(path):
            import fsspec

            fs, p = fsspec.core.url_to_fs(path)
            return int(fs.size(p))
        return os.path.getsize(path)
    except (OSError, ValueError):
        return None


def _listdir(folder: str) -> list[str]:
    if storage.is_remote(folder):
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in storage.glob(storage.join(folder, "*"))]
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _refuse_mixing(options: BuildOptions, what: str) -> BuildRefused:
    return BuildRefused(
        f"{options.output}: {what}; this is not a resume of the same build: use a new --out (or "
        f"--prefix), or remove the old {options.prefix}-* files and _build/{options.prefix}-* "
        "markers there")


def _read_json_file(path: str) -> dict | None:
    """A JSON object, or None when the file is damaged."""
    try:
        value = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _check_existing(options: BuildOptions, info: dict, identities: dict[str, dict]
                    ) -> tuple[dict[str, dict], bool]:
    """What of this prefix is already in the output, checked against this build: the done
    markers of shards that may be reused, and whether build.json is there. Refuses (raising)
    when anything there belongs to another build or cannot show whose it is."""
    files = ShardSet(options.output, options.prefix)
    build_json = files.name("build_record")
    recorded = None
    if storage.exists(files.build_record):
        recorded = _read_json_file(files.build_record)
        if recorded is None:
            raise _refuse_mixing(options, f"{build_json} is damaged (not a JSON object)")
        if recorded != info:
            changed = sorted(k for k in info.keys() | recorded.keys()
                             if recorded.get(k) != info.get(k))
            raise _refuse_mixing(options, f"{build_json} records a different build (differs in "
                                          f"{changed})")
    pattern = _shard_pattern(options.prefix)
    present = {n for n in _listdir(options.output) if pattern.fullmatch(n)}
    marked = sorted(n[: -len(".json")] for n in _listdir(storage.join(options.output, "_build"))
                    if n.endswith(".json") and pattern.fullmatch(n[: -len(".json")]))
    reusable: dict[str, dict] = {}
    proven = set()
    for name in marked:
        marker = f"_build/{name}.json"
        if name not in identities:
            raise _refuse_mixing(options, f"{marker} marks a shard of another build (this one "
                                          f"writes {len(identities)} shard(s) of {options.format})")
        done = _read_json_file(_done_marker(options, name))
        if done is None:
            if recorded is None:
                raise _refuse_mixing(options, f"{marker} is damaged and no build.json says "
                                              "whose it is")
            continue  # this build's (build.json says so), not proven finished: built again
        expected = identities[name]
        if "fingerprint" not in done:
            # Written before markers carried fingerprints: only a matching build.json vouches.
            if recorded is None:
                raise _refuse_mixing(options, f"{marker} has no fingerprint and there is no "
                                              f"{build_json} to prove it is this build's")
        elif done["fingerprint"] != expected["fingerprint"]:
            if done.get("settings") != expected["settings"]:
                theirs, ours = done.get("settings") or {}, expected["settings"]
                why = "was built with other settings (differs in " + str(sorted(
                    k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))) + ")"
            elif done.get("clips_sha256") != expected["clips_sha256"]:
                why = "holds other clips (paths or labels) than this build puts there"
            else:
                why = ("was built from clips that changed on disk since (size or modification "
                       "time)")
            raise _refuse_mixing(options, f"shard {name} {why}")
        proven.add(name)
        if name not in present:
            continue  # marked but deleted since: built again
        recorded_size = done.get("file_bytes")
        if recorded_size is not None and _file_size(
                storage.join(options.output, name)) != recorded_size:
            continue  # truncated or half-copied since: this build's own shard, built again
        reusable[name] = done
    for name in sorted(present):
        if name not in identities:
            raise _refuse_mixing(options, f"{name} is a shard of another build (this one writes "
                                          f"{len(identities)} shard(s) of {options.format})")
        if recorded is None and name not in proven:
            raise _refuse_mixing(options, f"{name} has no done marker and there is no "
                                          f"{build_json} to say whose it is")
    if recorded is None and not proven:
        side = [files.name(kind) for kind in _SIDE_KINDS if storage.exists(files.path(kind))]
        if side:
            raise _refuse_mixing(options, f"{side[0]} is there without {build_json} (another "
                                          "build's results)")
    return reusable, recorded is not None


def _output_paths(options: BuildOptions, num_shards: int) -> list[str]:
    names = [shard_name(options.prefix, i, num_shards, options.format) for i in range(num_shards)]
    names += list(ShardSet(options.output, options.prefix).names().values())
    return [storage.join(options.output, n) for n in names]


def _check_no_input_overwritten(listing: sources.Listing, options: BuildOptions,
                                num_shards: int) -> None:
    folders: dict[str, str] = {}  # one realpath per folder, not per clip

    def key(path: str) -> str:
        if storage.is_remote(path):
            return path
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        return os.path.join(folders[folder], name)

    written = {key(p): p for p in _output_paths(options, num_shards)}
    for path in [*listing.inputs, *(item.path for item in listing.items)]:
        target = written.get(key(path))
        if target is not None:
            raise BuildRefused(f"--out {options.output}: the build would write {target}, which "
                               f"is an input of this build ({path}); use another --out or "
                               "--prefix")


def _prepare_output(options: BuildOptions) -> None:
    if storage.is_remote(options.output):
        return
    if os.path.exists(options.output) and not os.path.isdir(options.output):
        raise BuildRefused(f"--out {options.output}: exists and is not a folder")
    try:
        os.makedirs(os.path.join(options.output, "_build"), exist_ok=True)
    except OSError as e:
        raise BuildRefused(f"--out {options.output}: cannot create the folder "
                           f"({e.strerror or e})") from e
    if not os.access(options.output, os.W_OK | os.X_OK):
        raise BuildRefused(f"--out {options.output}: not writable by this user")


def _lock_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "another builder (it has not written its pid yet)"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


@contextlib.contextmanager
def _output_lock(options: BuildOptions) -> Iterator[None]:
    """Holds ``_build/PREFIX.lock`` for the build. flock, so the kernel lets go when the holder
    dies (a dead builder never needs cleaning up after); the pid and host inside are only there
    to name the holder in the refusal."""
    if storage.is_remote(options.output):
        yield
        return
    path = os.path.join(options.output, "_build", f"{options.prefix}.lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise BuildRefused(f"--out {options.output}: cannot create the lock {path} "
                               f"({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _lock_holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if holder is None:
                print(f"warning: {path}: this filesystem takes no locks ({e.strerror}); a "
                      "second builder into this --out would not be stopped", file=sys.stderr)
                yield
                return
            raise BuildRefused(f"{options.output} is being built by {holder} (lock {path}); "
                               "wait for it to finish, or use another --out or --prefix") from e
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file as this one opened it: again
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still held, so no one locks a file about to vanish
        os.close(fd)


def _clean_stale_temporaries(options: BuildOptions) -> None:
    """Temporaries a killed run left: only names this builder writes (``OUTPUT.tmp-PID``), so an
    input that merely looks like one (``--out`` is the audio folder) is never removed."""
    if storage.is_remote(options.output) or not os.path.isdir(options.output):
        return
    side = "|".join(re.escape(n) for n in ShardSet(options.output, options.prefix).names().values())
    shard = _shard_pattern(options.prefix).pattern
    ours = re.compile(rf"({shard}|{side})\.tmp-\d+")
    marker = re.compile(_shard_pattern(options.prefix).pattern + r"\.json\.tmp-\d+")
    for folder, pattern in ((options.output, ours),
                            (os.path.join(options.output, "_build"), marker)):
        for name in _listdir(folder):
            if pattern.fullmatch(name):
                os.remove(os.path.join(folder, name))


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
    """Builds (or finishes building) the shards of ``listing``; returns the summary. Raises
    :class:`BuildRefused` (nothing written) when the output holds another build's files."""
    start = time.perf_counter()
    if not listing.items:
        if listing.missing:
            entry, reason = listing.missing[0]
            raise BuildRefused(f"nothing to build: all {len(listing.missing)} listed clip(s) "
                               f"were rejected (the first: {entry}: {reason})")
        raise BuildRefused("nothing to build: the source lists no audio")
    num_shards = math.ceil(len(listing.items) / options.shard_size)
    _check_no_input_overwritten(listing, options, num_shards)
    _prepare_output(options)
    with _output_lock(options):
        return _build_locked(listing, options, num_shards, start)


def _build_locked(listing: sources.Listing, options: BuildOptions, num_shards: int,
                  start: float) -> dict:
    info = _build_info(listing, options, num_shards)
    settings = {k: v for k, v in info.items() if k not in ("num_items", "items_sha256")}
    # Not in build.json (older builds' records stay valid), but a shard's layout all the same.
    settings["array_record_options"] = (options.array_record_options
                                        if options.format == ARRAY_RECORD else None)
    names = [shard_name(options.prefix, i, num_shards, options.format) for i in range(num_shards)]
    chunks = [tuple(listing.items[i * options.shard_size : (i + 1) * options.shard_size])
              for i in range(num_shards)]
    identities = {name: _shard_identity(settings, name, chunk)
                  for name, chunk in zip(names, chunks, strict=True)}
    reusable, recorded = _check_existing(options, info, identities)
    if not recorded:
        storage.write_text(ShardSet(options.output, options.prefix).build_record,
                           json.dumps(info, indent=1))
    _clean_stale_temporaries(options)

    results: dict[int, dict] = {}
    todo: list[_ShardTask] = []
    for i, name in enumerate(names):
        if name in reusable:
            results[i] = reusable[name]
            continue
        todo.append(_ShardTask(i, name, chunks[i], options, identities[name]))

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
    files = ShardSet(options.output, options.prefix)
    storage.write_text(files.manifest, _csv_text(("shard", "num_records"), manifest))
    storage.write_text(files.rejects, _csv_text(("path", "reason"), rejects))
    if listing.vocabulary is not None:
        storage.write_text(files.labels,
                           _csv_text(("index", "label"), list(enumerate(listing.vocabulary))))
    # Every record's labels without reading the shards: what class-balanced sampling weighs
    # clips by (shards marked done by an older version lack them: no table then).
    if any(item.labels for item in listing.items) and all("labels" in d for d in ordered):
        storage.write_text(files.clip_labels, _csv_text(
            ("shard", "record", "labels"),
            [(d["shard"], r, ";".join(map(str, ids)))
             for d in ordered for r, ids in enumerate(d["labels"])]))
    seconds = time.perf_counter() - start
    built = [results[t.index] for t in todo]
    clips_built = sum(d["num_records"] for d in built)
    return {
        "output": options.output,
        "manifest": files.manifest,
        "format": options.format,
        "shards": num_shards,
        "shards_built": len(todo),
        "shards_resumed": num_shards - len(todo),
        "records": sum(d["num_records"] for d in ordered),
        "rejected": len(rejects),
        "rejects_csv": files.rejects,
        "seconds": round(seconds, 3),
        "clips_per_second": round(clips_built / seconds, 2) if seconds > 0 else None,
        "workers": workers,
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse prints its usage block and exits; a refusal here is one line, printed last.
        raise BuildRefused(f"{message} (see --help)")


def _count(flag: str, minimum: int, maximum: int | None = None, note: str = ""):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {bound}{note}, got {value}")
        return value

    parse.__name__ = flag  # what argparse names in a message it writes itself
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= MIN_SECONDS):
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds >= {MIN_SECONDS:g} (one analysis window; "
            f"leave the flag out to keep whole files), got {text}")
    return value


def _prefix(text: str) -> str:
    problem = _prefix_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tfrecord_tools.build", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", dest="output", required=True, help="local folder or gs://bucket/path")
    common.add_argument("--format", choices=FORMATS, default=TFRECORD)
    common.add_argument("--shard-size", type=_count("--shard-size", 1), default=DEFAULT_SHARD_SIZE,
                        help="clips per shard")
    common.add_argument("--prefix", type=_prefix, default="data", help="shard file name prefix")
    cores = os.cpu_count() or 1
    common.add_argument("--workers", default=0, type=_count(
        "--workers", 0, MAX_WORKERS_PER_CORE * cores,
        f" ({MAX_WORKERS_PER_CORE} per CPU core of this machine's {cores})"),
        help="processes (0: one per CPU core; 1: no subprocesses)")
    common.add_argument("--compression", choices=("zlib", "none"), default=None,
                        help="TFRecord compression (default zlib, as the original)")
    common.add_argument(
        "--array-record-options", default=None,
        help=f"ArrayRecord writer options (default {DEFAULT_ARRAY_RECORD_OPTIONS}). The trainer "
             "reads ArrayRecord "
             "by index, in a shuffle over all clips; a read decompresses the whole chunk that "
             "holds the record, so with group_size:G each clip read costs G clips of "
             "decompression and I/O. Float32 log-mels compress little anyway, so one record "
             "per chunk is the layout that fits that read.")
    common.add_argument("--max-seconds", type=_seconds, default=None,
                        help="keep at most this much of each file")
    common.add_argument("--no-progress", action="store_true")
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE",
                           parser_class=_Parser)
    f = sub.add_parser("folder", parents=[common], help="every audio file under a folder")
    f.add_argument("root")
    f.add_argument("--labels-from-subfolder", action="store_true",
                   help="label each file by its first-level subfolder")
    c = sub.add_parser("csv", parents=[common], help="a CSV of path,labels (no comment lines: "
                       "every row is a clip)")
    c.add_argument("manifest")
    c.add_argument("--audio-root", default=None)
    c.add_argument("--vocabulary", default=None,
                   help="index,label CSV for label names: indices whole numbers >= 0, each "
                        "index and each name once (unused indices may be left out)")
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


def _check_array_record_options(text: str) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    with tempfile.TemporaryDirectory(prefix="array-record-options-") as tmp:
        try:
            ArrayRecordWriter(os.path.join(tmp, "probe"), text).close()
        except Exception as e:  # the native writer raises plain ValueError/RuntimeError
            raise BuildRefused(f"--array-record-options {text!r}: {e}") from e


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """The build's options from the command line; flags the chosen format would silently
    ignore are refused."""
    if args.format == ARRAY_RECORD and args.compression is not None:
        raise BuildRefused("--compression applies to --format tfrecord only (ArrayRecord "
                           "compression is set by --array-record-options)")
    if args.format == TFRECORD and args.array_record_options is not None:
        raise BuildRefused("--array-record-options applies to --format array_record only")
    array_record_options = args.array_record_options or DEFAULT_ARRAY_RECORD_OPTIONS
    if args.format == ARRAY_RECORD:
        _check_array_record_options(array_record_options)
    return BuildOptions(
        output=args.output, shard_size=args.shard_size, format=args.format, prefix=args.prefix,
        workers=args.workers, compression=None if args.compression == "none" else "zlib",
        max_seconds=args.max_seconds, array_record_options=array_record_options,
        progress=not args.no_progress,
    )


def _check_single_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse drops a value of ``--`` (``--max-seconds=--``) and hands on an empty list that
    the flag's type never checked: refuse it as a missing value, naming the flag."""
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for p in parsers:
        for action in p._actions:
            value = getattr(args, action.dest, None)
            if action.nargs is None and action.type is not None and isinstance(value, list):
                name = action.option_strings[0] if action.option_strings else action.dest
                raise ValueError(f"argument {name}: expected one value, got '--'")


def _error(message: object, status: int) -> int:
    sys.stdout.flush()
    print("error: " + " ".join(str(message).split("\n")), file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = _parser()
        args = cli.parse_args(parser, argv)
        _check_single_values(parser, args)
        options = options_from_args(args)
        listing = listing_from_args(args)
    except (ValueError, OSError) as e:  # bad flags or unreadable inputs: refused
        return _error(e, 2)
    try:
        summary = build(listing, options)
    except BuildRefused as e:
        return _error(e, 2)
    except (OSError, ValueError) as e:  # while writing: what finished stays marked done
        return _error(f"the build stopped: {e} (rerun the same command to resume)", 1)
    print(json.dumps(summary, indent=1))
    if summary["records"] == 0:
        return _error(f"no clip could be encoded: all {summary['rejected']} were rejected, see "
                      f"{summary['rejects_csv']}", 1)
    if summary["rejected"]:
        print(f"{summary['rejected']} file(s) rejected: see {summary['rejects_csv']}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
