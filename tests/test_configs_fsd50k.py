"""The FSD50K configs: they load and pass the trainer's checks, build the paper's model, keep the
paper's step count and lr rule, compile, and train from a fake FSD50K tree through the builder."""

import json
import math

import jax
import numpy as np
import pytest
import soundfile
from train_helpers import REPO, load_config

import mwmae
from mwmae.model import param_shapes
from mwmae.train import sharding
from mwmae.train.config import check_config, model_config_from
from mwmae.train.engine import Engine, check_batch, schedule_lengths
from mwmae.train.loop import train
from mwmae.train.optim import make_optimizer
from mwmae.train.pretraining import Pretraining
from tfrecord_tools import build as build_lib
from tfrecord_tools import inspect as inspect_lib

CONFIGS = ["fsd50k_mwmae_base", "fsd50k_mwmae_base_smoke"]
PAPER_DECODER_WINDOWS = (2, 5, 10, 25, 50, 125, 0, 0)
BASE_PARAMETERS = 92_814_576


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_the_trainer_check_and_is_the_papers_model(name):
    config = load_config(name)
    check_config(config)  # unknown keys or an invalid architecture raise
    assert config.data.source == "shards"
    assert "YOUR_BUCKET" in config.data.train_shards  # a placeholder the user must override
    assert config.model.decoder_window_sizes == PAPER_DECODER_WINDOWS
    assert isinstance(config.model.decoder_window_sizes, tuple)  # overridable from the CLI
    model = model_config_from(config)
    assert model == mwmae.model_config("base", "mwmae", dtype="bfloat16")
    assert config.model.to_dict() == load_config("mwmae_base_200_4x16").model.to_dict()
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(model)))
    assert count == BASE_PARAMETERS
    assert (config.optimizer.weight_decay, config.mesh.preset) == (0.05, "dp")
    doc = (REPO / "configs" / f"{name}.py").read_text()
    assert f"--config configs/{name}.py" in doc and "92,814,576" in doc


def test_base_run_has_the_papers_step_count_and_warmup_fraction():
    config = load_config("fsd50k_mwmae_base")
    steps_per_epoch, total = schedule_lengths(config)
    assert (steps_per_epoch, total) == (40_966 // 1024, 198_400)
    paper = load_config("mwmae_base_200_4x16")
    paper_steps_per_epoch, paper_total = schedule_lengths(paper)
    assert total == paper_total and config.batch_size == paper.batch_size  # same examples seen
    warmup = int(config.optimizer.warmup_epochs * steps_per_epoch)
    paper_warmup = int(paper.optimizer.warmup_epochs * paper_steps_per_epoch)
    assert warmup == paper_warmup == total // 10
    smoke = load_config("fsd50k_mwmae_base_smoke")
    assert schedule_lengths(smoke) == (320, 2_000)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("batch", [None, 256, 4096])
def test_peak_lr_is_1_5e_5_times_batch_over_256(name, batch):
    config = load_config(name)
    if batch is not None:
        config.batch_size = batch
    steps_per_epoch, total = schedule_lengths(config)
    _, schedule = make_optimizer(config, steps_per_epoch, total)
    warmup = int(config.optimizer.warmup_epochs * steps_per_epoch)
    peak = 1.5e-5 * config.batch_size / 256
    assert float(schedule(0)) == 0.0
    assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)
    assert float(schedule(warmup // 2)) == pytest.approx(peak / 2, rel=1e-3)  # linear warmup
    assert max(float(schedule(s)) for s in np.linspace(0, total, 41).astype(int)) <= peak * 1.0001
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", CONFIGS)
def test_mesh_splits_the_batch_on_one_host_of_4_or_8_devices(name):
    config = load_config(name)
    for n in (1, 4, 8):  # one GPU; v4-8 / v5p-8 (4 chips); v5litepod-8 or an 8-GPU host
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:n])
        assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
        check_batch(config, mesh)
    for n in (16, 32, 64):  # pod slices: only the shape, on paper
        assert sharding.mesh_shape(config.mesh, n)["data"] == n
        assert config.batch_size % n == 0


@pytest.mark.slow  # an integration run over 30 s: it runs in CI's slow group
def test_base_step_compiles_for_8_devices_with_the_state_replicated():
    config = load_config("fsd50k_mwmae_base")
    config.batch_size = 16  # 2 per device: the compile, not the memory of the real batch
    trainer = Engine(Pretraining(config), "/tmp/unused", devices=jax.devices()[:8])
    assert dict(trainer.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert trainer.model_config.dtype == "bfloat16"
    compiled = trainer.compile()  # what `python -m mwmae.train.compile_check` does
    # dp: every device holds float32 params + both Adam moments (3 x 4 bytes per parameter).
    argument_mib = compiled.memory_analysis().argument_size_in_bytes / 2**20
    state_mib = 3 * 4 * BASE_PARAMETERS / 2**20
    assert state_mib <= argument_mib <= state_mib + 8, argument_mib


# ------------------------------------------------------------------ a fake FSD50K tree

# (fname, labels, split, seconds): FSD50K's dev.csv has a split column, eval.csv has none.
DEV = [(f"{1000 + i}", names, "val" if i % 4 == 3 else "train", 0.4 + 0.35 * i)
       for i, names in enumerate([
           "Bark,Dog", "Speech", "Guitar", "Rain", "Bark", "Laughter,Speech", "Piano",
           "Dog", "Engine", "Guitar,Music", "Rain,Thunder", "Music"])]
EVAL = [("37199", "Siren", None, 1.2), ("37200", "Siren,Engine", None, 2.5)]
VOCABULARY = sorted({n for _, names, _, _ in DEV + EVAL for n in names.split(",")})


def _write_fsd50k(root):
    gt = root / "FSD50K.ground_truth"
    gt.mkdir(parents=True)
    # vocabulary.csv has no header: index,label,mid
    gt.joinpath("vocabulary.csv").write_text(
        "".join(f"{i},{name},/m/{i:04x}\n" for i, name in enumerate(VOCABULARY)))
    rows = ["fname,labels,mids,split"] + [f'{f},"{n}","",{s}' for f, n, s, _ in DEV]
    gt.joinpath("dev.csv").write_text("\n".join(rows) + "\n")
    rows = ["fname,labels,mids"] + [f'{f},"{n}",""' for f, n, _, _ in EVAL]
    gt.joinpath("eval.csv").write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(0)
    for folder, clips in (("FSD50K.dev_audio", DEV), ("FSD50K.eval_audio", EVAL)):
        (root / folder).mkdir()
        for k, (fname, _, _, seconds) in enumerate(clips):
            t = np.arange(int(seconds * 44100)) / 44100  # as distributed: 44.1 kHz 16-bit mono
            x = 0.3 * np.sin(2 * np.pi * (200 + 60 * k) * t) + 0.05 * rng.standard_normal(t.size)
            soundfile.write(root / folder / f"{fname}.wav", x, 44100, subtype="PCM_16")


def _ids(names: str) -> list[int]:
    return sorted(VOCABULARY.index(n) for n in names.split(","))


@pytest.mark.slow  # ~70 s: shards built and trained on in subprocesses
def test_fsd50k_tree_to_shards_to_the_configs_training_run(tmp_path):
    _write_fsd50k(tmp_path / "FSD50K")
    out = tmp_path / "shards" / "dev"
    assert build_lib.main(["fsd50k", "--root", str(tmp_path / "FSD50K"), "--split", "dev",
                           "--out", str(out), "--shard-size", "4", "--workers", "1",
                           "--no-progress"]) == 0
    manifest = out / "data-manifest.csv"
    report = inspect_lib.inspect_shards([str(manifest)])
    assert report["ok"], report["problems"]
    assert (report["shards"], report["records"], report["mel_bins"]) == (3, len(DEV), [80])
    assert report["frames"]["min"] == 41  # the 0.4 s clip: 6400 samples / hop 160 + 1
    assert (out / "data-labels.csv").read_text().splitlines()[1:] == [
        f"{i},{name}" for i, name in enumerate(VOCABULARY)]

    config = load_config("fsd50k_mwmae_base")
    # The recipe's data, optimizer and mesh settings with a tiny model and a batch of 8.
    config.model.update(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=64,
                        decoder_depth=2, decoder_num_heads=4, decoder_window_sizes=(5, 25, 0, 0))
    config.batch_size = 8
    config.num_train_steps = 3
    config.data.train_shards = str(manifest)
    config.data.shuffle_buffer = 8
    config.checkpoint.every_steps = 3
    config.image_every_steps = 0
    config.log_every_steps = 1
    config.trace_batches = True
    lines = []
    result = train(Pretraining, config, tmp_path / "run", print_fn=lines.append)
    assert result["status"] == "done" and math.isfinite(result["loss"])
    assert (tmp_path / "run" / "checkpoints" / "3" / "data").exists()

    trace = [json.loads(line) for line in (tmp_path / "run" / "trace" / "host0.jsonl").open()]
    assert [r["step"] for r in trace] == [1, 2, 3]
    seen = sorted(tuple(i for i in ids if i >= 0) for r in trace for ids in r["ids"])
    # 3 batches of 8 = two passes over the 12 dev clips, each clip once per pass; the eval
    # clips (the only ones labelled Siren) never appear.
    assert seen == sorted(2 * [tuple(_ids(names)) for _, names, _, _ in DEV])
    assert VOCABULARY.index("Siren") not in {i for ids in seen for i in ids}
