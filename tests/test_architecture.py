"""The import rules of docs/architecture.md, enforced: imports follow the data flow one way.

Every first-party import (at module level or inside a function) is checked against RULES; a new
top-level module or package must be given its place here on purpose.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = ("mwmae", "tfrecord_tools", "hear_mwmae")

# unit -> the units it may import (its own modules always). A unit is mwmae.<module or package>,
# or a top-level package. Keep in step with "Dependency rules" in docs/architecture.md.
RULES: dict[str, set[str]] = {
    "mwmae": {"mwmae.api", "mwmae.model"},  # the lazy public names
    "mwmae.cli": set(),  # flag spelling for every tool: importable from anywhere
    "mwmae.audio": set(),
    "mwmae.kernels": set(),
    "mwmae.speech": {"mwmae.audio"},
    "mwmae.checksum": set(),
    "mwmae.aot": set(),
    "mwmae.collectives": set(),
    "mwmae.hlo_cost": {"mwmae.collectives"},  # the element types' sizes
    "mwmae.lease": set(),
    "mwmae.goodput": set(),  # the ledger's arithmetic: inspect and the trainer share it
    "mwmae.data": {"mwmae.audio"},
    "mwmae.model": {"mwmae.kernels"},
    # The PyTorch encoder imports torch and numpy only (no jax, flax, tensorflow), so it can be
    # installed and used without JAX; of mwmae only checksum (stdlib and numpy at import), for
    # the weights-file check mwmae.load makes, so that both refuse the same files.
    "mwmae.torch": {"mwmae.checksum"},
    "tfrecord_tools": {"mwmae.data", "mwmae.audio"},
    "mwmae.artifact": {"mwmae.model", "mwmae.audio", "mwmae.checksum"},
    "mwmae.convert": {"mwmae.model", "mwmae.artifact"},
    # mwmae.goodput: the workdir reads its ledger with the tolerant reader.
    "mwmae.workdir": {"mwmae.data", "mwmae.model", "mwmae.artifact", "mwmae.checksum",
                      "mwmae.goodput"},
    "mwmae.checkpoint": {"mwmae.workdir", "mwmae.lease", "mwmae.goodput"},
    # The weights a run starts from (init_from): read through the loaders and the workdir, by
    # the trainer at a first start and by export's --initial afterwards.
    "mwmae.pretrained": {"mwmae.model", "mwmae.api", "mwmae.workdir"},
    "mwmae.model_info": {"mwmae.model"},
    # mwmae.api: compile_check's `--target embed` compiles the serving forward.
    "mwmae.train": {"mwmae.model", "mwmae.data", "mwmae.kernels", "mwmae.workdir",
                    "mwmae.lease", "mwmae.aot", "mwmae.collectives", "mwmae.hlo_cost",
                    "mwmae.api", "mwmae.goodput", "mwmae.pretrained"},
    # The supervised task is a task of the trainer (its loop, state, guarded update,
    # sharding, checkpoints) and reads its labelled shards and evaluation split itself.
    "mwmae.finetune": {"mwmae.model", "mwmae.train", "mwmae.data", "mwmae.workdir",
                       "mwmae.kernels"},
    # mwmae.data: its storage helpers, to tell a gs:// --out from a local one.
    "mwmae.export": {"mwmae.model", "mwmae.artifact", "mwmae.convert", "mwmae.workdir",
                     "mwmae.pretrained", "mwmae.data"},
    "mwmae.api": {"mwmae.model", "mwmae.artifact", "mwmae.convert", "mwmae.workdir"},
    # mwmae.workdir: only to refuse writing tasks into a training workdir; mwmae.torch: the
    # PyTorch backend of the embedder.
    "mwmae.hear": {"mwmae", "mwmae.audio", "mwmae.artifact", "mwmae.speech",
                   "mwmae.workdir", "mwmae.torch"},
    # The attention analysis reads weights (artifact, original format, workdir) and clips
    # (shards) through their owners, and runs the model with its capture option.
    "mwmae.analysis": {"mwmae.model", "mwmae.data", "mwmae.artifact", "mwmae.convert",
                       "mwmae.workdir"},
    "hear_mwmae": {"mwmae.hear"},
    # The closed loop of a sweep runs the tools as processes; it reads only their results, and
    # checks each point's settings with the trainer's own config check before writing anything.
    "mwmae.sweep": {"mwmae.hear", "mwmae.train"},
    "mwmae.job": set(),  # the image's entry point: runs the tools by module name
    # Experiments run the tools as processes and read their results; the shard set's names
    # come from their owner.
    "mwmae.experiments": {"mwmae.data"},
    # The preflight builds the run's trainer (pretraining or the tagger), times its step, its
    # input and its workdir's storage, and checks the kernels against the reference.
    "mwmae.preflight": {"mwmae.train", "mwmae.finetune", "mwmae.kernels", "mwmae.data",
                        "mwmae.workdir", "mwmae.aot"},
    "mwmae.demo": {"mwmae", "mwmae.speech", "mwmae.hear", "mwmae.data",
                   "mwmae.train", "mwmae.artifact", "mwmae.audio", "mwmae.workdir"},
}


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "mwmae":
        return parts[0]
    return "mwmae" if len(parts) == 1 else f"mwmae.{parts[1]}"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported module) for every first-party import in the file; ``from mwmae import
    audio`` counts as ``mwmae.audio``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mwmae":
                found += [(node.lineno, f"mwmae.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m.split(".")[0] in FIRST_PARTY]


def source_files() -> list[tuple[pathlib.Path, str]]:
    """(file, its module name) for every first-party source file."""
    paths = sorted(p for root in FIRST_PARTY for p in (REPO / root).rglob("*.py"))
    return [(p, module_name(p)) for p in paths]


def violations(files: list[tuple[pathlib.Path, str]]) -> list[str]:
    problems = []
    for path, module in files:
        unit = unit_of(module)
        if unit not in RULES:
            problems.append(f"{path.name} ({module}): {unit} has no place in the rules")
            continue
        for line, target in first_party_imports(path):
            # `from mwmae import lease` names a module; `from mwmae import load` a lazy name.
            to = unit_of(target)
            if to not in RULES and to.startswith("mwmae."):
                to = "mwmae"
            if to != unit and to not in RULES[unit] and to != "mwmae.cli":
                problems.append(f"{path.name} ({module}):{line}: {unit} imports {target}")
    return problems


def test_imports_follow_the_data_flow():
    problems = violations(source_files())
    assert not problems, "imports against docs/architecture.md:\n" + "\n".join(problems)


def test_a_backward_import_inside_a_function_is_caught(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import jax\n\n\ndef f():\n    from mwmae.train import loop\n")
    assert violations([(probe, "mwmae.model.probe")]) == [
        "probe.py (mwmae.model.probe):5: mwmae.model imports mwmae.train"]
    assert violations([(probe, "mwmae.demo.probe")]) == []
    assert violations([(probe, "mwmae.newthing")]) == [
        "probe.py (mwmae.newthing): mwmae.newthing has no place in the rules"]


def test_the_rules_name_only_existing_units():
    units = {unit_of(m) for _, m in source_files()}
    assert set(RULES) <= units, set(RULES) - units


def stale_allowances(files: list[tuple[pathlib.Path, str]],
                     rules: dict[str, set[str]]) -> list[str]:
    """Edges the rules allow that no import uses any more: an allowance outliving its import
    would let the next one in unnoticed."""
    used: dict[str, set[str]] = {unit: set() for unit in rules}
    for path, module in files:
        unit = unit_of(module)
        # Modules named as strings count too: the package's lazy names import them by name.
        named = [(0, n.value) for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)
                 and n.value.split(".")[0] in FIRST_PARTY and n.value.replace(".", "").isalnum()]
        for _, target in first_party_imports(path) + named:
            to = unit_of(target)
            if to not in RULES and to.startswith("mwmae."):
                to = "mwmae"
            used.setdefault(unit, set()).add(to)
    return [f"{unit} -> {to}" for unit, allowed in sorted(rules.items())
            for to in sorted(allowed - used.get(unit, set()))]


def test_every_allowed_import_is_used():
    assert stale_allowances(source_files(), RULES) == []


def test_a_stale_allowance_is_reported(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from mwmae.data import storage\n")
    files = [(probe, "mwmae.export.probe")]
    rules = {"mwmae.export": {"mwmae.data", "mwmae.train"}}
    assert stale_allowances(files, rules) == ["mwmae.export -> mwmae.train"]


def doc_rules(text: str) -> dict[str, set[str]]:
    """The rules as the "Dependency rules" block of docs/architecture.md states them:
    ``unit -> a, b (why)`` lines, a line without ``->`` listing units that import nothing.
    Targets are written short (``model`` for mwmae.model, ``mwmae.load`` for the package's lazy
    name); parentheses are comments."""
    block = text.split("## Dependency rules", 1)[1].split("```", 2)[1]
    lines: list[str] = []
    for line in block.splitlines():
        if line[:1].isspace() and lines:
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line.strip())
    rules: dict[str, set[str]] = {}
    for line in lines:
        while "(" in line:
            start = line.rindex("(")
            end = line.find(")", start)
            line = line[:start] + line[end + 1:] if end >= 0 else line[:start]
        for statement in line.split(";"):
            unit, arrow, targets = statement.partition("->")
            names = [n.strip() for n in (targets if arrow else unit).split(",") if n.strip()]
            if not arrow:
                rules.update({n: set() for n in names})
                continue
            allowed = set()
            for name in names:
                if name.startswith("nothing"):
                    continue
                full = name if name.split(".")[0] in FIRST_PARTY else f"mwmae.{name}"
                allowed.add("mwmae" if full == "mwmae.load" else unit_of(full))
            rules[unit.strip()] = allowed
    return rules


def test_the_documented_rules_are_the_enforced_ones():
    text = (REPO / "docs" / "architecture.md").read_text()
    assert doc_rules(text) == RULES


def test_a_documented_rule_out_of_step_is_seen():
    text = (REPO / "docs" / "architecture.md").read_text()
    broken = text.replace("mwmae.model       -> kernels", "mwmae.model       -> kernels, train")
    assert broken != text
    rules = doc_rules(broken)
    assert rules["mwmae.model"] == {"mwmae.kernels", "mwmae.train"} != RULES["mwmae.model"]
