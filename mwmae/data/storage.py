"""Local and gs:// file access through fsspec (gcsfs for gs://).

Every byte the input pipeline and the shard builder read or write goes through here, so a TPU VM
reading ``gs://bucket/shards/*.tfrecord`` runs the same code the tests run against a local GCS
emulator. Credentials come from the usual Google sources (the TPU VM's service account,
``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``).

Pointing the clients at an emulator (or any GCS-compatible endpoint):

* ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``: gcsfs and google-cloud-storage;
* ``CLOUD_STORAGE_EMULATOR_ENDPOINT=http://127.0.0.1:PORT``: array_record's native reader;
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: keeps gcsfs from probing bucket types the
  emulator does not know (a 60 s timeout per bucket otherwise);
* ``NO_GCE_CHECK=true`` and ``GCE_METADATA_HOST`` / ``GCE_METADATA_IP`` aimed at a closed
  loopback port: nothing waits on a metadata server that is not there.

:func:`emulator_environment` returns that set for an endpoint.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec

__all__ = [
    "absolute",
    "emulator_environment",
    "exists",
    "glob",
    "is_remote",
    "join",
    "open_read",
    "open_write",
    "put_file",
    "read_bytes",
    "replace",
    "write_bytes",
]


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def absolute(path: str | os.PathLike) -> str:
    """Local paths made absolute (Orbax finds no item metadata under a relative path); remote
    ones as they are."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def _fs(path: str) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(path)


def _protocol_prefix(path: str) -> str:
    return path.split("://", 1)[0] + "://" if is_remote(path) else ""


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return posixpath.join(base, *names)
    return os.path.join(base, *names)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.exists(p)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, with the protocol kept on remote paths."""
    fs, p = _fs(pattern)
    prefix = _protocol_prefix(pattern)
    return sorted(prefix + m if prefix and "://" not in m else m for m in fs.glob(p))


def open_read(path: str, block_size: int = 8 << 20) -> IO[bytes]:
    """A binary file object; a missing file raises FileNotFoundError naming ``path``."""
    fs, p = _fs(path)
    try:
        if is_remote(path):
            return fs.open(p, "rb", block_size=block_size)
        return open(p, "rb")  # noqa: SIM115 - the caller owns and closes it
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such file") from e


@contextmanager
def open_write(path: str) -> Iterator[IO[bytes]]:
    fs, p = _fs(path)
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    with fs.open(p, "wb") as f:
        yield f


def put_file(local_path: str, remote_path: str) -> None:
    """Uploads a finished local file; a GCS object becomes visible only once complete."""
    fs, p = _fs(remote_path)
    fs.put_file(local_path, p)


def replace(src: str, dst: str) -> None:
    """Atomic rename for local paths (the shard builder's commit step)."""
    os.replace(src, dst)


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_bytes(path: str) -> bytes:
    """The whole file; a missing one raises FileNotFoundError naming ``path``."""
    with open_read(path) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Writes whole: locally via a temporary name and a rename; a GCS object appears only
    once its upload is complete."""
    if is_remote(path):
        with open_write(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """Writes whole (via a temporary name and a rename when local)."""
    if is_remote(path):
        with open_write(path) as f:
            f.write(text.encode("utf-8"))
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def emulator_environment(endpoint: str, closed_port: int = 9) -> dict[str, str]:
    """Environment variables that send gcsfs, array_record and Orbax/tensorstore to a GCS
    emulator at ``endpoint``.

    ``closed_port`` is a loopback port with nothing listening, used for the metadata server.
    """
    endpoint = endpoint.rstrip("/")
    metadata = f"127.0.0.1:{closed_port}"
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": metadata,
        "GCE_METADATA_IP": metadata,
        "GCE_METADATA_ROOT": metadata,
        # Orbax checkpoints go through tensorstore (and etils paths through fsspec/gcsfs).
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "EPATH_USE_TF": "false",
    }
