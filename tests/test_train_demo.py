"""The tiny pretraining run of the README: loss falls, checkpoints land, a rerun resumes."""

import pathlib

from ml_collections import config_flags  # noqa: F401  (config files import ml_collections)

from mwmae.train.loop import train
from mwmae.train.pretraining import Pretraining

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _tiny(steps: int):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", CONFIGS / "tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.num_train_steps = steps
    c.checkpoint.every_steps = 10
    return c


def test_tiny_pretraining_learns_checkpoints_and_resumes(tmp_path):
    lines = []
    train(Pretraining, _tiny(20), tmp_path, print_fn=lines.append)
    losses = [float(line.split("loss")[1].split()[0]) for line in lines if line.startswith("step")]
    assert len(losses) == 20
    assert losses[-1] < 0.75 * losses[0], losses
    assert (tmp_path / "checkpoints" / "20").is_dir() and (tmp_path / "checkpoints" / "10").is_dir()
    assert any(line.startswith("checkpoint: ") and line.endswith("20") for line in lines)

    more = []
    train(Pretraining, _tiny(25), tmp_path, print_fn=more.append)
    assert more[0] == f"resumed from step 20 in {tmp_path.resolve() / 'checkpoints'}"
    steps = [int(line.split()[1].split("/")[0]) for line in more if line.startswith("step")]
    assert steps[0] == 21 and steps[-1] == 25
