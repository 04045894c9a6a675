"""One flag spelling for the command-line tools that are not trainers.

Trainer-like tools (``mwmae-train``, ``mwmae-compile-check``, ``mwmae-partitioning``,
``mwmae-model-info``) are absl apps: ``--config``, ``--config.x=y``, ``--workdir``; the ones run
through ``run_config_tool`` also take hyphens for their underscore flags (:func:`absl_spelling`).
Every other tool spells multi-word flags with hyphens and names its output ``--out``;
:func:`parse_args` also accepts the underscore spellings and ``--output`` that earlier versions
documented, so old commands keep working while help and docs show one spelling.

:func:`absl_flags_parser` is the absl tools' flag parser: help asked for exits 0 like every other
tool's, and a bad flag value is one line naming the flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

_RENAMED = {"--output": "--out"}
# absl's help flags (and --helpxml): each prints and then exits 1.
HELP_FLAGS = frozenset({"-?", "--help", "--helpshort", "--helpfull", "--helpxml"})


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



def absl_usage(doc: str | None, flag: str) -> str:
    """The tool's help: its docstring, then every flag of the module that defines ``flag``
    (absl's short help shows only flags of the module run as ``__main__``, so a console script
    or a tool reusing another module's flags would list none)."""
    from absl import flags

    module = flags.FLAGS.find_module_defining_flag(flag)
    listing = flags.FLAGS.module_help(module).replace(f"\n{module}:\n", "", 1)
    return f"{(doc or '').strip()}\n\nflags:\n{listing.rstrip()}\n\n" \
           "--helpfull lists every flag, the libraries' included.\n"


def absl_flags_parser(doc: str | None, flag: str) -> Callable[[list[str]], list[str]]:
    """absl's parsing (``app.run(main, flags_parser=absl_flags_parser(__doc__, "config"))``)
    for a tool whose flags are defined in the module defining ``flag``:

    * help (``--help``, ``--helpshort``, ``-?``) prints :func:`absl_usage` and exits 0, and
      ``--helpfull`` exits 0 too: absl exits 1 after help, which scripts and launchers read as
      a failure;
    * a bad flag value (``--config.batch_size=abc``) is said in one line naming the flag and
      exits 2, instead of a 'FATAL' line and a usage hint.
    """
    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        asked = {a.split("=", 1)[0] for a in argv[1:]} & HELP_FLAGS
        if asked and "--helpfull" not in asked and "--helpxml" not in asked:
            print(absl_usage(doc, flag), flush=True)
            raise SystemExit(0)
        try:
            return flags.FLAGS(argv)
        except SystemExit as e:
            if e.code == 1 and asked:
                sys.stdout.flush()
                raise SystemExit(0) from None
            raise
        except flags.Error as e:
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            text = lines[0] if lines else type(e).__name__
            text = text[len("flag "):] if text.startswith("flag ") else text
            if "Traceback" in str(e):  # a config file that fails to load: its error's last line
                text = f"{text.rstrip(':')}: {lines[-1].strip()}"
            print(f"error: {text}", file=sys.stderr, flush=True)
            sys.exit(2)
    return parse
