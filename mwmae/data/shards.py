"""Finding shards (manifest CSV, glob or list; local or gs://), reading them, splitting hosts."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Container, Iterator, Sequence

from mwmae.data import records, storage

TFRECORD = "tfrecord"
ARRAY_RECORD = "array_record"
FORMATS = (TFRECORD, ARRAY_RECORD)
MANIFEST_COLUMNS = ("shard", "num_records")


@dataclasses.dataclass(frozen=True)
class Shard:
    path: str
    format: str
    num_records: int | None = None
    # The manifest that lists it (named in what is said about its count), if one does.
    manifest: str | None = dataclasses.field(default=None, compare=False, repr=False)


def format_of(path: str) -> str:
    name = path.lower()
    if name.endswith((".array_record", ".arrayrecord")) or ".array_record-" in name:
        return ARRAY_RECORD
    return TFRECORD


def read_manifest(path: str) -> list[Shard]:
    """Shards listed in a manifest CSV (``shard,num_records``); relative paths are taken
    relative to the manifest's folder."""
    base = storage.dirname(path)
    rows = list(csv.DictReader(io.StringIO(storage.read_text(path))))
    if not rows:
        raise ValueError(f"{path}: manifest lists no shards")
    missing = [c for c in MANIFEST_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}; expected {MANIFEST_COLUMNS}")
    shards = []
    for row in rows:
        name = row["shard"]
        absolute = storage.is_remote(name) or name.startswith("/")
        full = name if absolute else storage.join(base, name)
        shards.append(Shard(full, format_of(full), int(row["num_records"]), manifest=path))
    return shards


def resolve(source: str | Sequence[str], *, check_exists: bool = True) -> list[Shard]:
    """Shards from a manifest CSV, a glob pattern, or a list of paths/patterns, sorted by path.

    Every shard must exist: a missing one is an error naming it, raised here, before training
    starts, rather than a hole in the data discovered hours in.
    """
    sources = [source] if isinstance(source, str) else list(source)
    shards: list[Shard] = []
    for item in sources:
        if item.lower().endswith(".csv"):
            listed = read_manifest(item)
            if check_exists:
                _check_listed(listed, item)
            shards.extend(listed)
        elif any(ch in item for ch in "*?["):
            matches = storage.glob(item)
            if not matches:
                raise FileNotFoundError(f"no shard matches {item}")
            shards.extend(Shard(m, format_of(m)) for m in matches)
        else:
            if check_exists and not storage.exists(item):
                raise FileNotFoundError(f"shard missing: {item}")
            shards.append(Shard(item, format_of(item)))
    if not shards:
        raise ValueError(f"no shards in {source!r}")
    paths = [s.path for s in shards]
    if len(set(paths)) != len(paths):
        raise ValueError("a shard is listed twice; every clip would be read twice per epoch")
    return sorted(shards, key=lambda s: s.path)


def _check_listed(listed: list[Shard], manifest: str) -> None:
    # One listing per folder instead of one request per shard (thousands on a real bucket).
    by_folder: dict[str, set[str]] = {}
    for shard in listed:
        folder = storage.dirname(shard.path)
        if folder not in by_folder:
            pattern = storage.join(folder, "*")
            by_folder[folder] = {p.rstrip("/") for p in storage.glob(pattern)}
    for shard in listed:
        if shard.path not in by_folder[storage.dirname(shard.path)]:
            if not storage.exists(shard.path):  # a listing can lag behind a just-finished write
                raise FileNotFoundError(f"shard missing: {shard.path} (listed in {manifest})")


def check_shards(listed: Sequence[Shard], *, compression: str | None = "zlib",
                 on_error: str = "raise") -> list[str]:
    """Cheap checks of every shard before a run starts, so a damaged one is refused before
    anything is written rather than met mid-run: it opens and is readable, its first record's
    length header (TFRecord) is intact, and an ArrayRecord shard holds the records its
    manifest lists. A few kilobytes per shard (a TFRecord's head; an ArrayRecord's footer),
    never the whole file; gs:// shards are checked in parallel.

    Under ``on_error="raise"`` the first problem raises :class:`records.RecordError`, one
    line naming the shard (and its manifest) and the problem; under ``"skip"`` each is
    warned about once and the problems are returned (the reader skips those shards)."""
    from concurrent.futures import ThreadPoolExecutor

    from mwmae.data import errors

    remote = any(storage.is_remote(s.path) for s in listed)
    if remote and len(listed) > 1:
        with ThreadPoolExecutor(min(16, len(listed))) as pool:
            found = list(pool.map(lambda s: _problem(s, compression), listed))
    else:
        found = [_problem(s, compression) for s in listed]
    problems = [p for p in found if p is not None]
    if problems and on_error != "skip":
        more = f" (and {len(problems) - 1} more shard(s))" if len(problems) > 1 else ""
        raise records.RecordError(problems[0] + more)
    for shard, problem in zip(listed, found, strict=True):
        if problem is not None:
            errors.warn_once(shard.path, f"{problem}: the shard will be skipped "
                                         "(data.on_error=skip)")
    return problems


def _problem(shard: Shard, compression: str | None) -> str | None:
    """What is wrong with ``shard`` that a few bytes show, as one line naming it; or None."""
    listed = shard.num_records
    where = f" (listed in {shard.manifest})" if shard.manifest else ""
    try:
        if shard.format == ARRAY_RECORD:
            reader = _array_record_reader(shard.path)
            try:
                held = reader.num_records()
            finally:
                reader.close()
            if listed is not None and held != listed:
                return f"{shard.path}: holds {held} records, {_lister(shard)} lists {listed}"
            return None
        with storage.open_read(shard.path, block_size=1 << 16) as f:
            has_records = records.check_first_header(f, compression=compression,
                                                     name=shard.path)
    except records.RecordError as e:
        return f"{e}{where}"
    except OSError as e:  # unreadable: permissions, a folder, gone since the listing
        message = str(e) if shard.path in str(e) else f"{shard.path}: {e}"
        return f"cannot read {message}{where}"
    if not has_records and listed:
        return f"{shard.path}: holds no records, {_lister(shard)} lists {listed}"
    return None


def _lister(shard: Shard) -> str:
    return f"the manifest {shard.manifest}" if shard.manifest else "the manifest"


def for_host(shards: Sequence[Shard], process_index: int, process_count: int) -> list[Shard]:
    """This host's shards: every ``process_count``-th of the sorted list, from ``process_index``.

    Whole shards go to hosts (each host reads each of its files sequentially, no host reads
    another's), so there must be at least as many shards as hosts.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if len(shards) < process_count:
        raise ValueError(
            f"{len(shards)} shard(s) for {process_count} hosts: every host needs at least one "
            "shard; rebuild with a smaller --shard-size"
        )
    return list(shards[process_index::process_count])


def count_records(shard: Shard, *, compression: str | None = "zlib") -> int:
    """Records in a shard (cheap for ArrayRecord; a full read for TFRecord)."""
    if shard.format == ARRAY_RECORD:
        reader = _array_record_reader(shard.path)
        try:
            return reader.num_records()
        finally:
            reader.close()
    with storage.open_read(shard.path) as f:
        return sum(1 for _ in records.iter_tfrecord(f, compression=compression, name=shard.path,
                                                    verify_crc=False))


def _array_record_reader(path: str):
    from array_record.python import array_record_module

    if not storage.is_remote(path) and not storage.exists(path):
        raise FileNotFoundError(f"shard missing: {path}")
    try:
        return array_record_module.ArrayRecordReader(path)
    except Exception as e:  # the native reader raises plain RuntimeError/ValueError
        raise records.RecordError(f"{path}: cannot open as ArrayRecord ({e})") from e


def iter_records(
    shard: Shard, *, start: int = 0, compression: str | None = "zlib",
    passing: Container[int] = (),
) -> Iterator[bytes | None]:
    """Serialized Examples of one shard from record ``start`` on; None in place of a TFRecord
    record in ``passing`` (known to be unusable: passed over unread, see
    :func:`records.iter_tfrecord`).

    Damage raises :class:`records.RecordError` (or FileNotFoundError) naming the file.
    """
    if shard.format == ARRAY_RECORD:
        reader = _array_record_reader(shard.path)
        try:
            total = reader.num_records()
            if start < total:
                reader.seek(start)
            for index in range(start, total):
                try:
                    record = reader.read()
                except Exception as e:  # damaged chunk: the native reader names no file
                    raise records.RecordError(f"{shard.path}: record {index}: {e}") from e
                yield record
        finally:
            reader.close()
        return
    with storage.open_read(shard.path) as f:
        yield from records.iter_tfrecord(f, compression=compression, name=shard.path, skip=start,
                                         passing=passing)
