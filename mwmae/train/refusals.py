"""What a command refuses for a reason the user can fix, said in one line: the trainer's and
every tool that takes a training config (``--config.x=y`` overrides included)."""

from __future__ import annotations

from typing import Any

# The train state counts steps in int32 (and the schedule, cadences and ETA compare with it);
# every other integer must at least survive conversion to a 64-bit array or C integer.
STEP_MAX = 2**31 - 1
INT64 = (-2**63, 2**63 - 1)


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


def _counts_steps(key: str) -> bool:
    """Keys compared with (or multiplied into) the int32 step counter."""
    leaf = key.rsplit(".", 1)[-1]
    return leaf.endswith("steps") or leaf.endswith("_step") or leaf in ("num_epochs",
                                                                        "steps_per_epoch")


def _int_leaves(config: Any, prefix: str = "") -> list[tuple[str, int]]:
    import ml_collections

    out = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out += _int_leaves(v, f"{prefix}{k}.")
        elif isinstance(v, int) and not isinstance(v, bool):
            out.append((f"{prefix}{k}", v))
    return out


def check_int_range(config: Any) -> None:
    """Refuse (ConfigError, one line naming the key) an integer the run cannot represent: a
    count of steps past the int32 step counter, anything else past int64. Without this, such a
    value passes every range check, the workdir is written and the run fails later with an
    OverflowError."""
    from mwmae.train.config import ConfigError

    problems = []
    for key, value in _int_leaves(config):
        if _counts_steps(key) and abs(value) > STEP_MAX:
            problems.append(f"{key}={value}: must be at most {STEP_MAX} in magnitude (the step "
                            "counter is a 32-bit integer)")
        elif not INT64[0] <= value <= INT64[1]:
            problems.append(f"{key}={value}: does not fit in a 64-bit integer")
    # The length in epochs is their product; it is known here when steps_per_epoch is given.
    if (not problems and config.get("num_train_steps", 0) <= 0
            and config.get("steps_per_epoch", 0) > 0
            and config.num_epochs * config.steps_per_epoch > STEP_MAX):
        problems.append(f"num_epochs={config.num_epochs} x steps_per_epoch="
                        f"{config.steps_per_epoch}: {config.num_epochs * config.steps_per_epoch} "
                        f"steps, more than the step counter holds ({STEP_MAX})")
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
