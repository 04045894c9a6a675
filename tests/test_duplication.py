"""No block of six or more code lines repeats in mwmae/, configs/ or the tools, unless a comment
saying "Deliberate repeat" (and why) opens it: shared code has one home."""

import collections
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOTS = ("mwmae", "configs", "tfrecord_tools", "hear_mwmae")
WINDOW = 6
MIN_CHARS = 120  # six short lines (closing brackets, `return x`) are not a block worth sharing
MARK = "deliberate repeat"


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that count: no blanks, comments or imports,
    and none of a block that a "Deliberate repeat" comment opens (up to the next blank line)."""
    out, waived = [], False
    for number, line in enumerate(text.splitlines(), 1):
        t = line.strip()
        if not t:
            waived = False
            continue
        if t.startswith("#"):
            waived = waived or MARK in t.lower()
            continue
        if waived or t.startswith(("import ", "from ")):
            continue
        out.append((number, t))
    return out


def repeats(files: dict[str, str]) -> list[list[tuple[str, int]]]:
    """Places where the same WINDOW lines occur, first window of each run only."""
    where = collections.defaultdict(list)
    for name, text in files.items():
        lines = code_lines(text)
        for k in range(len(lines) - WINDOW + 1):
            block = tuple(t for _, t in lines[k:k + WINDOW])
            if sum(map(len, block)) >= MIN_CHARS:
                where[block].append((name, lines[k][0]))
    found, last = [], None
    for places in sorted(sorted(p) for p in where.values() if len(p) > 1):
        if last and [f for f, _ in places] == [f for f, _ in last] and all(
                0 < b - a <= WINDOW for (_, a), (_, b) in zip(last, places)):
            last = places  # the same run, one line further
            continue
        found.append(places)
        last = places
    return found


def test_no_repeated_blocks():
    files = {str(p.relative_to(REPO)): p.read_text()
             for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))}
    found = repeats(files)
    assert not found, "repeated blocks (share them, or mark a deliberate repeat):\n" + "\n".join(
        " = ".join(f"{f}:{n}" for f, n in places) for places in found)


def test_a_copied_block_is_found_and_a_marked_one_is_not():
    body = "\n".join(f"    value_{i} = compute_something_long(argument_{i}, other_{i})"
                     for i in range(7))
    a = f"def f():\n{body}\n"
    b = f"def g():\n    x = 1\n{body}\n"
    assert repeats({"a.py": a, "b.py": b}) == [[("a.py", 2), ("b.py", 3)]]
    marked = f"def g():\n    # Deliberate repeat: shown in the docs.\n{body}\n"
    assert repeats({"a.py": a, "b.py": marked}) == []
