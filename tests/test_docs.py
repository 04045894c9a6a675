"""The manual stays true to the code: every flag the docs give a command exists, every config
key they override is in its schema, every module is on the architecture page (and every module
named there exists), the reference pages list every config key and metric tag, and the site
builds strictly (no broken link or anchor). Each check takes the docs' text as input, so the
tests below also show it failing on a deliberately broken page."""

from __future__ import annotations

import ast
import functools
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PACKAGES = ("mwmae", "tfrecord_tools", "hear_mwmae")


def doc_pages() -> list[pathlib.Path]:
    return [REPO / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "results" not in p.parts)]


def problems_in_docs(check) -> list[str]:
    """What ``check(name, text)`` finds on every page of the docs."""
    return [p for page in doc_pages() for p in check(str(page.relative_to(REPO)),
                                                     page.read_text())]


# ------------------------------------------------------------------- commands and their flags

def _flags_in_source(path: pathlib.Path) -> set[str]:
    """Every flag a module's parsers define (argparse ``add_argument("--x")``, absl
    ``DEFINE_*("x")``), in each spelling the command accepts: tools parsing through
    ``mwmae.cli`` (``parse_args``, or ``run_config_tool`` for absl) take hyphens and underscores
    alike; plain absl apps and argparse scripts take their flags only as defined."""
    names = set()
    source = path.read_text()
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        args = [a.value for a in node.args if isinstance(a, ast.Constant)
                and isinstance(a.value, str)]
        if node.func.attr == "add_argument":
            names |= {a[2:] for a in args if a.startswith("--")}
        elif node.func.attr.startswith("DEFINE") and args:
            names.add(args[0])
            if node.func.attr == "DEFINE_bool":
                names.add("no" + args[0])
    if "cli.parse_args" in source or "run_config_tool" in source:
        names |= {n.replace("_", "-") for n in names} | {n.replace("-", "_") for n in names}
    return names


def _flags_in_script(path: pathlib.Path) -> set[str]:
    """The flags a shell script's ``case`` arms accept (``--name)`` or ``-h|--help)``)."""
    flags = set()
    for arm in re.findall(r"^\s*([-\w|]+)\)", path.read_text(), re.M):
        flags |= {f[2:] for f in arm.split("|") if f.startswith("--") and len(f) > 2}
    return flags


# Scripts whose arguments go on to a command: after ``--`` (the launchers hand the trainer its
# flags), or all of them (the HEAR launcher adds its own three paths to the evaluation's).
_AFTER_DASHES = {"launch/tpu_vm.sh": "mwmae.train", "launch/gpu_docker.sh": "mwmae.train"}
_FORWARDS = {"launch/hear_eval.sh": "mwmae.hear.evaluate"}
# Scripts that pass their arguments to pytest: those are pytest's to check.
_UNCHECKED = {"scripts/test.sh", "scripts/test_tpu.sh"}

# Modules whose command line is another's: the tagger's is the trainer's, the image's entry
# point passes its flags to the trainer.
_SAME_FLAGS = {"mwmae.finetune": "mwmae.train", "mwmae.job": "mwmae.train"}
# absl's own flags, accepted by every absl command.
_ABSL = {"help", "helpshort", "helpfull", "flagfile", "undefok", "logtostderr", "v"}


@functools.cache
def command_flags() -> dict[str, set[str]]:
    """{command: the flags it accepts} for every ``python -m`` module, script and console
    script of the project."""
    out = {}
    for path in [*REPO.glob("mwmae/**/*.py"), *REPO.glob("tfrecord_tools/*.py")]:
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] in ("__main__", "__init__") else parts)
        source = path.read_text()
        if ("ArgumentParser" in source or "DEFINE_" in source or path.name == "__main__.py"
                or 'if __name__ == "__main__"' in source):
            out[module] = out.get(module, set()) | _flags_in_source(path)
    for path in [*REPO.glob("benchmarks/*.py"), REPO / "xm_launcher.py"]:
        out[str(path.relative_to(REPO))] = _flags_in_source(path)
    for alias, module in _SAME_FLAGS.items():
        out[alias] = out[module]
    for path in [*REPO.glob("scripts/*.sh"), *REPO.glob("launch/*.sh")]:
        name = str(path.relative_to(REPO))
        out[name] = _flags_in_script(path) | out.get(_FORWARDS.get(name, ""), set())
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for script, target in scripts.items():
        module = target.split(":")[0].removesuffix(".__main__")
        out[script] = out.get(module, set())
    absl = {m for m, f in out.items() if "config" in f and not m.endswith(".sh")}
    return {m: f | (_ABSL if m in absl else set()) | {"help"} for m, f in out.items()}


@functools.cache
def config_keys() -> dict[str, set[str]]:
    """{absl command: the dotted keys its configs may hold}."""
    from mwmae.finetune.config import tag_config
    from mwmae.train.config import default_config

    def keys(c, prefix=""):
        found = set()
        for k, v in c.items():
            found.add(prefix + k)
            if hasattr(v, "items"):
                found |= keys(v, prefix + k + ".")
        return found

    train, tag = keys(default_config()), keys(tag_config())
    return {"mwmae.train": train, "mwmae.finetune": tag, "mwmae.preflight": train | tag,
            "mwmae.job": train | tag}


# Generic spellings in prose ("--config.x=y"), not keys.
PLACEHOLDER_KEYS = {"x", "key", "KEY", "x.y"}
_COMMAND = re.compile(r"(?:python3?\s+-m\s+([\w.]+)|python3?\s+((?:benchmarks/)?[\w]+\.py)"
                      r"|(?<![\w/.:-])(mwmae-[a-z-]+)(?![\w.-])"
                      r"|(?<![\w/.-])((?:scripts|launch)/\w+\.sh))")


def commands_in(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, command, its arguments) of every project command in the fenced code blocks and
    inline code of a markdown text; continued lines (``\\``) are joined, and ``&&``, ``|``,
    ``;`` end one."""
    found = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            # Commands in inline code (the README's table of commands) count too.
            for span in re.findall(r"`([^`]+)`", line):
                found += [(number, command, args) for _, command, args in commands_in(
                    f"```\n{span}\n```")]
            continue
        if not pending:
            start = number
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        if code.rstrip().endswith("\\"):
            pending += code.rstrip()[:-1] + " "
            continue
        whole, pending = pending + code, ""
        for part in re.split(r"&&|\|\||[|;]", whole):
            match = _COMMAND.search(part)
            if not match:
                continue
            command = next(g for g in match.groups() if g)
            try:
                args = shlex.split(part[match.end():], comments=False)
            except ValueError:
                args = part[match.end():].split()
            found.append((start, command, args))
    return found


def flag_problems(name: str, text: str) -> list[str]:
    """What in ``text`` (a markdown page called ``name``) names a flag or config key that its
    command does not have."""
    known, keys = command_flags(), config_keys()
    problems = []
    for line, command, args in commands_in(text):
        if command in _UNCHECKED:
            continue
        if command not in known:
            if command.startswith("mwmae") or command.endswith((".py", ".sh")):
                problems.append(f"{name}:{line}: {command}: not a command of the project")
            continue
        if command == "mwmae.job" and args and not args[0].startswith("-"):
            continue  # `mwmae.job TOOL ...`: that tool's flags
        for arg in args:
            if arg == "--" and command in _AFTER_DASHES:
                command = _AFTER_DASHES[command]
                continue
            if not arg.startswith("--") or arg == "--":
                continue
            flag = arg[2:].split("=", 1)[0]
            if flag.startswith("config.") and command.endswith(".sh"):
                problems.append(f"{name}:{line}: {command} --{flag}: no such flag (the "
                                "trainer's flags go after --)")
            elif flag.startswith("config."):
                key = flag[len("config."):]
                schema = keys.get(command, keys["mwmae.train"])
                if key not in PLACEHOLDER_KEYS and key not in schema:
                    problems.append(f"{name}:{line}: {command} --config.{key}: no such config "
                                    "key")
            elif not re.fullmatch(r"[A-Za-z][\w-]*", flag) or flag.isupper():
                continue  # a placeholder such as --FLAG or a shell expansion
            elif flag not in known[command]:
                problems.append(f"{name}:{line}: {command} --{flag}: no such flag")
    return problems


def test_every_flag_the_docs_name_exists():
    assert len(doc_pages()) > 10
    assert problems_in_docs(flag_problems) == []


def test_the_flag_check_fails_on_a_broken_page():
    page = "\n".join([
        "```bash",
        "python -m mwmae.train --config configs/tiny.py --workdir w \\",
        "    --config.no_such_key=3 --config.model.depth=2",
        "python -m mwmae.export --workdir w --out a --no-such-flag && mwmae-evaluate --bogus",
        "python -m mwmae.hear.evaluate --artifact a --tasks-dir t --out o  # --not-this",
        "python -m mwmae.nonexistent --x",
        "launch/tpu_vm.sh up --zone z --no-such-zone --config.x=1 -- --config.no_such_key=1 -v",
        "launch/hear_eval.sh A T O --seeds 3 --bogus-seeds 3; scripts/demo.sh --fast",
        "python -m mwmae.train --num-processes 2 --num_processes 2 && python -m mwmae.export"
        " --with_decoder --with-decoder",
        "scripts/no_such.sh",
        "```",
        "python -m mwmae.export --outside-a-code-block, but `mwmae-export --inline-bad` counts",
    ])
    assert flag_problems("broken.md", page) == [
        "broken.md:2: mwmae.train --config.no_such_key: no such config key",
        "broken.md:4: mwmae.export --no-such-flag: no such flag",
        "broken.md:4: mwmae-evaluate --bogus: no such flag",
        "broken.md:6: mwmae.nonexistent: not a command of the project",
        "broken.md:7: launch/tpu_vm.sh --no-such-zone: no such flag",
        "broken.md:7: launch/tpu_vm.sh --config.x: no such flag (the trainer's flags go after "
        "--)",
        "broken.md:7: mwmae.train --config.no_such_key: no such config key",
        "broken.md:8: launch/hear_eval.sh --bogus-seeds: no such flag",
        "broken.md:8: scripts/demo.sh --fast: no such flag",
        "broken.md:9: mwmae.train --num-processes: no such flag",
        "broken.md:10: scripts/no_such.sh: not a command of the project",
        "broken.md:12: mwmae-export --inline-bad: no such flag",
    ]


# ------------------------------------------------------------------- the architecture page

def modules() -> set[str]:
    """Every module file of the packages, as a repository path."""
    return {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py") or p.stat().st_size > 200}


def listed_paths(text: str) -> set[str]:
    """The paths the first column of the architecture page's table names. A cell names paths
    in backticks; a bare file name is in the folder of the path before it; a path ending in
    ``/`` is a whole package."""
    paths = set()
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "/" in token.rstrip("/"):
                folder = token if token.endswith("/") else token.rsplit("/", 1)[0] + "/"
                paths.add(token)
            elif token.endswith((".py", "/")):
                paths.add(folder + token)
    return paths


def listing_problems(text: str) -> list[str]:
    listed = listed_paths(text)
    packages = tuple(p for p in listed if p.endswith("/"))
    problems = [f"docs/architecture.md: {m} is not listed" for m in sorted(modules())
                if m not in listed and not m.startswith(packages)]
    problems += [f"docs/architecture.md names {p}, which does not exist" for p in sorted(listed)
                 if p.startswith(PACKAGES) and not (REPO / p).exists()]
    return problems


def test_the_architecture_page_lists_every_module():
    text = (DOCS / "architecture.md").read_text()
    assert len(listed_paths(text)) > 60
    assert listing_problems(text) == []


def test_the_module_listing_fails_on_a_broken_page():
    text = (DOCS / "architecture.md").read_text()
    broken = text.replace("| `mwmae/data/shard_set.py` |", "| dropped |").replace(
        "| `mwmae/checksum.py` |", "| `mwmae/checksum.py`, `gone.py` |")
    assert listing_problems(broken) == [
        "docs/architecture.md: mwmae/data/shard_set.py is not listed",
        "docs/architecture.md names mwmae/gone.py, which does not exist"]


# ------------------------------------------------------------------- reference pages

def test_the_config_reference_lists_every_key():
    text = (DOCS / "reference" / "config.md").read_text()
    named = set(re.findall(r"`([a-z_][\w.]*)`", text))
    keys = config_keys()
    every = keys["mwmae.train"] | keys["mwmae.finetune"]
    leaves = {k for k in every if not any(o.startswith(k + ".") for o in every)}
    assert len(leaves) > 70
    missing = sorted(leaves - named)
    assert missing == []


def test_the_metric_reference_lists_every_tag():
    from mwmae.train import metrics

    text = (DOCS / "reference" / "metrics.md").read_text()
    tags = {f"{g}/{n}" for g, names in metrics.GROUPS.items() for n in names}
    assert sorted(t for t in tags | {metrics.IMAGE_TAG} if f"`{t}`" not in text) == []


def test_the_command_reference_names_every_command():
    text = (DOCS / "reference" / "cli.md").read_text()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(s for s in scripts if f"`{s}`" not in text) == []


# ------------------------------------------------------------------- the site

def _mkdocs() -> list[str]:
    exe = pathlib.Path(sys.executable).with_name("mkdocs")
    return [str(exe)] if exe.exists() else []


def build(root: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([*_mkdocs(), "build", "--strict", "--site-dir", str(site)], cwd=root,
                          capture_output=True, text=True, timeout=300)


needs_mkdocs = pytest.mark.skipif(not _mkdocs(), reason="mkdocs is not installed (the docs "
                                  "extra); scripts/docs.sh installs it and CI runs it")


@needs_mkdocs
def test_the_site_builds_strictly(tmp_path):
    result = build(REPO, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "guides" / "training" / "index.html").exists()


@needs_mkdocs
def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    site = tmp_path / "tree"
    (site / "docs").mkdir(parents=True)
    shutil.copy(REPO / "mkdocs.yml", site / "mkdocs.yml")
    config = (site / "mkdocs.yml").read_text()
    (site / "mkdocs.yml").write_text(config.split("\nnav:")[0] + "\nnav:\n  - a.md\n  - b.md\n")
    (site / "docs" / "b.md").write_text("# B\n\n## Part\n")
    for link, ok in (("b.md#part", True), ("b.md#no-such-part", False), ("c.md", False)):
        (site / "docs" / "a.md").write_text(f"# A\n\nSee [b]({link}).\n")
        result = build(site, tmp_path / "out")
        assert (result.returncode == 0) is ok, (link, result.stderr[-2000:])


# ------------------------------------------------------------------- the README

def readme_link_problems(text: str, root: pathlib.Path = REPO) -> list[str]:
    """The README's relative links whose file does not exist (the site's build checks the
    docs' links; the README is not part of the site)."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not (root / path).exists():
                problems.append(f"README.md:{number}: {target}: no such file")
    return problems


def test_the_readme_links_exist_and_a_broken_one_is_reported():
    text = (REPO / "README.md").read_text()
    assert len(re.findall(r"\]\(docs/", text)) > 10
    assert readme_link_problems(text) == []
    broken = text + "\nSee [gone](docs/guides/gone.md#x) and [site](https://example.org).\n"
    assert readme_link_problems(broken) == [
        f"README.md:{len(broken.splitlines())}: docs/guides/gone.md#x: no such file"]


def test_the_readme_states_the_test_command_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^scripts/test\.sh\b", readme, re.M)
    assert re.search(r"^scripts/test\.sh$", ci, re.M)
    # The site's build follows the tests in CI.
    assert ci.index("scripts/test.sh") < ci.index("scripts/docs.sh")
    assert len(readme.splitlines()) <= 250


def runnable_modules() -> set[str]:
    """Every module that runs as ``python -m``: a ``__main__.py`` or a ``__main__`` guard."""
    found = set()
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            if path.name == "__main__.py":
                found.add(".".join(parts[:-1]))
            elif 'if __name__ == "__main__"' in path.read_text():
                found.add(".".join(parts))
    return found


def reference_problems(text: str) -> list[str]:
    """What the command reference (``text``) gets wrong: a runnable module it leaves out, or a
    row whose flags are not exactly its command's (absl's own flags and negations aside)."""
    known = command_flags()
    problems = [f"reference/cli.md: {m} is not listed" for m in sorted(runnable_modules())
                if f"`{m}`" not in text]
    for line in text.splitlines():
        cells = line.split("|")
        named = [m for m in re.findall(r"`([\w.]+)`", line) if m in known and "." in m
                 and not m.endswith(".py")]
        if not line.startswith("| `") or not named:
            continue
        module = named[0]
        listed = set(re.findall(r"`--([\w-]+)`", cells[-2]))
        real = {f for f in known[module] - _ABSL - {"help"}
                if not (f.startswith("no") and f[2:] in known[module])}
        for flag in sorted(listed - real):
            problems.append(f"reference/cli.md: {module} --{flag}: no such flag")
        spelled = {f.replace("_", "-") for f in listed}
        for flag in sorted({f.replace("_", "-") for f in real} - spelled):
            problems.append(f"reference/cli.md: {module} --{flag}: not listed")
    return problems


def test_the_command_reference_is_complete_and_a_gap_is_reported():
    text = (DOCS / "reference" / "cli.md").read_text()
    assert reference_problems(text) == []
    broken = text.replace("`mwmae.data.shard_set`", "`shard set`").replace(
        "`--seeds`, `--smoke`", "`--smoke`, `--no-such`")
    assert reference_problems(broken) == [
        "reference/cli.md: mwmae.data.shard_set is not listed",
        "reference/cli.md: mwmae.experiments.decoder_attention --no-such: no such flag",
        "reference/cli.md: mwmae.experiments.decoder_attention --seeds: not listed"]


# ------------------------------------------------------------------- paths in the prose

_PATH = re.compile(r"`((?:mwmae|tfrecord_tools|hear_mwmae|configs|scripts|launch|tests|tests_tpu"
                   r"|tests_gpu|benchmarks)/[\w./-]*)([^`]?)")


def path_problems(name: str, text: str) -> list[str]:
    """Repository paths a page names in code (``mwmae/finetune/tagging.py``) that do not exist:
    a renamed module leaves its old name behind in the prose."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for path, after in _PATH.findall(line):
            path = path.rstrip(".,")
            if (after and after in "{<*") or "*" in path:
                continue  # a pattern (`x_{a,b}.json`, `configs/<name>.py`), not one file
            if not (REPO / path).exists():
                problems.append(f"{name}:{number}: {path}: no such file or folder")
    return problems


def test_every_path_the_docs_name_exists():
    assert problems_in_docs(path_problems) == []


def test_the_path_check_fails_on_a_renamed_module():
    page = ("The tagger (`mwmae/finetune/trainer.py`) beside `mwmae/finetune/tagging.py`;\n"
            "goldens `tests/golden/specs_{dp,fsdp}.json`, configs `configs/<name>.py`.\n")
    assert path_problems("p.md", page) == [
        "p.md:1: mwmae/finetune/trainer.py: no such file or folder"]


# ------------------------------------------------------------------- Python in the docs

_IMPORT = re.compile(r"^\s*from ((?:mwmae|tfrecord_tools|hear_mwmae)[\w.]*) import ([\w, ()]+)"
                     r"|^\s*import ((?:mwmae|tfrecord_tools|hear_mwmae)[\w.]*)", re.M)


def import_problems(name: str, text: str) -> list[str]:
    """First-party names the Python blocks of a page import that do not exist."""
    import importlib
    import importlib.util

    problems = []
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for module, names, plain in _IMPORT.findall(block):
            try:
                found = importlib.import_module(module or plain)
            except ImportError:
                problems.append(f"{name}: {module or plain}: no such module")
                continue
            for attr in filter(None, (n.strip(" ()") for n in names.split(","))):
                if not hasattr(found, attr) and importlib.util.find_spec(
                        f"{module}.{attr}") is None:
                    problems.append(f"{name}: {module}.{attr}: no such name")
    return problems


def test_the_python_in_the_docs_imports_what_exists():
    assert problems_in_docs(import_problems) == []
    broken = "```python\nfrom mwmae.data import to_global, make_batches\nimport mwmae.gone\n```\n"
    assert import_problems("p.md", broken) == ["p.md: mwmae.data.make_batches: no such name",
                                               "p.md: mwmae.gone: no such module"]
