"""mwmae.torch: the PyTorch encoder against the JAX one.

Parity is the maximum ABSOLUTE difference over every entry of the features (the encoder's
LayerNorm outputs, entries of order 1), float32 on CPU, within ``TOL`` = 1e-5. Random weights
come from ``init_params`` with the relative-position tables redrawn from N(0, 1) and the norms
perturbed: at init the tables are ~0.02 wide, too small for a misplaced bias to show at 1e-5.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

import mwmae.torch as mt
from mwmae.api import Model
from mwmae.model import Encoder as JaxEncoder
from mwmae.model import ModelConfig, encoder_keys, init_params, model_config, param_shapes
from mwmae.torch.config import ENCODER_KEYS, IGNORED_KEYS

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5

# Windows must divide the tokens the encoder sees with and without masking; the decoder's
# windows are global so that these small grids stay valid configs.
RANDOM_CONFIGS = {
    "2x16-global": dict(img_size=(16, 32), patch_size=(2, 16), window_sizes=0),
    "4x16-windows-shifted": dict(img_size=(40, 32), patch_size=(4, 16),
                                 window_sizes=(5, 10, 0, 0), mask_ratio=0.5,
                                 shifting_windows=True),
    # Heads of one window size are not adjacent: the group outputs must be put back in order.
    "4x16-interleaved-windows": dict(img_size=(40, 32), patch_size=(4, 16), depth=3,
                                     window_sizes=(10, 5, 0, 5), mask_ratio=0.5),
    # Odd windows shift by w // 2; a window of 1 never shifts.
    "4x16-odd-windows-shifted": dict(img_size=(24, 48), patch_size=(4, 16), embed_dim=48,
                                     num_heads=3, window_sizes=(3, 1, 0), mask_ratio=0.5,
                                     shifting_windows=True),
    # Two input channels: the patch kernel's (p, q, C) order must survive the flattening.
    "8x16-cls-global-2ch": dict(img_size=(64, 32), patch_size=(8, 16), in_chans=2,
                                window_sizes=0, use_cls_token=True),
    # Four layers: two scanned groups of a plain and a shifted block.
    "8x16-cls-windows-shifted": dict(img_size=(56, 48), patch_size=(8, 16), depth=4,
                                     window_sizes=(2, 11, 22, 0), mask_ratio=0.0,
                                     shifting_windows=True, use_cls_token=True),
}
# The family's small end (mwmae.train.family: T, S, M) at their real widths, depths and heads.
FAMILY = {f"{kind}-{size}": (size, kind) for size, kind in
          (("tiny", "mwmae"), ("small", "mwmae"), ("medium", "mwmae"), ("tiny", "mae"))}


def random_config(**overrides) -> ModelConfig:
    base = dict(embed_dim=64, depth=2, num_heads=4, decoder_window_sizes=0)
    return ModelConfig(**{**base, **overrides})


def family_config(size: str, kind: str) -> ModelConfig:
    return model_config(size, kind, img_size=(16, 32), decoder_window_sizes=0)


def flat(params) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


def random_params(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    params = flat(jax.jit(functools.partial(init_params, config, encoder_only=True))(
        jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    for name, value in params.items():
        if "rel_pos_bias" in name:
            params[name] = rng.normal(size=value.shape).astype(np.float32)
        elif "norm" in name:
            params[name] = (value + 0.3 * rng.normal(size=value.shape)).astype(np.float32)
    return params


def jax_features(config: ModelConfig, params: dict[str, np.ndarray], x: np.ndarray
                 ) -> np.ndarray:
    tree = unflatten_dict({tuple(k.split("/")): v for k, v in params.items()})
    return np.asarray(Model(config, tree).features(x))


def torch_out(encoder: mt.Encoder, x: np.ndarray, method: str = "forward") -> np.ndarray:
    with torch.no_grad():
        return getattr(encoder, method)(torch.from_numpy(x)).float().numpy()


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def inputs(config: ModelConfig, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, *config.input_shape)
                                              ).astype(np.float32)


# Parity -------------------------------------------------------------------------------------

def test_reference_checkpoint_matches_jax_and_the_original(reference_model, fixtures):
    config = reference_model.config
    params = {k: v for k, v in flat(reference_model.params).items()
              if k.split("/")[0] in encoder_keys(config)}
    encoder = mt.Encoder.from_params(config, params)
    x = fixtures["input"]
    got = torch_out(encoder, x)
    assert got.shape == (2, 50, 960)
    assert max_abs(got, np.asarray(reference_model.features(x))) <= TOL
    # The original implementation's recorded outputs, too.
    assert max_abs(got, fixtures["features"]) <= TOL


@pytest.mark.parametrize("name", RANDOM_CONFIGS)
def test_random_configs_match_jax(name):
    config = random_config(**RANDOM_CONFIGS[name])
    params = random_params(config, seed=len(name))
    x = inputs(config)
    encoder = mt.Encoder.from_params(config, params)
    got = torch_out(encoder, x)
    assert got.shape == (2, *config.grid_size[:1], config.feature_dim)
    assert max_abs(got, jax_features(config, params, x)) <= TOL
    if config.use_cls_token:  # the per-token outputs, cls first, as the JAX encoder has them
        tree = unflatten_dict({tuple(k.split("/")): v for k, v in params.items()})
        encode = jax.jit(functools.partial(JaxEncoder(config).apply,
                                           method=lambda m, v: m.encode(m.embed(v))))
        want = encode({"params": tree}, x)
        tokens = torch_out(encoder, x, "tokens")
        assert tokens.shape == (2, config.num_patches + 1, config.embed_dim)
        assert max_abs(tokens, np.asarray(want)) <= TOL


@pytest.mark.parametrize("name", FAMILY)
def test_family_sizes_match_jax(name):
    config = family_config(*FAMILY[name])
    params = random_params(config, seed=1)
    x = inputs(config, seed=1)
    got = torch_out(mt.Encoder.from_params(config, params), x)
    assert max_abs(got, jax_features(config, params, x)) <= TOL


def test_a_windowed_layer_differs_from_a_global_one():
    """The parity tests would not notice windows ignored on both sides: check they matter."""
    config = random_config(**RANDOM_CONFIGS["4x16-windows-shifted"])
    params = random_params(config, seed=3)
    x = inputs(config)
    windowed = torch_out(mt.Encoder.from_params(config, params), x)
    plain = dataclasses.replace(config, window_sizes=(0,) * 4)
    plain_params = {k: v for k, v in params.items() if "rel_pos_bias" not in k}
    assert max_abs(windowed, torch_out(mt.Encoder.from_params(plain, plain_params), x)) > 0.1


# Names, shapes and configs ------------------------------------------------------------------

@pytest.mark.parametrize("config", [random_config(**kw) for kw in RANDOM_CONFIGS.values()]
                         + [family_config(*v) for v in FAMILY.values()], ids=[
                             *RANDOM_CONFIGS, *FAMILY])
def test_tensor_names_and_shapes_are_the_jax_encoders(config):
    want = {"/".join(k): tuple(v.shape)
            for k, v in flatten_dict(param_shapes(config, encoder_only=True)).items()}
    assert mt.param_shapes(config) == want


def test_from_params_names_every_bad_tensor_at_once():
    config = random_config(**RANDOM_CONFIGS["4x16-windows-shifted"])
    params = random_params(config, seed=0)
    del params["encoder/layers/block_1/attn/rel_pos_bias_1"]
    params["decoder_pred/kernel"] = np.zeros((64, 64), np.float32)
    params["encoder_norm/scale"] = np.ones((32,), np.float32)
    params["patch_embed/bias"] = np.zeros((64,), np.int32)
    with pytest.raises(mt.WeightsError) as err:
        mt.Encoder.from_params(config, params)
    message = str(err.value)
    assert message.startswith("4 tensor(s) do not fit the encoder config (decoder tensors")
    assert "missing encoder/layers/block_1/attn/rel_pos_bias_1 (1, 19)" in message
    assert "unexpected decoder_pred/kernel (64, 64)" in message
    assert "encoder_norm/scale: shape (32,), the config implies (64,)" in message
    assert "patch_embed/bias: dtype int32 is not floating point" in message


def test_from_params_takes_torch_tensors_and_jax_arrays_alike():
    config = random_config(**RANDOM_CONFIGS["2x16-global"])
    params = random_params(config, seed=0)
    x = inputs(config)
    want = torch_out(mt.Encoder.from_params(config, params), x)
    as_torch = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
    as_jax = {k: jax.numpy.asarray(v) for k, v in params.items()}
    assert max_abs(torch_out(mt.Encoder.from_params(config, as_torch), x), want) == 0.0
    assert max_abs(torch_out(mt.Encoder.from_params(config.to_dict(), as_jax), x), want) == 0.0


def test_config_keys_cover_the_jax_model_config():
    """A new ModelConfig field must be placed on purpose: encoder (implemented here) or not."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert ENCODER_KEYS | IGNORED_KEYS == fields
    assert not ENCODER_KEYS & IGNORED_KEYS


def test_config_reads_the_model_dict_as_jax_does():
    jax_config = random_config(**RANDOM_CONFIGS["8x16-cls-windows-shifted"])
    config = mt.EncoderConfig.from_dict(json.loads(json.dumps(jax_config.to_dict())))
    for name in ENCODER_KEYS:
        assert getattr(config, name) == getattr(jax_config, name), name
    assert (config.grid_size, config.num_patches, config.feature_dim) == (
        jax_config.grid_size, jax_config.num_patches, jax_config.feature_dim)
    assert mt.EncoderConfig.from_dict({"num_heads": 3, "embed_dim": 192,
                                       "window_sizes": 0}).window_sizes == (0, 0, 0)
    with pytest.raises(mt.ConfigError, match=r"unknown model config keys \['new_knob'\]"):
        mt.EncoderConfig.from_dict({**jax_config.to_dict(), "new_knob": 1})
    with pytest.raises(mt.ConfigError, match="does not divide the 22 tokens"):
        mt.EncoderConfig.from_dict({**jax_config.to_dict(), "window_sizes": [2, 11, 4, 0]})
    with pytest.raises(mt.ConfigError, match="pass its 'model' entry"):
        mt.EncoderConfig.from_dict({"format": "mwmae-artifact", "model": {}})


@pytest.mark.parametrize("cls", [False, True])
def test_fresh_position_embeddings_are_the_jax_init(cls):
    config = random_config(img_size=(24, 48), patch_size=(4, 16), use_cls_token=cls)
    want = flat(jax.jit(functools.partial(init_params, config, encoder_only=True))(
        jax.random.key(0)))["pos_embed"]
    np.testing.assert_array_equal(mt.Encoder(config).pos_embed.detach().numpy(), want)


def test_wrong_input_is_refused():
    encoder = mt.Encoder(random_config(**RANDOM_CONFIGS["2x16-global"]))
    with pytest.raises(ValueError, match=r"input has shape \(2, 16, 31, 1\); expected \(batch, "
                                         r"16, 32, 1\)"):
        encoder(torch.zeros(2, 16, 31, 1))
    assert encoder(torch.zeros(2, 16, 32)).shape == (2, 8, 128)  # one channel may be left out


# Imports ------------------------------------------------------------------------------------

def test_the_package_imports_torch_numpy_and_the_stdlib_only():
    allowed = {"torch", "numpy", "safetensors", "__future__", *sys.stdlib_module_names}
    files = sorted((REPO / "mwmae" / "torch").rglob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "encoder.py", "load.py"}
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["<relative>"]
            else:
                continue
            for name in names:
                # mwmae.checksum: the weights-file check mwmae.load uses (stdlib and numpy).
                if not (name.split(".")[0] in allowed or name == "mwmae.torch"
                        or name.startswith("mwmae.torch.") or name == "mwmae.checksum"):
                    bad.append(f"{path.name}:{node.lineno}: {name}")
    assert not bad, bad


# Artifacts ----------------------------------------------------------------------------------

ARTIFACT_CONFIG = "8x16-cls-windows-shifted"


def write_artifact(folder: pathlib.Path, config: ModelConfig, params: dict[str, np.ndarray],
                   *, encoder_only: bool = True) -> pathlib.Path:
    """An artifact as the export writes it for PyTorch: config.json + model.safetensors."""
    folder.mkdir(parents=True)
    save_file(params, str(folder / "model.safetensors"))
    meta = {"format": "mwmae-artifact", "version": 3, "model": config.to_dict(),
            "encoder_only": encoder_only, "source": "test", "params_file": "model.safetensors",
            "params_sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()
                                            ).hexdigest()}
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    return folder


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """(folder, input, the JAX features of the artifact's weights on it)."""
    config = random_config(**RANDOM_CONFIGS[ARTIFACT_CONFIG])
    params = random_params(config, seed=7)
    x = inputs(config, seed=7)
    folder = write_artifact(tmp_path_factory.mktemp("artifact") / "model", config, params)
    return folder, x, jax_features(config, params, x)


def test_load_gives_the_jax_features(artifact):
    folder, x, want = artifact
    encoder = mt.load(folder)
    assert not encoder.training
    assert max_abs(torch_out(encoder, x), want) <= TOL
    wide = mt.load(folder, device="cpu", dtype="float64")
    assert wide.pos_embed.dtype == torch.float64
    assert max_abs(torch_out(wide, x), want) <= TOL


def test_load_leaves_a_decoder_out(tmp_path):
    config = random_config(**RANDOM_CONFIGS["4x16-windows-shifted"])
    tree = jax.jit(functools.partial(init_params, config))(jax.random.key(0))
    params = flat(tree)
    assert any(k.startswith("decoder/") for k in params)
    folder = write_artifact(tmp_path / "full", config, params, encoder_only=False)
    x = inputs(config)
    assert max_abs(torch_out(mt.load(folder), x), np.asarray(Model(config, tree).features(x))
                   ) <= TOL


def test_load_refuses_what_it_cannot_read(tmp_path, artifact):
    folder, _, _ = artifact
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((folder / "config.json").read_text())
    (old / "params.msgpack").write_bytes(b"\x80")
    with pytest.raises(mt.ArtifactError, match=r"holds params.msgpack only.*its source: test\)"
                                               r".*`python -m mwmae.export`"):
        mt.load(old)
    (old / "params.msgpack").unlink()
    with pytest.raises(mt.ArtifactError, match="model.safetensors: missing"):
        mt.load(old)
    garbage = b"not a safetensors file"
    (old / "model.safetensors").write_bytes(garbage)
    (old / "config.json").write_text(json.dumps({
        **json.loads((folder / "config.json").read_text()),
        "params_sha256": hashlib.sha256(garbage).hexdigest()}))
    with pytest.raises(mt.ArtifactError, match="not a readable safetensors file"):
        mt.load(old)
    with pytest.raises(mt.ArtifactError, match="config.json: missing"):
        mt.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        mt.load(tmp_path / "nowhere")
    meta = json.loads((folder / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(mt.ArtifactError, match="format is 'other'"):
        mt.load(old)
    (old / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "depth": 6}}))
    (old / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(mt.ArtifactError, match=r"model.safetensors: 30 tensor\(s\) .*\n  "
                                               r"encoder/layers/block_0/attn/proj/bias: shape "
                                               r"\(2, 64\), the config implies \(3, 64\)"):
        mt.load(old)
    with pytest.raises(ValueError, match="not a torch floating dtype"):
        mt.load(folder, dtype="int8")


def test_load_refuses_unverifiable_weights_exactly_as_mwmae_load(tmp_path, artifact):
    """A config.json without the weights' SHA-256 gives no way to tell a damaged file: both
    loaders refuse it with the same line, and a damaged file with a recorded one likewise."""
    from mwmae.artifact import ArtifactError, load_artifact

    folder, _, _ = artifact
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((folder / "config.json").read_text())
    blob = bytearray((folder / "model.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(blob))
    for broken in ({k: v for k, v in meta.items() if k != "params_sha256"}, meta):
        (bad / "config.json").write_text(json.dumps(broken))
        with pytest.raises(mt.ArtifactError) as torch_refusal:
            mt.load(bad)
        with pytest.raises(ArtifactError) as jax_refusal:
            load_artifact(bad)
        assert str(torch_refusal.value) == str(jax_refusal.value)
        assert str(torch_refusal.value).startswith(f"{bad / 'model.safetensors'}: ")
    (bad / "config.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                 if k != "params_sha256"}))
    with pytest.raises(mt.ArtifactError, match="config.json records no params_sha256"):
        mt.load(bad)


def test_load_works_where_jax_cannot_be_imported(artifact, tmp_path):
    folder, x, want = artifact
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = ("jax", "jaxlib", "flax", "tensorflow")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        import mwmae.torch
        encoder = mwmae.torch.load({str(folder)!r})
        with torch.no_grad():
            out = encoder(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))
        np.save({str(tmp_path / 'out.npy')!r}, out.numpy())
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert max_abs(np.load(tmp_path / "out.npy"), want) <= TOL


# Lower precision and training ---------------------------------------------------------------

# Measured on CPU, max abs / mean abs difference from float32 (features of order 1):
#   bfloat16 autocast: 0.038 / 0.0047 (reference checkpoint), 0.047 / 0.0058 (the artifact's
#                      windowed, shifted, cls config); bfloat16 weights: 0.048 / 0.0061;
#   float16 autocast:  0.0042 / 0.00057 and 0.0052 / 0.00068; float16 weights: 0.0049 / 0.00076.
# A 12-layer, 192-wide windowed model measured 0.060 / 0.0067 (bfloat16), 0.0073 / 0.00084.
LOW_PRECISION_TOL = {torch.bfloat16: (0.1, 0.012), torch.float16: (0.02, 0.002)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lower_precision_on_cpu_stays_near_float32(dtype, reference_model, fixtures, artifact):
    config = reference_model.config
    params = {k: v for k, v in flat(reference_model.params).items()
              if k.split("/")[0] in encoder_keys(config)}
    folder, x_windowed, _ = artifact
    max_tol, mean_tol = LOW_PRECISION_TOL[dtype]

    def check(low: torch.Tensor, full: np.ndarray) -> None:
        assert low.dtype == torch.float32  # features come back float32, as from JAX
        diff = np.abs(low.numpy() - full)
        # Above zero: the lower precision really was used.
        assert 0 < diff.max() <= max_tol and diff.mean() <= mean_tol, (diff.max(), diff.mean())

    for encoder, x in ((mt.Encoder.from_params(config, params), fixtures["input"]),
                       (mt.load(folder), x_windowed)):
        full = torch_out(encoder, x)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            low = encoder(torch.from_numpy(x))
        check(low, full)
    half = mt.load(folder, dtype=dtype)
    assert half.blocks[0].attn.qkv.weight.dtype == dtype
    with torch.no_grad():
        check(half(torch.from_numpy(x_windowed)), torch_out(mt.load(folder), x_windowed))


def test_every_parameter_trains(artifact):
    folder, x, _ = artifact
    encoder = mt.load(folder).train()
    encoder(torch.from_numpy(x)).square().mean().backward()
    no_grad = [n for n, p in encoder.named_parameters()
               if p.grad is None or not torch.count_nonzero(p.grad)]
    assert not no_grad, no_grad
