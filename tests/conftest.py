"""Shared test set-up: 8 CPU devices for mesh tests, and the reference data beside the repo."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    path = REFERENCE / "original_A"
    if not path.exists():
        pytest.fail(f"reference data missing: expected {path} (the shared folder beside the repo)")
    return path
