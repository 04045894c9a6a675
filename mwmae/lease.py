"""A writer lease: at most one trainer writes a workdir at a time, local or gs:// alike.

The lease is one small JSON object (who holds it, when it was last refreshed, after how many
seconds without a refresh it counts as abandoned). Every change to it is a compare-and-swap on
its *generation*:

* gs://: the object generation, with GCS's ``ifGenerationMatch`` preconditions (0 = "only if
  it does not exist"), so two trainers racing for it cannot both win;
* local: the file's bytes, compared and replaced under an ``flock`` on a sidecar file held only
  for the few microseconds of the swap (the kernel drops it if the process dies).

The holder refreshes it from a background thread every ``stale_after_s / 4``; a trainer that
finds a lease refreshed less than ``stale_after_s`` ago refuses to start, naming the holder.

A holder that died leaves its lease behind. On the holder's own machine (same host name and
boot id) death is certain when its pid is gone: the lease is taken over at once, and said so.
From another machine (a preempted VM, another host of a pod) nothing is certain, so the lease
must first go stale, ``stale_after_s`` after its last refresh. Staleness compares the holder's
refresh time with the reader's clock, so hosts' clocks must agree to well within
``stale_after_s`` (NTP does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live process holds the lease."""


class LeaseLost(RuntimeError):
    """The lease was taken over while this process believed it held it."""


class _Conflict(Exception):
    """A compare-and-swap lost the race."""


# ----------------------------------------------------------------------------- storage


class _LocalStore:
    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def read(self) -> tuple[bytes, Any] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def swap(self, data: bytes | None, expected: Any) -> Any:
        """Write ``data`` (None: delete) if the current generation is ``expected`` (None: the
        lease must not exist); return the new generation."""
        with self._locked():
            current = self.read()
            if (current[1] if current else None) != expected:
                raise _Conflict
            if data is None:
                os.remove(self.path)
                return None
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return data


class _GcsStore:
    """The object through gcsfs's HTTP session (the client the tests' emulator serves)."""

    def __init__(self, path: str):
        import gcsfs

        self.fs = gcsfs.GCSFileSystem()
        bucket, _, name = path[len("gs://"):].partition("/")
        self.bucket, self.name = bucket, name

    def read(self) -> tuple[bytes, Any] | None:
        try:
            meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.name, json_out=True)
            gen = int(meta["generation"])
            data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.name, alt="media",
                                generation=gen)
        except FileNotFoundError:
            return None
        if isinstance(data, tuple):  # gcsfs returns (headers, body) for raw responses
            data = data[-1]
        return bytes(data), gen

    def swap(self, data: bytes | None, expected: Any) -> Any:
        # A multipart upload (metadata + bytes): GCS honours ifGenerationMatch on every upload
        # kind, the emulator only on this one, so this is the kind both run.
        try:
            if data is None:
                self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.name,
                             ifGenerationMatch=expected)
                return None
            boundary = uuid.uuid4().hex
            body = b"".join([
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                json.dumps({"name": self.name}).encode(),
                f"\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode(),
                data, f"\r\n--{boundary}--\r\n".encode()])
            out = self.fs.call(
                "POST", f"{self.fs._location}/upload/storage/v1/b/{{}}/o", self.bucket,
                uploadType="multipart", ifGenerationMatch=0 if expected is None else expected,
                data=body, json_out=True,
                headers={"Content-Type": f"multipart/related; boundary={boundary}"})
        except (FileExistsError, FileNotFoundError) as e:  # gcsfs: 412 and 404
            raise _Conflict from e
        return int(out["generation"])


def _store(path: str):
    return _GcsStore(path) if path.startswith("gs://") else _LocalStore(path)


# ----------------------------------------------------------------------------- the lease


def boot_id() -> str:
    """This machine's boot id (Linux), so that a pid is compared only within one boot; "" where
    there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


@dataclasses.dataclass
class Holder:
    """What a lease says about its holder (``host``, ``boot`` and ``pid`` are empty/0 in leases
    written by older versions: they are then judged by staleness alone)."""

    who: str
    token: str
    acquired: float
    refreshed: float
    stale_after_s: float
    host: str = ""
    boot: str = ""
    pid: int = 0
    role: str = "trainer"  # what holds it: "trainer" or "preflight" (older leases: trainer)

    def is_dead_here(self) -> bool:
        """True when the holder ran on this machine, in this boot, and its process is gone."""
        return (bool(self.host) and self.pid > 0 and self.host == socket.gethostname()
                and bool(self.boot) and self.boot == boot_id() and not _pid_alive(self.pid))

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.refreshed

    def is_stale(self, now: float | None = None) -> bool:
        return self.age(now) > self.stale_after_s

    def state(self, now: float | None = None) -> str:
        """"dead" (its process is gone on this host), "stale" (no refresh for
        ``stale_after_s``) or "live": what :meth:`Lease.acquire` would find."""
        if self.is_dead_here():
            return "dead"
        return "stale" if self.is_stale(now) else "live"

    def describe(self) -> str:
        return (f"{self.who} (refreshed {self.age():.0f} s ago; stale after "
                f"{self.stale_after_s:.0f} s without a refresh)")


def _parse(data: bytes) -> Holder | None:
    try:
        d = json.loads(data)
        return Holder(str(d["who"]), str(d["token"]), float(d["acquired"]),
                      float(d["refreshed"]), float(d["stale_after_s"]), str(d.get("host", "")),
                      str(d.get("boot", "")), int(d.get("pid", 0)),
                      str(d.get("role", "trainer")))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: treated as abandoned


class Lease:
    """The writer lease at ``path`` (a local path or gs://bucket/object).

    Use as a context manager or call :meth:`acquire` / :meth:`release`; :attr:`lost` turns true
    if a refresh finds another holder.
    """

    def __init__(self, path: str, stale_after_s: float = 120.0, who: str | None = None,
                 role: str = "trainer"):
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self.path = path
        self.stale_after_s = float(stale_after_s)
        self.who = who or f"pid {os.getpid()} on {socket.gethostname()}"
        self.role = role
        self.token = uuid.uuid4().hex
        self._store = _store(path)
        self._generation: Any = None
        self._acquired = 0.0
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps({"who": self.who, "token": self.token, "acquired": self._acquired or now,
                           "refreshed": now, "stale_after_s": self.stale_after_s,
                           "host": socket.gethostname(), "boot": boot_id(),
                           "pid": os.getpid(), "role": self.role}).encode()

    def holder(self) -> Holder | None:
        """The current holder, if the lease exists and is readable."""
        current = self._store.read()
        return _parse(current[0]) if current else None

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeld` naming the live holder."""
        for _ in range(3):
            current = self._store.read()
            expected = None
            if current is not None:
                holder = _parse(current[0])
                if holder is not None and holder.is_dead_here():
                    log.warning("%s: taking over the writer lease of %s: that process is gone "
                                "(killed or crashed) on this host", self.path, holder.who)
                elif holder is not None and not holder.is_stale():
                    raise LeaseHeld(
                        f"{self.path}: another {holder.role} is writing this workdir: "
                        f"{holder.describe()}. Stop it, or wait until its lease goes stale, or "
                        "use another --workdir.")
                else:
                    log.warning("%s: taking over a stale writer lease%s", self.path,
                                f" of {holder.describe()}" if holder else "")
                expected = current[1]
            self._acquired = time.time()
            try:
                self._generation = self._store.swap(self._payload(), expected)
            except _Conflict:
                continue  # someone changed it between the read and the swap: look again
            self._held = True
            return
        raise LeaseHeld(f"{self.path}: the writer lease keeps changing hands; another trainer "
                        "is starting on this workdir")

    def refresh(self) -> None:
        """Rewrite the lease with a new refresh time; :class:`LeaseLost` if it is not ours."""
        if not self._held:
            raise LeaseLost(f"{self.path}: not held")
        try:
            self._generation = self._store.swap(self._payload(), self._generation)
        except _Conflict:
            self._held, self.lost = False, True
            holder = self.holder()
            raise LeaseLost(f"{self.path}: the writer lease was taken over by "
                            f"{holder.describe() if holder else 'another process'}") from None

    def start_refreshing(self) -> None:
        """Refresh from a daemon thread every ``stale_after_s / 4`` until :meth:`release`."""
        def loop():
            while not self._stop.wait(self.stale_after_s / 4):
                try:
                    self.refresh()
                except LeaseLost as e:
                    log.error("%s", e)
                    return
                except Exception as e:  # noqa: BLE001 - a storage hiccup: try again next time
                    log.warning("%s: lease refresh failed (%s); retrying", self.path, e)

        self._thread = threading.Thread(target=loop, name="writer-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop refreshing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._held:
            self._held = False
            with contextlib.suppress(_Conflict, FileNotFoundError):
                self._store.swap(None, self._generation)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
