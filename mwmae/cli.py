"""One flag spelling for the command-line tools that are not trainers.

Trainer-like tools (``mwmae-train``, ``mwmae-compile-check``, ``mwmae-partitioning``,
``mwmae-model-info``) are absl apps: ``--config``, ``--config.x=y``, ``--workdir``. Every other tool
spells multi-word flags with hyphens and names its output ``--out``; :func:`parse_args` also
accepts the underscore spellings and ``--output`` that earlier versions documented, so old
commands keep working while help and docs show one spelling.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

_RENAMED = {"--output": "--out"}


def canonical(argv: Sequence[str]) -> list[str]:
    """``--with_decoder`` -> ``--with-decoder``, ``--output=x`` -> ``--out=x``; values and
    everything after a bare ``--`` are left alone."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            name = "--" + name[2:].replace("_", "-")
            token = _RENAMED.get(name, name) + eq + value
        out.append(token)
    return out


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
               ) -> argparse.Namespace:
    return parser.parse_args(canonical(sys.argv[1:] if argv is None else argv))
