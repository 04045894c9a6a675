"""The report's figures, after the paper's: attention distance and entropy per layer with every
head coloured by its window size, and the CKA heat map of the heads' outputs.

matplotlib is part of the ``demo`` extra, not of the core install; :func:`require_matplotlib`
says so before any work is done.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from mwmae.analysis.errors import AnalysisError

PANELS = (("distance_patches", "distance_patches", "mean distance (patches on the grid)"),
          ("distance_time_ms", "distance_time_ms", "along time (ms)"),
          ("distance_freq_hz", "distance_freq_hz", "along frequency (Hz)"))


def require_matplotlib() -> Any:
    """matplotlib's pyplot on the Agg backend, or an error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise AnalysisError("matplotlib is not installed; the figures need it: install the "
                            "'demo' extra (pip install -e '.[demo]')") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(windows: list[int]) -> dict[int, Any]:
    plt = require_matplotlib()
    palette = plt.get_cmap("tab10")
    # Windows smallest first, global heads last, as the paper orders them.
    order = sorted(set(windows), key=lambda w: (w == 0, w))
    return {w: palette(i % 10) for i, w in enumerate(order)}


def _label(w: int) -> str:
    return "global" if w == 0 else f"w={w}"


def _scatter(ax: Any, part: dict[str, Any], key: str, baseline: str | None) -> None:
    colours = _colours(part["window_sizes"])
    heads = part["num_heads"]
    seen: set[int] = set()
    for layer in part["layers"]:
        for row in layer["heads"]:
            w = row["window"]
            # Heads side by side within a layer, so equal values stay visible.
            x = layer["layer"] + 0.6 * ((row["head"] + 0.5) / heads - 0.5)
            ax.scatter(x, row[key], color=colours[w], s=22, edgecolor="black", linewidth=0.3,
                       label=None if w in seen else _label(w), zorder=3)
            seen.add(w)
    if baseline is not None:
        for w, colour in colours.items():
            values = [row["uniform"][baseline] for layer in part["layers"]
                      for row in layer["heads"] if row["window"] == w]
            ax.axhline(float(np.mean(values)), color=colour, linestyle=":", linewidth=1)
    ax.set_xticks(range(part["num_layers"]))
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)


def distance_figure(report: dict[str, Any], path: pathlib.Path) -> None:
    """Mean attention distance per layer and head: on the grid, along time, along frequency."""
    plt = require_matplotlib()
    parts = report["parts"]
    fig, axes = plt.subplots(len(parts), len(PANELS), figsize=(4.2 * len(PANELS),
                                                               3.2 * len(parts)), squeeze=False)
    for r, (name, part) in enumerate(parts.items()):
        for c, (key, baseline, title) in enumerate(PANELS):
            ax = axes[r, c]
            _scatter(ax, part, key, baseline)
            ax.set_title(f"{name}: {title}", fontsize=9)
        axes[r, 0].legend(fontsize=7, title="head window", title_fontsize=7)
    fig.suptitle("dotted: uniform attention over the window", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def entropy_figure(report: dict[str, Any], path: pathlib.Path) -> None:
    """Attention entropy per layer and head."""
    plt = require_matplotlib()
    parts = report["parts"]
    fig, axes = plt.subplots(1, len(parts), figsize=(4.8 * len(parts), 3.4), squeeze=False)
    for c, (name, part) in enumerate(parts.items()):
        ax = axes[0, c]
        _scatter(ax, part, "entropy_nats", "entropy_nats")
        ax.set_title(f"{name}: attention entropy (nats; dotted: log of the window)", fontsize=9)
        ax.legend(fontsize=7, title="head window", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cka_figure(name: str, part: dict[str, Any], path: pathlib.Path) -> None:
    """CKA between every pair of (layer, head) outputs, rows labelled with their window."""
    plt = require_matplotlib()
    cka = part["cka"]
    matrix = np.array([[np.nan if v is None else v for v in row] for row in cka["matrix"]])
    labels = [row["label"] for row in cka["rows"]]
    size = min(16.0, 3.0 + 0.22 * len(labels))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    heads = part["num_heads"]
    for k in range(1, part["num_layers"]):  # layer boundaries
        ax.axhline(k * heads - 0.5, color="white", linewidth=0.6)
        ax.axvline(k * heads - 0.5, color="white", linewidth=0.6)
    summary = cka["summary"]
    same, other = summary["same_window_other_layer"], summary["other_window_other_layer"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    ax.set_title(f"{name}: linear CKA of head outputs; across layers, same window "
                 f"{fmt(same)}, other windows {fmt(other)}", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(report: dict[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """Every figure of ``report`` into ``out``; returns their paths."""
    paths = [out / "distance.png", out / "entropy.png"]
    distance_figure(report, paths[0])
    entropy_figure(report, paths[1])
    for name, part in report["parts"].items():
        paths.append(out / f"cka_{name}.png")
        cka_figure(name, part, paths[-1])
    return paths
