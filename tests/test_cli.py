"""The command-line convention: console commands for every tool, one flag spelling."""

import ast
import pathlib
import subprocess
import sys
import tomllib

import pytest

from mwmae import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
BIN = pathlib.Path(sys.executable).parent
ABSL_TOOLS = {"mwmae.train.__main__", "mwmae.finetune.__main__", "mwmae.train.compile_check",
              "mwmae.train.partitioning", "mwmae.model_info", "mwmae.preflight.__main__",
              "mwmae.job"}  # the image's entry point: with no command, the trainer's flags
# absl tools whose help lists --workdir among their own flags (every absl tool's help exits 0
# and lists its own flags, as every argparse tool's does).
HELP_ANSWERED = {"mwmae.train.__main__", "mwmae.finetune.__main__", "mwmae.preflight.__main__",
                 "mwmae.job"}


def test_old_spellings_become_the_one_spelling():
    argv = ["src", "--with_decoder", "--output=gs://b/x", "--num_heads", "3", "--tasks-dir",
            "t", "--", "--keep_this"]
    assert cli.canonical(argv) == ["src", "--with-decoder", "--out=gs://b/x", "--num-heads", "3",
                                   "--tasks-dir", "t", "--", "--keep_this"]


def test_every_tool_with_a_main_is_a_console_command():
    modules = {v.split(":")[0] for v in SCRIPTS.values()}
    with_main = set()
    for root in ("mwmae", "tfrecord_tools"):
        for path in (REPO / root).rglob("*.py"):
            if 'if __name__ == "__main__":' in path.read_text():
                with_main.add(".".join(path.relative_to(REPO).with_suffix("").parts))
    assert with_main == modules, with_main ^ modules
    assert all(name.startswith("mwmae-") for name in SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_command_answers_help(name):
    exe = BIN / name
    assert exe.exists(), f"{exe} missing: reinstall the package (scripts/install.sh)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    if SCRIPTS[name].split(":")[0] in HELP_ANSWERED:
        assert out.returncode == 0 and "--workdir" in out.stdout, text[-2000:]
    elif SCRIPTS[name].split(":")[0] in ABSL_TOOLS:
        # (absl alone prints its help and exits 1, which scripts read as a failure.)
        assert out.returncode == 0 and "--config" in out.stdout and "--helpfull" in out.stdout, \
            text[-2000:]
    else:
        assert out.returncode == 0 and "usage" in text.lower(), text[-2000:]
    assert "Traceback" not in text, text[-2000:]


@pytest.mark.parametrize("module", ["mwmae.train", "mwmae.finetune", "mwmae.preflight"])
def test_help_of_the_trainers_and_the_preflight_exits_0_listing_the_flags(module):
    for flag in ("--help", "--helpshort", "--helpfull"):
        out = subprocess.run([sys.executable, "-m", module, flag], capture_output=True,
                             text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, (flag, out.stdout[-2000:] + out.stderr[-2000:])
        assert "--config" in out.stdout and "--workdir" in out.stdout, out.stdout[-2000:]
        assert "Traceback" not in out.stderr
    short = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                           text=True, timeout=120, cwd=REPO).stdout
    assert short.startswith(f"python -m {module} --config")
    assert "--num_processes" in short and "--helpfull" in short


def option_strings(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            names += [a.value for a in node.args
                      if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
    return names


def test_argparse_tools_share_one_spelling():
    for value in SCRIPTS.values():
        module = value.split(":")[0]
        if module in ABSL_TOOLS:
            continue
        path = REPO / (module.replace(".", "/") + ".py")
        options = option_strings(path)
        assert not [o for o in options if "_" in o or o == "--output"], (module, options)
        text = path.read_text()
        assert "cli.parse_args(" in text and ".parse_args(argv)" not in text, module


@pytest.mark.slow  # an integration run over 30 s: it runs in CI's slow group
def test_a_cli_training_run_shows_its_eta(tmp_path):
    out = subprocess.run(
        [str(BIN / "mwmae-train"), "--config", str(REPO / "configs" / "tiny.py"),
         "--workdir", str(tmp_path / "run"), "--config.num_train_steps=3",
         "--config.log_every_steps=1", "--config.image_every_steps=0",
         "--config.progress_bar=False"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [ln for ln in out.stdout.splitlines() if ln.startswith("step")]
    assert len(steps) == 3 and all(" ETA 0:" in ln for ln in steps), out.stdout


def test_absl_tools_take_hyphenated_flags():
    argv = ["--num-slices", "2", "--embed-batch=4", "--config.mesh.preset=fsdp",
            "--topology", "v5e:2x2", "--config=configs/my-run.py", "--", "--keep-this"]
    assert cli.absl_spelling(argv) == [
        "--num_slices", "2", "--embed_batch=4", "--config.mesh.preset=fsdp", "--topology",
        "v5e:2x2", "--config=configs/my-run.py", "--", "--keep-this"]


def test_the_image_entry_point_answers_its_default_command_with_success():
    """The image's CMD is --helpshort: `docker run IMAGE` must exit 0, not absl's 1."""
    for flag in ("--helpshort", "--help"):
        out = subprocess.run([sys.executable, "-m", "mwmae.job", flag], capture_output=True,
                             text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0 and "--config" in out.stdout + out.stderr, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "mwmae.job"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode != 0   # no flags at all is still a usage error
