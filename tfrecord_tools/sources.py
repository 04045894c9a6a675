"""Lists of (audio file, label ids) from a folder, a CSV manifest, AudioSet or FSD50K."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Iterable, Sequence

from mwmae.data import storage

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".au")


@dataclasses.dataclass(frozen=True)
class Item:
    path: str
    labels: tuple[int, ...] = ()


@dataclasses.dataclass
class Listing:
    """What the builder shards: items in a fixed order, plus rows it could not resolve."""

    items: list[Item]
    vocabulary: list[str] | None = None  # label id -> name, when the source names labels
    missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (entry, reason)
    # Side files the source read (manifests, vocabularies): the builder never writes over them.
    inputs: list[str] = dataclasses.field(default_factory=list)


def _read_source_text(path: str) -> str:
    try:
        # A spreadsheet's "CSV UTF-8" starts with a byte-order mark; it is no part of the header.
        return storage.read_text(path).removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except IsADirectoryError as e:
        raise ValueError(f"{path}: a folder, not a file") from e


def _read_csv_rows(path: str, *, comments: bool = False) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank row. There is no comment syntax (a path may
    start with '#') unless ``comments``: the AudioSet segment lists open with '#' lines."""
    text = _read_source_text(path)
    if comments:
        # Blanked rather than removed, so that line numbers in errors stay the file's own.
        text = "\n".join("" if line.lstrip().startswith("#") else line
                         for line in text.split("\n"))
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    rows = []
    try:
        for row in reader:
            if any(field.strip() for field in row):
                rows.append((reader.line_num, row))
    except csv.Error as e:
        # Fields over csv's limit (128 KiB) are no path or label list anyone meant to write.
        raise ValueError(f"{path}:{reader.line_num}: not a CSV row ({e})") from e
    return rows


def _split_labels(field: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,;]", field) if t.strip()]


def _vocabulary_ids(names: Iterable[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted(set(names)))}


def _names_by_id(ids: dict[str, int]) -> list[str]:
    """Index -> name; ids a vocabulary leaves unused get an empty name, so that row i of the
    labels CSV is always id i."""
    names = [""] * (max(ids.values()) + 1 if ids else 0)
    for name, i in ids.items():
        names[i] = name
    return names


def from_folder(root: str, *, labels_from_subfolder: bool = False) -> Listing:
    """Every audio file under ``root`` (recursively, sorted). With ``labels_from_subfolder``
    the first folder level names each file's single label."""
    if storage.is_remote(root):
        files = [p for ext in AUDIO_EXTENSIONS
                 for p in storage.glob(storage.join(root, "**", "*" + ext))]
    else:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such folder" if not os.path.exists(root)
                                    else f"{root}: not a folder")
        files = []
        for folder, _, names in os.walk(root):
            files.extend(os.path.join(folder, n) for n in names
                         if n.lower().endswith(AUDIO_EXTENSIONS))
    files = sorted(set(files))
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {root}")
    if not labels_from_subfolder:
        return Listing([Item(f) for f in files])
    if storage.is_remote(root):
        rel = [f[len(root):].lstrip("/") for f in files]
    else:
        rel = [os.path.relpath(f, root).replace(os.sep, "/") for f in files]
    classes = [r.split("/")[0] if "/" in r else "" for r in rel]
    if any(c == "" for c in classes):
        raise ValueError(f"labels_from_subfolder: files directly in {root} have no class folder")
    ids = _vocabulary_ids(classes)
    return Listing([Item(f, (ids[c],)) for f, c in zip(files, classes, strict=True)],
                   _names_by_id(ids))


def from_csv(
    path: str,
    *,
    audio_root: str | None = None,
    vocabulary_csv: str | None = None,
) -> Listing:
    """A CSV with a header naming ``path`` (or ``file``/``filename``/``fname``) and optionally
    ``labels`` (ids or names, separated by ',' or ';'). Relative paths are taken from
    ``audio_root`` or else the CSV's folder. Names map to ids through ``vocabulary_csv``
    (``index,label``) or, without one, their sorted order.

    Every row is a clip: there is no comment syntax. A row that cannot become one (an empty
    path, a clip listed again, a negative label id, a label the vocabulary lacks) goes to the
    rejects with its reason rather than into the shards."""
    rows = _read_csv_rows(path)
    if not rows:
        raise ValueError(f"{path}: empty manifest")
    header_line, header_row = rows[0]
    header = [h.strip().lower() for h in header_row]
    path_col = next((header.index(c) for c in ("path", "file", "filename", "fname")
                     if c in header), None)
    if path_col is None:
        raise ValueError(f"{path}:{header_line}: header {header_row} has no 'path' column")
    if len(rows) == 1:
        raise ValueError(f"{path}: lists no clips (a header and no rows)")
    label_col = header.index("labels") if "labels" in header else (
        header.index("label") if "label" in header else None)
    if audio_root is not None and not storage.is_remote(audio_root) \
            and not os.path.isdir(audio_root):
        raise FileNotFoundError(f"--audio-root {audio_root}: no such folder")
    base = audio_root if audio_root is not None else storage.dirname(path)
    entries, missing = [], []
    first_line: dict[str, int] = {}
    for line, row in rows[1:]:
        if len(row) <= path_col:
            raise ValueError(f"{path}:{line}: row has no path column")
        tokens = _split_labels(row[label_col]) if label_col is not None and len(row) > label_col \
            else []
        name = row[path_col].strip()
        if not name:
            missing.append((f"{path}:{line}", "empty path"))
            continue
        absolute = storage.is_remote(name) or os.path.isabs(name)
        full = name if absolute else storage.join(base, name)
        if full in first_line:
            missing.append((full, f"listed again at line {line} of {path} (first at line "
                                  f"{first_line[full]}, kept there)"))
            continue
        first_line[full] = line
        entries.append((full, tokens))
    all_tokens = [t for _, tokens in entries for t in tokens]
    inputs = [path]
    if vocabulary_csv is not None:
        ids = _read_vocabulary(vocabulary_csv)
        inputs.append(vocabulary_csv)
    elif all(re.fullmatch(r"-?\d+", t) for t in all_tokens):
        ids = None
    else:
        ids = _vocabulary_ids(all_tokens)
    items = []
    for full, tokens in entries:
        if ids is None:
            negative = [t for t in tokens if int(t) < 0]
            if negative:
                missing.append((full, f"negative label id(s) {negative} at line "
                                      f"{first_line[full]} of {path}"))
                continue
            items.append(Item(full, tuple(int(t) for t in tokens)))
            continue
        unknown = [t for t in tokens if t not in ids]
        if unknown:
            missing.append((full, f"labels not in the vocabulary: {unknown}"))
            continue
        items.append(Item(full, tuple(ids[t] for t in tokens)))
    vocabulary = _names_by_id(ids) if ids is not None else None
    return Listing(items, vocabulary, missing, inputs)


def _index_table(path: str, key_col: int, rows: list[tuple[int, list[str]]] | None = None,
                 index_col: int = 0) -> list[tuple[int, int, list[str]]]:
    """(line, index, row) of an index table such as ``index,label`` or
    ``index,mid,display_name``: every index a whole number >= 0 and every key (column
    ``key_col``) named once, so that no two classes share an id and no name means two ids. An
    opening row whose index field has no digit is a header. Indices may leave gaps (unused
    ids). A row with an empty key is an unused id (the labels CSV the builder writes marks gaps
    so)."""
    rows = _read_csv_rows(path) if rows is None else rows
    if rows and not re.search(r"\d", rows[0][1][index_col] if rows[0][1] else ""):
        rows = rows[1:]
    table = []
    by_index: dict[int, tuple[int, str]] = {}
    by_key: dict[str, tuple[int, int]] = {}
    for line, row in rows:
        field = row[index_col].strip() if len(row) > index_col else ""
        if not re.fullmatch(r"\d+", field):
            raise ValueError(f"{path}:{line}: index {field!r} is not a whole number >= 0")
        index = int(field)
        key = row[key_col].strip() if len(row) > key_col else ""
        if index in by_index:
            first, name = by_index[index]
            raise ValueError(f"{path}:{line}: index {index} is already {name!r} (line {first}); "
                             "two classes would share one id")
        by_index[index] = (line, key)
        if not key:
            continue
        if key in by_key:
            first, other = by_key[key]
            raise ValueError(f"{path}:{line}: label {key!r} already has index {other} (line "
                             f"{first}); one name cannot mean two ids")
        by_key[key] = (line, index)
        table.append((line, index, row))
    if not table:
        raise ValueError(f"{path}: no 'index,label' rows")
    return table


def _read_vocabulary(path: str) -> dict[str, int]:
    return {row[1].strip(): index for _, index, row in _index_table(path, key_col=1)}


def _index_audio(folder: str) -> dict[str, str]:
    """stem -> path for every audio file in a folder (recursively)."""
    listing = from_folder(folder)
    index: dict[str, str] = {}
    for item in listing.items:
        stem = os.path.splitext(os.path.basename(item.path))[0]
        index.setdefault(stem, item.path)
    return index


def from_audioset(
    segments_csvs: Sequence[str], audio_dir: str, class_labels_csv: str
) -> Listing:
    """AudioSet: segment CSVs (``YTID, start_seconds, end_seconds, positive_labels``; lines
    starting with '#' are comments, as in the published lists), ``class_labels_indices.csv``
    (``index,mid,display_name``) and a folder of downloaded clips named ``<YTID>``,
    ``Y<YTID>`` or ``<YTID>_<start>`` (any supported extension)."""
    table = _index_table(class_labels_csv, key_col=1)
    mid_to_id = {row[1].strip(): index for _, index, row in table}
    id_to_name = {index: row[2].strip() if len(row) > 2 else "" for _, index, row in table}
    segment_rows = [(segments, line, row) for segments in segments_csvs
                    for line, row in _read_csv_rows(segments, comments=True)]
    audio = _index_audio(audio_dir)
    items, missing = [], []
    seen = set()
    for segments, line, row in segment_rows:
        if len(row) < 4 or row[0].strip().upper() == "YTID":
            if row[0].strip().upper() != "YTID":
                missing.append((f"{segments}:{line}", "not a YTID, start, end, labels row"))
            continue
        ytid, start = row[0].strip(), row[1].strip()
        if ytid in seen:
            continue
        seen.add(ytid)
        try:
            start_int = str(int(float(start))) if start else ""
        except ValueError as e:
            raise ValueError(f"{segments}:{line}: start_seconds {start!r} is not a number") from e
        stems = (ytid, "Y" + ytid, f"{ytid}_{start}", f"{ytid}_{start_int}", f"Y{ytid}_{start}")
        path = next((audio[k] for k in stems if k in audio), None)
        if path is None:
            missing.append((ytid, f"no audio file for this YTID in {audio_dir}"))
            continue
        mids = _split_labels(row[3])
        unknown = [m for m in mids if m not in mid_to_id]
        if unknown:
            missing.append((ytid, f"label mids not in {class_labels_csv}: {unknown}"))
            continue
        items.append(Item(path, tuple(sorted(mid_to_id[m] for m in mids))))
    vocabulary = [id_to_name.get(i, "") for i in range(max(mid_to_id.values()) + 1)]
    return Listing(items, vocabulary, missing, [*segments_csvs, class_labels_csv])


FSD50K_SPLITS = ("dev", "train", "val", "eval")


def _find(root: str, names: Sequence[str]) -> str:
    for name in names:
        candidate = storage.join(root, name)
        if storage.exists(candidate):
            return candidate
    raise FileNotFoundError(f"none of {list(names)} under {root}")


def _columns(path: str, rows: list[tuple[int, list[str]]], names: Sequence[str]) -> list[int]:
    header = [h.strip().lower() for h in rows[0][1]] if rows else []
    absent = [n for n in names if n not in header]
    if absent:
        raise ValueError(f"{path}: header {rows[0][1] if rows else []} lacks column(s) {absent}")
    return [header.index(n) for n in names]


def from_fsd50k(root: str, split: str) -> Listing:
    """FSD50K as distributed: ``FSD50K.ground_truth/{dev,eval,vocabulary}.csv`` and the
    ``FSD50K.dev_audio`` / ``FSD50K.eval_audio`` folders. ``split`` is ``dev`` (train + val),
    ``train``, ``val`` (the ``split`` column of dev.csv) or ``eval``."""
    if split not in FSD50K_SPLITS:
        raise ValueError(f"split must be one of {FSD50K_SPLITS}, got {split!r}")
    table = "eval.csv" if split == "eval" else "dev.csv"
    gt = _find(root, [f"FSD50K.ground_truth/{table}", table])
    vocab_csv = _find(root, ["FSD50K.ground_truth/vocabulary.csv", "vocabulary.csv"])
    audio_dir = _find(root, ["FSD50K.eval_audio" if split == "eval" else "FSD50K.dev_audio",
                             "eval_audio" if split == "eval" else "dev_audio"])
    ids = _read_vocabulary(vocab_csv)
    rows = _read_csv_rows(gt)
    fname_col, labels_col = _columns(gt, rows, ("fname", "labels"))
    header = [h.strip().lower() for h in rows[0][1]]
    split_col = header.index("split") if "split" in header else None
    audio = _index_audio(audio_dir)
    items, missing = [], []
    for line, row in rows[1:]:
        if len(row) <= max(fname_col, labels_col, split_col or 0):
            missing.append((f"{gt}:{line}", f"row has {len(row)} fields, the header more"))
            continue
        if split in ("train", "val") and split_col is not None and row[split_col].strip() != split:
            continue
        fname = row[fname_col].strip()
        if fname not in audio:
            missing.append((fname, f"no audio file in {audio_dir}"))
            continue
        names = _split_labels(row[labels_col])
        unknown = [n for n in names if n not in ids]
        if unknown:
            missing.append((fname, f"labels not in {vocab_csv}: {unknown}"))
            continue
        items.append(Item(audio[fname], tuple(sorted(ids[n] for n in names))))
    return Listing(items, _names_by_id(ids), missing, [gt, vocab_csv])


HEAR_SPLITS = ("train", "valid", "test")


def from_hear(task_dir: str, split: str, sample_rate: int = 16000) -> Listing:
    """One split of a HEAR 2021 scene task (``task_metadata.json``, ``labelvocabulary.csv``,
    ``SPLIT.json`` mapping file -> labels, audio under ``16000/SPLIT/``), with the task's
    vocabulary, so that a tagger can train and evaluate on it."""
    if split not in HEAR_SPLITS:
        raise ValueError(f"split must be one of {HEAR_SPLITS}, got {split!r}")
    meta_path = storage.join(task_dir, "task_metadata.json")
    if not storage.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: missing; is {task_dir} a HEAR task folder?")
    meta = _read_json(meta_path)
    if meta.get("embedding_type") != "scene":
        raise ValueError(f"{meta_path}: a {meta.get('embedding_type')!r} task; only scene "
                         "tasks (one label set per clip) become tagger shards")
    vocab_csv = storage.join(task_dir, "labelvocabulary.csv")
    rows = _read_csv_rows(vocab_csv)
    idx_col, label_col = _columns(vocab_csv, rows, ("idx", "label"))
    ids = {row[label_col].strip(): index for _, index, row
           in _index_table(vocab_csv, label_col, rows[1:], index_col=idx_col)}
    labels_path = storage.join(task_dir, f"{split}.json")
    if not storage.exists(labels_path):
        raise FileNotFoundError(f"{labels_path}: missing; this task has no {split!r} split")
    table = _read_json(labels_path)
    audio_dir = storage.join(task_dir, str(sample_rate), split)
    items, missing = [], []
    for name in sorted(table):
        path = storage.join(audio_dir, name)
        unknown = [str(lab) for lab in table[name] if str(lab).strip() not in ids]
        if unknown:
            missing.append((path, f"labels not in labelvocabulary.csv: {unknown}"))
        elif not storage.exists(path):
            missing.append((path, "no audio file"))
        else:
            items.append(Item(path, tuple(sorted(ids[str(lab).strip()] for lab in table[name]))))
    return Listing(items, _names_by_id(ids), missing, [meta_path, vocab_csv, labels_path])


def _read_json(path: str):
    try:
        return json.loads(_read_source_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
