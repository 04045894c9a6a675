"""The analysis itself: clips through the captured passes, metrics per layer and head, CKA.

Batches are reduced as they come (sums per layer and head, the CKA covariance), so memory holds
one batch's probabilities, never all clips'.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from mwmae.analysis import capture, metrics
from mwmae.analysis.geometry import PatchGrid
from mwmae.analysis.weights import Weights

# Report keys of the mean distances, and the geometry's matrix for each.
DISTANCES = {"distance_patches": "patches", "distance_time_patches": "time_patches",
             "distance_time_ms": "time_ms", "distance_freq_patches": "freq_patches",
             "distance_freq_mel_bins": "freq_mel_bins", "distance_freq_hz": "freq_hz"}


def window_label(window: int) -> str:
    return "global" if window == 0 else f"w={window}"


def _stack_shape(config: Any, part: str) -> tuple[int, int, tuple[int, ...]]:
    if part == "encoder":
        return config.depth, config.num_heads, config.window_sizes
    return config.decoder_depth, config.decoder_num_heads, config.decoder_window_sizes


def _pad(x: np.ndarray, batch: int) -> np.ndarray:
    """The last batch filled up with copies of its first clip, so one compile serves all."""
    if len(x) == batch:
        return x
    return np.concatenate([x, np.repeat(x[:1], batch - len(x), axis=0)])


def analyse_part(weights: Weights, clips: np.ndarray, part: str, *, batch: int, seed: int,
                 grid: PatchGrid, log: Callable[[str], None] = lambda s: None
                 ) -> dict[str, Any]:
    """One stack's report: per layer and head the window, mean distances, entropy and their
    uniform-attention baselines; the CKA matrix of the heads' outputs."""
    config = weights.config
    depth, num_heads, windows = _stack_shape(config, part)
    n_tokens = grid.num_tokens
    distances = grid.distances()
    sums = {key: np.zeros((depth, num_heads)) for key in [*DISTANCES, "entropy_nats"]}
    cka: metrics.CkaAccumulator | None = None
    run = capture.encoder_pass(config) if part == "encoder" else capture.decoder_pass(config)
    masked = 0.0
    start = time.perf_counter()
    for index, first in enumerate(range(0, len(clips), batch)):
        real = min(batch, len(clips) - first)
        x = _pad(clips[first:first + batch], batch)
        if part == "encoder":
            out = run(weights.params, x)
        else:
            out = run(weights.params, x,
                      capture.mask_noise(seed, index, batch, config.num_patches))
            masked += float(np.asarray(out["mask"])[:real].sum())
        out = jax.device_get(out)
        probs, heads_out = out["attention"][:, :real], out["head_outputs"][:, :real]
        for layer in range(depth):
            for key, unit in DISTANCES.items():
                sums[key][layer] += real * metrics.mean_attention_distance(
                    probs[layer], distances[unit])
            sums["entropy_nats"][layer] += real * metrics.attention_entropy(probs[layer])
        # (L, B, N, H, d) -> samples (B N) x groups (L H) x d, group index layer * H + head.
        d = heads_out.shape[-1]
        samples = heads_out.transpose(1, 2, 0, 3, 4).reshape(real * n_tokens, depth * num_heads, d)
        if cka is None:
            cka = metrics.CkaAccumulator(depth * num_heads, d)
        cka.add(samples)
        if index == 0:
            log(f"{part}: first batch of {batch} in {time.perf_counter() - start:.1f} s "
                "(with the compile)")
    means = {key: value / len(clips) for key, value in sums.items()}

    shifted = [config.shifting_windows and layer % 2 == 1 for layer in range(depth)]
    layers = []
    for layer in range(depth):
        heads = []
        for h in range(num_heads):
            w = windows[h]
            uniform = metrics.uniform_window_probs(n_tokens, w, shifted[layer])[None, None]
            row = {"head": h, "window": w, "window_label": window_label(w)}
            row.update({key: float(means[key][layer, h]) for key in [*DISTANCES, "entropy_nats"]})
            row["uniform"] = {
                "distance_patches": float(metrics.mean_attention_distance(
                    uniform, distances["patches"])[0]),
                "distance_time_ms": float(metrics.mean_attention_distance(
                    uniform, distances["time_ms"])[0]),
                "distance_freq_hz": float(metrics.mean_attention_distance(
                    uniform, distances["freq_hz"])[0]),
                "entropy_nats": math.log(w or n_tokens)}
            heads.append(row)
        layers.append({"layer": layer, "shifted": shifted[layer], "heads": heads})

    matrix = cka.matrix()
    # CKA rows: group index layer * H + head, as the samples were laid out.
    rows = [{"layer": layer, "head": h, "window": windows[h],
             "label": f"L{layer} H{h} {window_label(windows[h])}"}
            for layer in range(depth) for h in range(num_heads)]
    return {
        "tokens": n_tokens,
        "masked_fraction": masked / (len(clips) * n_tokens) if part == "decoder" else 0.0,
        "num_layers": depth, "num_heads": num_heads, "window_sizes": list(windows),
        "layers": layers,
        "cka": {
            "rows": rows,
            "matrix": [[round(float(v), 6) if math.isfinite(v) else None for v in r]
                       for r in matrix],
            "summary": metrics.window_cka_summary(matrix, [r["layer"] for r in rows],
                                                  [r["window"] for r in rows]),
            "samples": cka.count,
        },
        "seconds": round(time.perf_counter() - start, 2),
    }


def analyse(weights: Weights, clips: np.ndarray, parts: Sequence[str], *, batch: int = 8,
            seed: int = 0, clip_names: Sequence[str] = (),
            log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The whole report (``OUT/analysis.json``) for ``parts`` of ``weights`` on ``clips``."""
    grid = PatchGrid.from_config(weights.config, weights.front_end)
    report: dict[str, Any] = {
        "source": weights.source, "step": weights.step,
        "model": weights.config.to_dict(), "clips": len(clips),
        "first_clip": clip_names[0] if clip_names else None,
        "batch": batch, "seed": seed, "grid": grid.describe(),
        "passes": {
            "encoder": "all patches, no masking (mask ratio 0)",
            "decoder": f"pretraining forward, mask ratio {weights.config.mask_ratio}, noise from "
                       "(seed, batch); attention over visible and mask tokens"},
        "parts": {},
    }
    for part in parts:
        report["parts"][part] = analyse_part(weights, clips, part, batch=batch, seed=seed,
                                             grid=grid, log=log)
    return report
