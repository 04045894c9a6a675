"""Original-format MW-MAE checkpoints -> this project's parameters and artifact.

The original trainer writes flax legacy checkpoints: one msgpack file ``checkpoint_<step>`` per
save holding a whole TrainState, with a ``config.json`` beside it. This module reads that format
without the original code (and without flax's legacy restore, which needs a matching target),
maps every parameter onto :class:`mwmae.model.MaskedAutoencoder`, and refuses, with the list, any
parameter it cannot place.

CLI: ``python -m mwmae.convert SRC_DIR DST_DIR [--num-heads=N] [--decoder-num-heads=N]
[--overwrite]``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import msgpack
import numpy as np
from flax.traverse_util import unflatten_dict

from mwmae import cli
from mwmae.artifact import ArtifactError, replacing, save_artifact
from mwmae.model import param_problems
from mwmae.model.config import HEADS_BY_WIDTH, ModelConfig

_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")
_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or mapped; the message names the file and the problem."""


# Reading the msgpack file --------------------------------------------------------------------

def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        shape, dtype_name, buf = msgpack.unpackb(data, raw=False)
        return np.frombuffer(buf, dtype=_dtype(dtype_name)).reshape(shape).copy()
    if code == _EXT_NPSCALAR:
        shape, dtype_name, buf = msgpack.unpackb(data, raw=False)
        return np.frombuffer(buf, dtype=_dtype(dtype_name)).reshape(shape)[()]
    return msgpack.ExtType(code, data)


def _unchunk(tree: Any) -> Any:
    """flax splits arrays over 2**30 bytes into ``__msgpack_chunked_array__`` dicts."""
    if isinstance(tree, dict):
        if "__msgpack_chunked_array__" in tree:
            chunks = tree["chunks"]
            flat = np.concatenate([chunks[str(i)].reshape(-1) for i in range(len(chunks))])
            return flat.reshape(tree["shape"])
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_msgpack_checkpoint(path: str | pathlib.Path) -> dict[str, Any]:
    """Decode one flax msgpack checkpoint file into nested dicts of numpy arrays."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except (OSError, ValueError, msgpack.exceptions.ExtraData) as e:
        raise CheckpointError(f"{path}: not a readable flax msgpack checkpoint ({e})") from e
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: expected a map at the top level, got {type(tree).__name__}")
    return _unchunk(tree)


def latest_checkpoint(directory: str | pathlib.Path) -> pathlib.Path:
    """The highest-step ``checkpoint_<step>`` file (``checkpoint_tmp`` is an unfinished write)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected an original-format "
                              "checkpoint directory holding checkpoint_<step> and config.json)")
    steps = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT_RE.match(p.name))]
    if not steps:
        found = sorted(p.name for p in directory.iterdir())[:10]
        raise CheckpointError(
            f"{directory}: no checkpoint found (expected files named checkpoint_<step>; "
            f"found {found or 'nothing'})")
    return max(steps)[1]


# Deciding the architecture --------------------------------------------------------------------

def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = np.asarray(v)
    return out


def _heads_for(width: int, override: int | None, where: str) -> int:
    if override:
        return override
    if width not in HEADS_BY_WIDTH:
        raise CheckpointError(f"{where} width {width} is not in the paper's size table "
                              f"{sorted(HEADS_BY_WIDTH)}: pass its number of heads explicitly")
    return HEADS_BY_WIDTH[width]


def infer_config(params: Mapping[str, np.ndarray], original_config: Mapping[str, Any] | None,
                 num_heads: int | None = None, decoder_num_heads: int | None = None
                 ) -> ModelConfig:
    """Sizes from the parameter shapes; windows, masking and input from the original config."""
    args = dict((original_config or {}).get("model", {}).get("model_args", {}))
    kernel = params["patch_embed/proj/kernel"]
    embed_dim = kernel.shape[-1]
    depth = len({k.split("/")[0] for k in params if k.startswith("encoder_block_")})
    dec_depth = len({k.split("/")[0] for k in params if k.startswith("decoder_block_")})
    dec_dim = params["decoder_embed/kernel"].shape[-1]
    decoder_num_heads = decoder_num_heads or args.get("decoder_num_heads")
    precision = (original_config or {}).get("precision", "float32")
    return ModelConfig(
        img_size=tuple(args.get("img_size", (200, 80))),
        patch_size=tuple(kernel.shape[:2]),
        in_chans=kernel.shape[2],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=_heads_for(embed_dim, num_heads or args.get("num_heads"), "encoder"),
        decoder_embed_dim=dec_dim,
        decoder_depth=dec_depth,
        decoder_num_heads=_heads_for(dec_dim, decoder_num_heads, "decoder"),
        mlp_ratio=params["encoder_block_00/Mlp_0/Dense_0/kernel"].shape[-1] // embed_dim,
        mask_ratio=float(args.get("mask_ratio", 0.8)),
        window_sizes=args.get("window_sizes", 0),
        decoder_window_sizes=args.get("decoder_window_sizes", 0),
        shifting_windows=bool(args.get("shifting_windows", False)),
        use_cls_token="cls_token" in params,
        norm_pix_loss=bool((original_config or {}).get("opt", {}).get("norm_pix_loss", False)),
        dtype="bfloat16" if precision == "bfloat16" else "float32",
    )


# Mapping parameters ---------------------------------------------------------------------------

def _block_map(src_block: str, dst: str, dim: int, heads: int, windowed: bool
               ) -> dict[str, tuple[str, Any]]:
    """Original block leaf -> (our leaf path, reshape) for one block."""
    hd = dim // heads
    attn = f"{src_block}/wmha_block" if windowed else f"{src_block}/Attention_0"
    qkv, proj = ("qkv", "proj") if windowed else ("Dense_0", "Dense_1")
    m = {
        f"{src_block}/LayerNorm_0/scale": (f"{dst}/norm1/scale", None),
        f"{src_block}/LayerNorm_0/bias": (f"{dst}/norm1/bias", None),
        f"{src_block}/LayerNorm_1/scale": (f"{dst}/norm2/scale", None),
        f"{src_block}/LayerNorm_1/bias": (f"{dst}/norm2/bias", None),
        f"{attn}/{qkv}/kernel": (f"{dst}/attn/qkv/kernel", (dim, 3, heads, hd)),
        f"{attn}/{qkv}/bias": (f"{dst}/attn/qkv/bias", (3, heads, hd)),
        f"{attn}/{proj}/kernel": (f"{dst}/attn/proj/kernel", (heads, hd, dim)),
        f"{attn}/{proj}/bias": (f"{dst}/attn/proj/bias", None),
        f"{src_block}/Mlp_0/Dense_0/kernel": (f"{dst}/mlp/fc1/kernel", None),
        f"{src_block}/Mlp_0/Dense_0/bias": (f"{dst}/mlp/fc1/bias", None),
        f"{src_block}/Mlp_0/Dense_1/kernel": (f"{dst}/mlp/fc2/kernel", None),
        f"{src_block}/Mlp_0/Dense_1/bias": (f"{dst}/mlp/fc2/bias", None),
    }
    for h in range(heads):
        m[f"{attn}/attn_heads_{h}/relative_position_bias_table"] = (
            f"{dst}/attn/rel_pos_bias_{h}", "squeeze")
    return m


def convert_params(original: Mapping[str, Any], config: ModelConfig, source: str = "checkpoint"
                   ) -> dict[str, Any]:
    """Original ``params`` tree -> this project's (unboxed, float32) parameter tree.

    Every original leaf must land on exactly one of our leaves with the expected shape and every
    one of ours must be filled; otherwise a :class:`CheckpointError` lists what is wrong.
    """
    src = _flatten(original)
    c = config
    mapping: dict[str, tuple[str, Any]] = {
        "patch_embed/proj/kernel": ("patch_embed/kernel", None),
        "patch_embed/proj/bias": ("patch_embed/bias", None),
        "pos_embed": ("pos_embed", None),
        "cls_token": ("cls_token", None),
        "encoder_norm/scale": ("encoder_norm/scale", None),
        "encoder_norm/bias": ("encoder_norm/bias", None),
        "decoder_embed/kernel": ("decoder_embed/kernel", None),
        "decoder_embed/bias": ("decoder_embed/bias", None),
        "mask_token": ("mask_token", None),
        "decoder_pos_embed": ("decoder_pos_embed", None),
        "decoder_norm/scale": ("decoder_norm/scale", None),
        "decoder_norm/bias": ("decoder_norm/bias", None),
        "decoder_pred/kernel": ("decoder_pred/kernel", None),
        "decoder_pred/bias": ("decoder_pred/bias", None),
    }
    # Block i of a stack lives at layers/block_{i % period} index i // period (scanned layers).
    stacked: dict[str, dict[int, np.ndarray]] = {}
    layer_of: dict[str, tuple[str, int]] = {}
    for name, depth, dim, heads, windows in (
        ("encoder", c.depth, c.embed_dim, c.num_heads, c.window_sizes),
        ("decoder", c.decoder_depth, c.decoder_embed_dim, c.decoder_num_heads,
         c.decoder_window_sizes),
    ):
        windowed = any(windows)
        for i in range(depth):
            dst = f"{name}/layers/block_{i % c.block_period}"
            for s, (d, how) in _block_map(f"{name}_block_{i:02d}", dst, dim, heads,
                                          windowed).items():
                mapping[s] = (d, how)
                layer_of[s] = (d, i // c.block_period)

    out: dict[str, np.ndarray] = {}
    problems = []
    for key, value in sorted(src.items()):
        if key not in mapping:
            problems.append(f"{key} {tuple(value.shape)}: no parameter of the model to map it to")
            continue
        dst, how = mapping[key]
        value = np.asarray(value, np.float32)  # bfloat16 mask/cls tokens of the released weights
        if how == "squeeze":
            value = value.reshape(-1)
        elif how is not None:
            if value.size != int(np.prod(how)):
                problems.append(f"{key} {tuple(value.shape)}: cannot reshape to {how}")
                continue
            value = value.reshape(how)
        if key in layer_of:
            stacked.setdefault(dst, {})[layer_of[key][1]] = value
        else:
            out[dst] = value
    for dst, layers in stacked.items():
        out[dst] = np.stack([layers[i] for i in sorted(layers)])
    tree = unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
    problems += [f"model parameters: {p}" for p in param_problems(c, tree)] if out else []
    if problems:
        raise CheckpointError(f"{source}: {len(problems)} parameter(s) cannot be mapped:\n  "
                              + "\n  ".join(problems))
    return tree


def load_original(directory: str | pathlib.Path, *, num_heads: int | None = None,
                  decoder_num_heads: int | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Read an original checkpoint directory: (config, params) ready for the model."""
    directory = pathlib.Path(directory)
    ckpt = latest_checkpoint(directory)
    cfg_path = directory / "config.json"
    original_config = None
    if cfg_path.exists():
        try:
            original_config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    state = read_msgpack_checkpoint(ckpt)
    if "params" not in state:
        raise CheckpointError(f"{ckpt}: no 'params' entry (top-level keys: {sorted(state)})")
    params = _flatten(state["params"])
    if "patch_embed/proj/kernel" not in params:
        raise CheckpointError(f"{ckpt}: no patch_embed/proj/kernel; not an MW-MAE/MAE checkpoint")
    if original_config is None and not (num_heads and decoder_num_heads):
        # Without the config the window sizes are unknown; bias tables would reveal only some.
        raise CheckpointError(f"{cfg_path}: missing; the original config.json (model_args with "
                              "window sizes) must sit beside the checkpoint")
    try:
        config = infer_config(params, original_config, num_heads, decoder_num_heads)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e}") from e
    converted = convert_params(state["params"], config, source=str(ckpt))
    return config, jax.tree.map(np.asarray, converted)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwmae.convert", description=__doc__.split("\n")[0])
    p.add_argument("src", help="original checkpoint directory (checkpoint_<step> + config.json)")
    p.add_argument("dst", help="output artifact directory")
    p.add_argument("--num-heads", type=int, default=None, help="encoder heads, if not the paper's")
    p.add_argument("--decoder-num-heads", type=int, default=None)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing artifact in DST (built beside it, then swapped in)")
    a = cli.parse_args(p, argv)
    src, dst = pathlib.Path(a.src).resolve(), pathlib.Path(a.dst).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        print(f"error: {a.dst}: overlaps the original checkpoint folder {a.src}; an artifact "
              "there would mix with (or replace) its files. Nothing was written.",
              file=sys.stderr)
        return 2
    try:
        config, params = load_original(a.src, num_heads=a.num_heads,
                                       decoder_num_heads=a.decoder_num_heads)
        with replacing(a.dst, overwrite=a.overwrite, name=a.dst) as staging:
            save_artifact(staging, config, params, source=str(src))
    except (CheckpointError, ArtifactError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"converted {a.src} -> {dst} ({n:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
