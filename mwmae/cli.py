"""One flag spelling for the command-line tools that are not trainers.

Trainer-like tools (``mwmae-train``, ``mwmae-compile-check``, ``mwmae-partitioning``,
``mwmae-model-info``) are absl apps: ``--config``, ``--config.x=y``, ``--workdir``; the ones run
through ``run_config_tool`` also take hyphens for their underscore flags (:func:`absl_spelling`).
Every other tool spells multi-word flags with hyphens and names its output ``--out``;
:func:`parse_args` also accepts the underscore spellings and ``--output`` that earlier versions
documented, so old commands keep working while help and docs show one spelling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

_RENAMED = {"--output": "--out"}


def _rename_flags(argv: Sequence[str], rename: Callable[[str], str]) -> list[str]:
    """Apply ``rename`` to every flag name (``--name`` before any ``=``); values and everything
    after a bare ``--`` are left alone."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = rename(name) + eq + value
        out.append(token)
    return out


def canonical(argv: Sequence[str]) -> list[str]:
    """``--with_decoder`` -> ``--with-decoder``, ``--output=x`` -> ``--out=x``."""
    def rename(name: str) -> str:
        name = "--" + name[2:].replace("_", "-")
        return _RENAMED.get(name, name)

    return _rename_flags(argv, rename)


def absl_spelling(argv: Sequence[str]) -> list[str]:
    """The absl tools' spelling: ``--num-slices 2`` -> ``--num_slices 2`` (absl knows only the
    underscore names)."""
    return _rename_flags(argv, lambda name: "--" + name[2:].replace("-", "_"))


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
               ) -> argparse.Namespace:
    return parser.parse_args(canonical(sys.argv[1:] if argv is None else argv))
