"""No two modules of the package import each other, directly or through others.

Imports inside functions count (a lazy import only hides a cycle until someone moves it);
imports under ``if TYPE_CHECKING:`` do not, since they never run.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mwmae", "tfrecord_tools", "hear_mwmae")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The first-party modules (of ``known``) that the module ``name`` imports."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    known = set(files)
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 100 and "mwmae.train.engine" in graph["mwmae.train.loop"]
    assert cycles(graph) == []


def test_the_check_finds_a_cycle_through_a_lazy_import():
    known = {"p.a", "p.b", "p.c"}
    graph = {
        "p.a": imports_of("from p import b\n", "p.a", False, known),
        "p.b": imports_of("def f():\n    from p.c import thing\n", "p.b", False, known),
        "p.c": imports_of("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                          "    from p import a\nfrom . import a\n", "p.c", False, known),
    }
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]
    graph["p.c"] = imports_of("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from p import a\n", "p.c", False, known)
    assert cycles(graph) == []


ENGINE = ("mwmae.train.engine", "mwmae.train.step", "mwmae.train.hooks", "mwmae.train.loop",
          "mwmae.train.task", "mwmae.train.sources", "mwmae.train.checkpoint",
          "mwmae.train.goodput")
TASKS = ("mwmae.train.pretraining", "mwmae.finetune", "mwmae.model.mae")


def test_the_engine_knows_no_task():
    graph = import_graph()
    for name in ENGINE:
        named = sorted(t for t in graph[name] if t.startswith(TASKS))
        assert named == [], f"{name} imports the task module(s) {named}"
    assert "mwmae.train.pretraining" in graph["mwmae.train.__main__"]  # the check sees edges
