"""What a command refuses for a reason the user can fix, said in one line: the trainer's and
every tool that takes a training config (``--config.x=y`` overrides included)."""

from __future__ import annotations


def refusals() -> tuple[type[BaseException], ...]:
    """What the run refuses for a reason the user can fix; printed as one line, not a
    traceback."""
    from mwmae.lease import LeaseHeld, LeaseLost
    from mwmae.pretrained import InitFromError
    from mwmae.train.config import ConfigError
    from mwmae.workdir import WorkdirError

    return (ConfigError, InitFromError, WorkdirError, LeaseHeld, LeaseLost, FloatingPointError)


def unknown_override(argv: list[str], schema=None) -> str | None:
    """The message for the first ``--config.x=...`` whose key the schema (the pretraining
    one unless given) lacks (ml_collections would fail on it with a traceback), or None."""
    from mwmae.train.config import all_keys, default_config, unknown_key_message

    schema = default_config() if schema is None else schema
    known = set(all_keys(schema))
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in known and not any(k.startswith(key + ".") for k in known):
                return unknown_key_message(key, schema)
    return None


def missing_config_file(argv: list[str]) -> str | None:
    """The message for a ``--config FILE[:VARIANT]`` whose file does not exist (ml_collections
    would fail on it with a traceback), or None."""
    import os

    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        value = arg[len("--config="):] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if value is not None:
            path = value.split(":", 1)[0]
            if not os.path.isfile(path):
                return f"--config {value}: no such config file ({os.path.abspath(path)})"
    return None
