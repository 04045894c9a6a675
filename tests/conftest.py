"""Shared test set-up: 8 CPU devices for mesh tests, and the original implementation's reference
data (tests/fixtures/reference: see its README)."""

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# etils picks its gs:// backend once, at first use: fsspec/gcsfs honours the GCS emulator the
# tests start, TensorFlow's filesystem does not.
os.environ.setdefault("EPATH_USE_TF", "false")
# Measured attention choices are remembered per user; tests keep theirs to themselves.
os.environ.setdefault("MWMAE_CACHE_DIR", tempfile.mkdtemp(prefix="mwmae-test-cache-"))

REPO = pathlib.Path(__file__).resolve().parents[1]

# Dozens of tests (and the trainers they start as processes, which inherit this environment)
# compile the same tiny steps: JAX's persistent compilation cache makes every compile after the
# first a file read. Its key covers the program, the devices, the flags and the JAX version, so a
# stale entry is never used; the folder is git-ignored and shared by the xdist workers and their
# processes. A size bound turns on JAX's file lock around each entry, so that no process reads
# one half written. A compile under 0.3 s is cheaper to redo than to store.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax-compilation"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REFERENCE = REPO / "tests" / "fixtures" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    path = REFERENCE / "original_A"
    if not path.exists():
        pytest.fail(f"reference data missing: expected {path} (part of the repository)")
    return path


@pytest.fixture(scope="session")
def original_checkpoint(reference_dir, tmp_path_factory) -> pathlib.Path:
    """The reference checkpoint as a user downloads it: checkpoint_0 + config.json in a folder."""
    import lzma
    import shutil

    out = tmp_path_factory.mktemp("original_A")
    with lzma.open(reference_dir / "checkpoint" / "checkpoint_0.xz") as src, \
            open(out / "checkpoint_0", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(reference_dir / "checkpoint" / "config.json", out / "config.json")
    return out


@pytest.fixture(scope="session")
def fixtures(reference_dir):
    import numpy as np

    return dict(np.load(reference_dir / "fixtures.npz"))


@pytest.fixture(scope="session")
def reference_model(original_checkpoint):
    import mwmae

    return mwmae.load(original_checkpoint)
