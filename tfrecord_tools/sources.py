"""Lists of (audio file, label ids) from a folder, a CSV manifest, AudioSet or FSD50K."""

from __future__ import annotations

import csv
import dataclasses
import io
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


def _read_csv_rows(path: str) -> list[list[str]]:
    text = storage.read_text(path)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return list(csv.reader(io.StringIO("\n".join(lines)), skipinitialspace=True))


def _split_labels(field: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,;]", field) if t.strip()]


def _vocabulary_ids(names: Iterable[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(sorted(set(names)))}


def from_folder(root: str, *, labels_from_subfolder: bool = False) -> Listing:
    """Every audio file under ``root`` (recursively, sorted). With ``labels_from_subfolder``
    the first folder level names each file's single label."""
    if storage.is_remote(root):
        files = [p for ext in AUDIO_EXTENSIONS
                 for p in storage.glob(storage.join(root, "**", "*" + ext))]
    else:
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
    vocabulary = sorted(ids, key=ids.get)
    return Listing([Item(f, (ids[c],)) for f, c in zip(files, classes, strict=True)], vocabulary)


def from_csv(
    path: str,
    *,
    audio_root: str | None = None,
    vocabulary_csv: str | None = None,
) -> Listing:
    """A CSV with a header naming ``path`` (or ``file``/``filename``/``fname``) and optionally
    ``labels`` (ids or names, separated by ',' or ';'). Relative paths are taken from
    ``audio_root`` or else the CSV's folder. Names map to ids through ``vocabulary_csv``
    (``index,label``) or, without one, their sorted order."""
    rows = _read_csv_rows(path)
    if not rows:
        raise ValueError(f"{path}: empty manifest")
    header = [h.strip().lower() for h in rows[0]]
    path_col = next((header.index(c) for c in ("path", "file", "filename", "fname")
                     if c in header), None)
    if path_col is None:
        raise ValueError(f"{path}: header {rows[0]} has no 'path' column")
    label_col = header.index("labels") if "labels" in header else (
        header.index("label") if "label" in header else None)
    base = audio_root if audio_root is not None else storage.dirname(path)
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= path_col:
            raise ValueError(f"{path}:{line}: row has no path")
        tokens = _split_labels(row[label_col]) if label_col is not None and len(row) > label_col \
            else []
        name = row[path_col].strip()
        absolute = storage.is_remote(name) or os.path.isabs(name)
        full = name if absolute else storage.join(base, name)
        entries.append((full, tokens))
    all_tokens = [t for _, tokens in entries for t in tokens]
    if vocabulary_csv is not None:
        ids = _read_vocabulary(vocabulary_csv)
    elif all(re.fullmatch(r"-?\d+", t) for t in all_tokens):
        ids = None
    else:
        ids = _vocabulary_ids(all_tokens)
    items, missing = [], []
    for full, tokens in entries:
        if ids is None:
            items.append(Item(full, tuple(int(t) for t in tokens)))
            continue
        unknown = [t for t in tokens if t not in ids]
        if unknown:
            missing.append((full, f"labels not in the vocabulary: {unknown}"))
            continue
        items.append(Item(full, tuple(ids[t] for t in tokens)))
    vocabulary = sorted(ids, key=ids.get) if ids is not None else None
    return Listing(items, vocabulary, missing)


def _read_vocabulary(path: str) -> dict[str, int]:
    ids = {}
    for row in _read_csv_rows(path):
        if row and row[0].strip().isdigit():
            ids[row[1].strip()] = int(row[0])
    if not ids:
        raise ValueError(f"{path}: no 'index,label' rows")
    return ids


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
    """AudioSet: segment CSVs (``YTID, start_seconds, end_seconds, positive_labels``),
    ``class_labels_indices.csv`` (``index,mid,display_name``) and a folder of downloaded clips
    named ``<YTID>``, ``Y<YTID>`` or ``<YTID>_<start>`` (any supported extension)."""
    mid_to_id = {}
    for row in _read_csv_rows(class_labels_csv):
        if len(row) >= 2 and row[0].strip().isdigit():
            mid_to_id[row[1].strip()] = int(row[0])
    if not mid_to_id:
        raise ValueError(f"{class_labels_csv}: no 'index,mid,display_name' rows")
    id_to_name = {}
    for row in _read_csv_rows(class_labels_csv):
        if len(row) >= 3 and row[0].strip().isdigit():
            id_to_name[int(row[0])] = row[2].strip()
    audio = _index_audio(audio_dir)
    items, missing = [], []
    seen = set()
    for segments in segments_csvs:
        for row in _read_csv_rows(segments):
            if len(row) < 4 or row[0].strip().upper() == "YTID":
                continue
            ytid, start = row[0].strip(), row[1].strip()
            if ytid in seen:
                continue
            seen.add(ytid)
            start_int = str(int(float(start))) if start else ""
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
    return Listing(items, vocabulary, missing)


FSD50K_SPLITS = ("dev", "train", "val", "eval")


def _find(root: str, names: Sequence[str]) -> str:
    for name in names:
        candidate = storage.join(root, name)
        if storage.exists(candidate):
            return candidate
    raise FileNotFoundError(f"none of {list(names)} under {root}")


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
    header = [h.strip().lower() for h in rows[0]]
    fname_col, labels_col = header.index("fname"), header.index("labels")
    split_col = header.index("split") if "split" in header else None
    audio = _index_audio(audio_dir)
    items, missing = [], []
    for row in rows[1:]:
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
    vocabulary = [""] * (max(ids.values()) + 1)
    for name, i in ids.items():
        vocabulary[i] = name
    return Listing(items, vocabulary, missing)


HEAR_SPLITS = ("train", "valid", "test")


def from_hear(task_dir: str, split: str, sample_rate: int = 16000) -> Listing:
    """One split of a HEAR 2021 scene task (``task_metadata.json``, ``labelvocabulary.csv``,
    ``SPLIT.json`` mapping file -> labels, audio under ``16000/SPLIT/``), with the task's
    vocabulary, so that a tagger can train and evaluate on it."""
    import json

    if split not in HEAR_SPLITS:
        raise ValueError(f"split must be one of {HEAR_SPLITS}, got {split!r}")
    meta_path = storage.join(task_dir, "task_metadata.json")
    if not storage.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: missing; is {task_dir} a HEAR task folder?")
    meta = json.loads(storage.read_text(meta_path))
    if meta.get("embedding_type") != "scene":
        raise ValueError(f"{meta_path}: a {meta.get('embedding_type')!r} task; only scene "
                         "tasks (one label set per clip) become tagger shards")
    rows = _read_csv_rows(storage.join(task_dir, "labelvocabulary.csv"))
    header = [h.strip().lower() for h in rows[0]]
    idx_col, label_col = header.index("idx"), header.index("label")
    ids = {row[label_col]: int(row[idx_col]) for row in rows[1:]}
    labels_path = storage.join(task_dir, f"{split}.json")
    if not storage.exists(labels_path):
        raise FileNotFoundError(f"{labels_path}: missing; this task has no {split!r} split")
    table = json.loads(storage.read_text(labels_path))
    audio_dir = storage.join(task_dir, str(sample_rate), split)
    items, missing = [], []
    for name in sorted(table):
        path = storage.join(audio_dir, name)
        unknown = [str(lab) for lab in table[name] if str(lab) not in ids]
        if unknown:
            missing.append((path, f"labels not in labelvocabulary.csv: {unknown}"))
        elif not storage.exists(path):
            missing.append((path, "no audio file"))
        else:
            items.append(Item(path, tuple(sorted(ids[str(lab)] for lab in table[name]))))
    vocabulary = [""] * (max(ids.values()) + 1)
    for name, i in ids.items():
        vocabulary[i] = name
    return Listing(items, vocabulary, missing)
