"""The images, built for real: scripts/build_images.sh builds them with buildah (no Docker
daemon) and checks the cpu one (entry point help, hear-validator on an exported artifact, a
20-step training). The fast tests read its --dry-run commands; the slow one builds."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build_images.sh"
CHECKS = ("help", "hear-validator", "train-20")


def recorders(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """buildah and debootstrap that record a call and fail: a dry run must call neither."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("buildah", "debootstrap", "podman"):
        exe = bin_dir / name
        exe.write_text(textwrap.dedent(f"""\
            #!/usr/bin/env bash
            echo "{name} $*" >> {log}
            exit 1
            """))
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir, log


def dry_run(tmp_path: pathlib.Path, args: list[str], **env: str):
    bin_dir, log = recorders(tmp_path)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MWMAE_")}
    environ.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path),
                   **env)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=tmp_path,
                            env=environ, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not log.exists(), f"a dry run ran {log.read_text()}"
    commands = [shlex.split(line[2:]) for line in result.stdout.splitlines()
                if line.startswith("+ ")]
    return result.stdout, commands


def mounts(command: list[str]) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == "-v"]


def build_args(command: list[str]) -> dict[str, str]:
    pairs = [command[i + 1].split("=", 1) for i, arg in enumerate(command)
             if arg == "--build-arg"]
    return dict(pairs)


@pytest.fixture
def host(tmp_path):
    """A pip configuration like one behind a proxy with a local mirror, and a CA folder."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "wheels").mkdir()
    (tmp_path / "mirror" / "simple").mkdir(parents=True)
    (tmp_path / "pins.txt").write_text("torch<=3\n")
    conf = tmp_path / "pip.conf"
    conf.write_text(textwrap.dedent(f"""\
        [global]
        cert = {tmp_path}/certs/bundle.crt
        find-links = {tmp_path}/wheels
        extra-index-url = file://{tmp_path}/mirror/simple https://example.org/simple
        constraint = {tmp_path}/pins.txt
        no-such = {tmp_path}/absent
        """))
    return {"MWMAE_PIP_CONF": str(conf), "MWMAE_CA_DIR": str(tmp_path / "certs")}


def test_dry_run_prints_the_base_the_build_and_the_three_checks(tmp_path, host):
    out, commands = dry_run(tmp_path, [], **host)
    # The default target is cpu, and the base is made when missing (a localhost/ name).
    debootstrap = next(c for c in commands if c[0] == "debootstrap")
    assert "--variant=minbase" in debootstrap and "bookworm" in debootstrap
    include = next(a for a in debootstrap if a.startswith("--include=")).split("=")[1]
    assert {"python3", "python3-venv", "python3-pip", "ca-certificates"} <= set(include.split(","))
    buildah = [c for c in commands if c[0] == "buildah"]
    assert all(c[1:3] == ["--storage-driver", "vfs"] for c in buildah)
    assert ["commit", "--rm"] == next(c for c in buildah if "commit" in c)[3:5]
    assert next(c for c in buildah if "commit" in c)[-1] == "localhost/bookworm-python:base"

    builds = [c for c in buildah if c[3] == "bud"]
    assert len(builds) == 1
    bud = builds[0]
    assert bud[4:8] == ["--isolation", "chroot", "--format", "docker"]  # keeps SHELL
    assert bud[-5:] == ["-f", "Dockerfile", "-t", "localhost/mwmae:cpu", "."]
    assert build_args(bud) == {"TARGET": "cpu",
                               "PYTHON_IMAGE": "localhost/bookworm-python:base"}
    # What pip in the build reads from this host, read-only: the CA folder, the pip.conf, and the
    # local paths it names (a file:// index with its parent, whose files its pages link to);
    # never a path that does not exist, and nothing twice.
    t = tmp_path
    assert sorted(mounts(bud)) == sorted([
        f"{t}/certs:/etc/ssl/certs:ro", f"{host['MWMAE_PIP_CONF']}:/etc/pip.conf:ro",
        f"{t}/wheels:{t}/wheels:ro", f"{t}/mirror:{t}/mirror:ro", f"{t}/pins.txt:{t}/pins.txt:ro"])

    # One working container for the checks, each run with chroot isolation.
    ctr = next(c for c in buildah if c[3] == "from" and c[-1] == "localhost/mwmae:cpu")[-2]
    runs = [" ".join(c[c.index("--") + 1:]).split() for c in buildah if c[3] == "run"]
    assert all(c[3:7] == ["run", "--isolation", "chroot", ctr] for c in buildah if c[3] == "run")
    assert len(runs) == 3
    assert runs[0] == ["python", "-m", "mwmae.job", "--helpshort"]
    hear = " ".join(runs[1])
    assert "python -m mwmae.train --config configs/tiny.py" in hear
    assert "--config.data.num_workers=0" in hear
    assert "python -m mwmae.export --workdir /tmp/mwmae-hear --out /tmp/mwmae-artifact" in hear
    assert "hear-validator hear_mwmae --model /tmp/mwmae-artifact" in hear
    train = " ".join(runs[2])
    assert ("python -m mwmae.train --config configs/tiny.py --workdir /tmp/w "
            "--config.num_train_steps=20 --config.data.num_workers=0") in train
    assert "python -m mwmae.checkpoint inspect /tmp/w" in train
    assert [f"==> check {c}" for c in CHECKS] == re.findall(r"^==> check \S+", out, re.M)
    assert "passed" not in out and "FAILED" not in out


def test_environment_picks_driver_storage_base_name_and_mounts(tmp_path):
    _, commands = dry_run(tmp_path, ["tpu", "cuda"], MWMAE_STORAGE_DRIVER="overlay",
                          MWMAE_STORAGE_ROOT="/srv/containers",
                          MWMAE_BASE_IMAGE="python:3.11.11-slim-bookworm",
                          MWMAE_IMAGE="registry.example/mwmae", MWMAE_PIP_CONF="none",
                          MWMAE_CA_DIR="none", MWMAE_TORCH_INDEX="none")
    # A registry base is pulled by the build, not made here; tpu and cuda have no checks.
    assert [c[0] for c in commands] == ["buildah", "buildah"]
    for command, target in zip(commands, ("tpu", "cuda")):
        assert command[:6] == ["buildah", "--storage-driver", "overlay", "--root",
                               "/srv/containers", "bud"]
        assert mounts(command) == []
        assert build_args(command) == {"TARGET": target, "TORCH_INDEX": "none",
                                       "PYTHON_IMAGE": "python:3.11.11-slim-bookworm"}
        assert command[-3:] == ["-t", f"registry.example/mwmae:{target}", "."]


def test_bad_argument_is_refused_before_anything_runs(tmp_path):
    bin_dir, log = recorders(tmp_path)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(["bash", str(SCRIPT), "cpu", "gpu"], capture_output=True, text=True,
                            env={**os.environ, "PATH": path}, timeout=60)
    assert result.returncode == 2
    assert "unknown argument 'gpu'" in result.stderr and not log.exists()


@pytest.mark.slow
@pytest.mark.images
def test_cpu_image_builds_and_passes_its_checks():
    """Builds localhost/mwmae:cpu (and the base when missing) and runs its three checks. Needs
    root, buildah and debootstrap; run on purpose with `pytest -m images` (CI's time budget does
    not take its 10-15 min)."""
    assert shutil.which("buildah") is not None, (
        "buildah is not installed: apt-get install -y buildah debootstrap (as root)")
    env = {k: v for k, v in os.environ.items() if k not in ("MWMAE_IMAGE",)}
    result = subprocess.run(["bash", str(SCRIPT), "cpu"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=3600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert re.search(r"^<== build localhost/mwmae:cpu: ok", out, re.M), out[-6000:]
    passed = dict(re.findall(r"^check (\S+): passed \((.*)\)$", out, re.M))
    assert set(passed) == set(CHECKS), out[-6000:]
    assert "python -m mwmae.train --config" in passed["help"]
    assert "Looks good!" in passed["hear-validator"]
    assert re.match(r"20 +complete", passed["train-20"])
    assert "FAILED" not in out
    print(out[out.rindex("summary:"):], file=sys.stderr)
