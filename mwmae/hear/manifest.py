"""The SHA-256 of every file a HEAR evaluation wrote in its output folder, checked on a rerun.

hear-eval-kit reads back what it finds in the output folder, pickles included (the labels of
every split), and ``OUT`` may be writable by others. So an evaluation vouches only for its own
files: after each step it records their digests in ``OUT/manifest.json`` (``{"files": {path
relative to OUT: sha256}}``, replaced atomically), and before a rerun reuses a finished step it
checks that every file of the step's folder is recorded with that digest and every recorded file
is there (:func:`problem`). A step that fails the check is recomputed, never read.

A manifest is only as safe as the folder: whoever can write ``OUT`` can rewrite it too. It catches
files planted, edited or cut short after the fact; the label pickles are in addition read with
:func:`load_plain_pickle`, which runs no code whatever the file holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

MANIFEST = "manifest.json"
# What an evaluation writes first in its output folder (settings and weights it was made from).
FINGERPRINT = "fingerprint.json"


class ManifestError(ValueError):
    """An unreadable ``manifest.json``; the message names it."""


def evaluation_folder(path: str | os.PathLike) -> pathlib.Path | None:
    """The evaluation output folder ``path`` is or lies in (the nearest folder up from it that
    holds a fingerprint beside a manifest, results or embeddings), else None."""
    here = pathlib.Path(os.path.realpath(path))
    for folder in (here, *here.parents):
        if (folder / FINGERPRINT).is_file() and any(
                (folder / name).exists() for name in (MANIFEST, "results.json", "embeddings")):
            return folder
    return None


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read(out_dir: pathlib.Path) -> dict[str, str]:
    """{relative path: sha256} of ``OUT/manifest.json``; {} when there is none. A manifest that
    is not one raises :class:`ManifestError` (the caller then trusts nothing)."""
    path = out_dir / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: unreadable ({e})") from e
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ManifestError(f"{path}: not a manifest (expected {{\"files\": {{path: sha256}}}})")
    return files


def write(out_dir: pathlib.Path, files: dict[str, str]) -> None:
    """Replace ``OUT/manifest.json`` atomically: a crash leaves the old one or the new one."""
    path = out_dir / MANIFEST
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=0))
    os.replace(tmp, path)


def _key(out_dir: pathlib.Path, path: pathlib.Path) -> str:
    return path.relative_to(out_dir).as_posix()


def _files(folder: pathlib.Path, recursive: bool) -> Iterator[pathlib.Path]:
    """Regular files and links under ``folder`` (subfolders too with ``recursive``)."""
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if p.is_symlink() or p.is_file():
            yield p


def record(out_dir: pathlib.Path, folder: pathlib.Path, *, recursive: bool = True) -> None:
    """Add the digest of every regular file under ``folder`` (a step's output, just written)
    to the manifest, in place of what it held for that folder. Links are not recorded: what
    they point to is checked by :func:`problem`."""
    try:
        files = read(out_dir)
    except ManifestError:
        files = {}  # the rerun found it unreadable and trusted none of it
    prefix = _key(out_dir, folder) + "/"
    files = {k: v for k, v in files.items() if not k.startswith(prefix)}
    for p in _files(folder, recursive):
        if not p.is_symlink():
            files[_key(out_dir, p)] = sha256_file(p)
    write(out_dir, files)


def record_file(out_dir: pathlib.Path, *paths: pathlib.Path) -> None:
    """Add the digests of single files of ``OUT`` (results, the fingerprint)."""
    try:
        files = read(out_dir)
    except ManifestError:
        files = {}
    for p in paths:
        files[_key(out_dir, p)] = sha256_file(p)
    write(out_dir, files)


def problem(out_dir: pathlib.Path, files: dict[str, str], folder: pathlib.Path, *,
            recursive: bool = True, links_to: pathlib.Path | None = None) -> str | None:
    """Why the finished step in ``folder`` cannot be trusted, naming the file; None when every
    file is one the manifest ``files`` records with its digest and none it records is missing.
    A link must point at the file of the same name in ``links_to`` (a seed's predictions link
    to their task's embeddings, which are checked on their own)."""
    prefix = _key(out_dir, folder) + "/"
    expected = {k for k in files if k.startswith(prefix)}
    for p in _files(folder, recursive):
        key = _key(out_dir, p)
        if p.is_symlink():
            target = pathlib.Path(os.path.realpath(p))
            if links_to is None or target != pathlib.Path(os.path.realpath(links_to / p.name)):
                return f"{p}: a link this evaluation did not make (to {target})"
            continue
        if key not in files:
            return f"{p}: not written by this evaluation (not in {MANIFEST})"
        if sha256_file(p) != files[key]:
            return f"{p}: changed since this evaluation wrote it (SHA-256 not that in {MANIFEST})"
        expected.discard(key)
    if expected:
        return f"{out_dir / sorted(expected)[0]}: missing (recorded in {MANIFEST})"
    return None


def prune(out_dir: pathlib.Path) -> None:
    """Drop the entries of files that are gone (outputs removed to be recomputed)."""
    try:
        files = read(out_dir)
    except ManifestError:
        return
    kept = {k: v for k, v in files.items() if (out_dir / k).is_file()}
    if kept != files:
        write(out_dir, kept)


def remove(path: pathlib.Path) -> None:
    """Remove a file, a link (not what it points to) or a folder."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def discard_unverified(out_dir: pathlib.Path, module: str, task_names: Sequence[str],
                       log: Callable[[str], Any] = print) -> None:
    """Remove the finished steps of an evaluation (``OUT/embeddings/MODULE/TASK``, marked done
    by ``.done.embeddings``; ``OUT/predictions/seed_S/TASK``, by ``test.predicted-scores.json``)
    whose folders fail :func:`problem`, so that they are recomputed, never read; a task's
    embeddings take their predictions along. Each removal is a warning through ``log`` naming
    the file. Then drop the entries of files that are gone."""
    try:
        files = read(out_dir)
    except ManifestError as e:
        log(f"warning: {e}; no output there is trusted, so all are recomputed")
        files = {}
    for task in task_names:
        embed_dir = out_dir / "embeddings" / module / task
        works = [d / task for d in sorted((out_dir / "predictions").glob("seed_*"))
                 if (d / task).exists() or (d / task).is_symlink()]
        if embed_dir.is_symlink() or (embed_dir / ".done.embeddings").exists():
            why = (f"{embed_dir}: a link, not this evaluation's folder" if embed_dir.is_symlink()
                   else problem(out_dir, files, embed_dir, recursive=False))
            if why:
                log(f"warning: {why}; not loaded: recomputing the embeddings of {task} and "
                    "their predictions")
                for path in (embed_dir, *works):
                    remove(path)
                continue
        for work in works:
            if work.is_symlink():
                why = f"{work}: a link, not this evaluation's folder"
            elif (work / "test.predicted-scores.json").exists():
                why = problem(out_dir, files, work, links_to=embed_dir)
            else:
                continue  # unfinished: the predictor step starts it afresh
            if why:
                log(f"warning: {why}; not loaded: recomputing the predictions of {task}, "
                    f"{work.parent.name}")
                remove(work)
    prune(out_dir)


class _PlainUnpickler(pickle.Unpickler):
    # Lists, dicts, tuples, strings and numbers need no global; anything that names one (a
    # class, a function to call on load) is what runs code, so no global is ever resolved.
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"it names {module}.{name}: a pickle of labels holds plain "
                                     "data only; not loaded")


def load_plain_pickle(file: BinaryIO) -> Any:
    """``pickle.load`` for data made of lists, dicts, tuples, strings and numbers only: a
    pickle that would import or call anything is refused (UnpicklingError naming the file)."""
    name = getattr(file, "name", "pickle")
    try:
        return _PlainUnpickler(file).load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{name}: {e}") from None
