"""Packaging: ranges in pyproject.toml, exact pins in constraints.txt, every imported package
declared and every declared core package used."""

import ast
import importlib.metadata
import json
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = ("mwmae", "tfrecord_tools", "hear_mwmae")

# Training-stack dependencies (the `train` extra) no module imports by name, and why they are
# declared.
INDIRECT = {
    "jaxlib": "jax's compiled half; pinned with jax",
    "tensorstore": "Orbax's array storage (the gs:// path of checkpoints)",
    "tensorflow-cpu": "CLU's TensorBoard writer",
    "protobuf": "TensorBoard event files and CLU (the version range TF accepts)",
}
# Installed by scripts/install.sh with --no-deps (their own pins are for numpy 1.19).
INSTALLED_BY_SCRIPT = {"heareval", "hearvalidator"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return norm(re.split(r"[\[<>=!~;\s]", req, maxsplit=1)[0])


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def imported_distributions() -> dict[str, str]:
    """{distribution: a file importing it} for every third-party import in the package."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, str] = {}
    for root in FIRST_PARTY:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in FIRST_PARTY:
                        continue
                    for dist in owners.get(top, [top]):
                        found.setdefault(norm(dist), str(path.relative_to(REPO)))
    return found


def test_pyproject_states_ranges_and_the_constraints_pin_them():
    p = project()
    deps = p["dependencies"] + [r for extra in p["optional-dependencies"].values() for r in extra]
    pinned = [r for r in deps if "==" in r]
    assert not pinned, f"exact pins belong in constraints.txt, not pyproject.toml: {pinned}"
    assert "<" not in p["requires-python"]
    lines = [ln for ln in (REPO / "constraints.txt").read_text().splitlines()
             if ln and not ln.startswith("#")]
    pins = {}
    for ln in lines:
        name, sep, version = ln.partition("==")
        assert sep and version and "+" not in version, f"not an exact, portable pin: {ln!r}"
        pins[norm(name)] = version
    core = {requirement_name(r) for r in p["dependencies"]}
    assert core <= set(pins), f"core dependencies without a pin: {sorted(core - set(pins))}"


def test_every_import_is_declared_and_every_core_dependency_used():
    p = project()
    core = {requirement_name(r) for r in p["dependencies"]}
    train = {requirement_name(r) for r in p["optional-dependencies"]["train"]}
    extras = {requirement_name(r) for extra in p["optional-dependencies"].values()
              for r in extra}
    imported = imported_distributions()
    undeclared = {d: f for d, f in imported.items()
                  if d not in core | extras | INSTALLED_BY_SCRIPT}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = (core | train) - set(imported) - set(INDIRECT)
    assert not unused, f"declared but never imported (remove, or say why in INDIRECT): {unused}"
    assert set(INDIRECT) <= train


def test_the_core_is_what_a_jax_free_install_needs():
    """`pip install "mwmae[hear-torch]"` must not bring JAX: the core holds no part of the
    training stack, and hear-torch is the HEAR side alone."""
    p = project()
    core = {requirement_name(r) for r in p["dependencies"]}
    assert core == {"numpy", "safetensors"}, core
    assert p["optional-dependencies"]["hear-torch"] == ["mwmae[hear]"]
    hear = {requirement_name(r) for r in p["optional-dependencies"]["hear"]}
    assert "torch" in hear and not hear & {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint"}


def test_install_script_and_image_use_the_constraints():
    install = (REPO / "scripts" / "install.sh").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -e", install)
    assert "constraints.txt" in (REPO / "Dockerfile").read_text()


def newer_pythons() -> list[str]:
    """Interpreters newer than this one on the machine (PATH, pyenv): the ones a user of the
    HEAR module might install it into."""
    import glob
    import shutil

    found = {shutil.which(f"python3.{m}") for m in range(sys.version_info.minor + 1, 15)}
    found |= set(glob.glob(str(pathlib.Path.home() / ".pyenv/versions/3.1[2-9]*/bin/python3")))
    # A pyenv shim is on PATH even when it cannot run that version: keep those that run.
    return sorted(p for p in found if p and subprocess.run(
        [p, "-m", "pip", "--version"], capture_output=True).returncode == 0)


@pytest.mark.slow
def test_a_plain_pip_install_resolves_without_the_constraints(tmp_path):
    """What `pip install ".[train]"` would install, from the ranges alone (no constraints
    file): it must resolve, to versions inside the ranges (pip checks that), with this
    interpreter and any newer one present."""
    for python in [sys.executable, *newer_pythons()[:1]]:
        report = tmp_path / f"report-{pathlib.Path(python).parent.parent.name}.json"
        out = subprocess.run(
            [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(report), f"{REPO}[train]"],
            capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{python}: pip could not resolve:\n{out.stderr[-3000:]}"
        names = {norm(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
        assert {"jax", "flax", "orbax-checkpoint", "mwmae"} <= names, (python, sorted(names))
