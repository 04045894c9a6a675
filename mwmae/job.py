"""The image's entry point: ``python -m mwmae.job [COMMAND] ARGS``.

With no command (the first argument a flag) it is the trainer, ``python -m mwmae.train ARGS``,
so ``docker run IMAGE --config ... --workdir ...`` trains. A command runs another tool of the
package in the same way, for jobs whose launcher can only pass arguments (XManager, Vertex AI):

    train | preflight | finetune | export | evaluate (mwmae.hear.evaluate) | sweep

``preflight`` takes the trainer's flags (config, workdir, overrides, multi-host) and checks that
a run can start; the launchers run ``IMAGE preflight ARGS`` before ``IMAGE ARGS``.
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {"train": "mwmae.train", "preflight": "mwmae.preflight", "finetune": "mwmae.finetune",
            "export": "mwmae.export", "evaluate": "mwmae.hear.evaluate", "sweep": "mwmae.sweep"}


def module_and_args(argv: list[str]) -> tuple[str, list[str]]:
    """The module to run and its arguments."""
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]], argv[1:]
    if argv and not argv[0].startswith("-"):
        raise SystemExit(f"mwmae.job: unknown command {argv[0]!r}; one of {sorted(COMMANDS)}, "
                         "or trainer flags (--config ... --workdir ...)")
    return COMMANDS["train"], argv


# Asked for alone, help is a success; absl exits 1 after printing it (the image's default CMD is
# --helpshort, so a plain `docker run IMAGE` would look like a failure).
HELP_FLAGS = frozenset({"-?", "--help", "--helpshort", "--helpfull"})


def main() -> None:
    module, args = module_and_args(sys.argv[1:])
    sys.argv = [f"python -m {module}", *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code == 1 and len(args) == 1 and args[0] in HELP_FLAGS:
            raise SystemExit(0) from None
        raise


if __name__ == "__main__":
    main()
