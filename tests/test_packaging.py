"""Packaging: ranges in pyproject.toml, exact pins in constraints.txt, every imported package
declared and every declared core package used."""

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = ("mwmae", "tfrecord_tools", "hear_mwmae")

# Core dependencies no module imports by name, and why they are declared.
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
    extras = {requirement_name(r) for extra in p["optional-dependencies"].values()
              for r in extra}
    imported = imported_distributions()
    undeclared = {d: f for d, f in imported.items()
                  if d not in core | extras | INSTALLED_BY_SCRIPT}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = core - set(imported) - set(INDIRECT)
    assert not unused, f"declared but never imported (remove, or say why in INDIRECT): {unused}"
    assert set(INDIRECT) <= core


def test_install_script_and_image_use_the_constraints():
    install = (REPO / "scripts" / "install.sh").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -e", install)
    assert "constraints.txt" in (REPO / "Dockerfile").read_text()
