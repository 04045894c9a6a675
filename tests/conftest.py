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

# No persistent compilation cache: with JAX 0.10.2 on 8 CPU devices, an in-process tagger run
# after a pretraining run deadlocked in the CPU collectives' rendezvous (two programs' all-gather
# and all-reduce each waiting for the other's threads) in both runs with executables from the
# cache and in none without it (tests/test_refusal_before_write.py, 2026-12-07). Whether the cache
# causes it or only changes the timing of a race between two threads' collectives is not known.

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


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> pathlib.Path:
    """A finished 6-step tiny run (``checkpointing_config()``: checkpoints 2, 4 and 6), trained
    once per test process for every module that reads one. Read it in place; copy it first to
    change it."""
    from train_helpers import checkpointing_config

    from mwmae.train.loop import train
    from mwmae.train.pretraining import Pretraining

    path = tmp_path_factory.mktemp("trained") / "wd"
    train(Pretraining, checkpointing_config(), path, print_fn=lambda _: None)
    return path
