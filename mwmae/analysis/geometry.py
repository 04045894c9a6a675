"""Where the patch tokens lie: the (time, frequency) grid of the patch embedding, in patches and
in physical units.

Token ``n`` is patch ``(t, f) = (n // F, n % F)`` of a ``T x F`` grid (50 x 5 for 200 frames x
80 mels in 4 x 16 patches). Distances between two tokens:

* along time, ``|t_i - t_j|`` patches, i.e. ``|t_i - t_j| * p * hop / sample_rate`` seconds
  (``p`` frames per patch; 40 ms for p = 4 at hop 160, 16 kHz);
* along frequency, ``|f_i - f_j|`` patches, ``|f_i - f_j| * q`` mel bins (``q`` bins per
  patch), and ``|c(f_i) - c(f_j)|`` Hz, where ``c(f)`` is the patch band's centre frequency
  (see :func:`band_centres_hz`);
* on the grid, ``sqrt((t_i - t_j)^2 + (f_i - f_j)^2)`` patches.

The Hz figure is an approximation: a mel bin is a triangular filter, not a frequency, and a
16-bin band spans a range that the mel scale stretches unevenly; ``c(f)`` is the centre, on the
mel scale, of the band's filter centres, mapped back to Hz.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def hz_to_mel(hz: Any) -> Any:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel: Any) -> Any:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_bin_centres_hz(n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Centre frequency of each triangular filter: ``n_mels + 2`` points equally spaced in mel
    from ``f_min`` to ``f_max``; filter k peaks at point k + 1."""
    points = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    return mel_to_hz(points[1:-1])


def band_centres_hz(n_mels: int, f_min: float, f_max: float, bins_per_patch: int
                    ) -> np.ndarray:
    """Centre frequency of each frequency patch: the mean mel of its bins' filter centres,
    back in Hz (the filter centres are equally spaced in mel, so this is the band's middle)."""
    if n_mels % bins_per_patch:
        raise ValueError(f"{n_mels} mel bins are not a whole number of {bins_per_patch}-bin "
                         "patches")
    mels = hz_to_mel(mel_bin_centres_hz(n_mels, f_min, f_max))
    return mel_to_hz(mels.reshape(-1, bins_per_patch).mean(axis=1))


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """The token grid of one model and the front end its input came from."""

    time_patches: int
    freq_patches: int
    frames_per_patch: int
    bins_per_patch: int
    hop_length: int
    sample_rate: int
    n_mels: int
    f_min: float
    f_max: float

    @classmethod
    def from_config(cls, config: Any, front_end: Mapping[str, Any]) -> PatchGrid:
        """From a :class:`~mwmae.model.ModelConfig` and an artifact's ``front_end`` entry
        (:func:`mwmae.artifact.front_end`)."""
        t, f = config.grid_size
        if front_end.get("mel_scale", "htk") != "htk":
            raise ValueError(f"mel scale {front_end['mel_scale']!r}: only the HTK scale of "
                             "mwmae.audio is known here")
        if int(front_end["n_mels"]) != config.img_size[1]:
            raise ValueError(f"the front end makes {front_end['n_mels']} mel bins; the model "
                             f"takes {config.img_size[1]}")
        return cls(t, f, config.patch_size[0], config.patch_size[1],
                   int(front_end["hop_length"]), int(front_end["sample_rate"]),
                   int(front_end["n_mels"]), float(front_end["f_min"]), float(front_end["f_max"]))

    @property
    def num_tokens(self) -> int:
        return self.time_patches * self.freq_patches

    @property
    def ms_per_patch(self) -> float:
        """Milliseconds between the starts of two neighbouring time patches."""
        return self.frames_per_patch * self.hop_length / self.sample_rate * 1000.0

    @property
    def band_centres_hz(self) -> np.ndarray:
        return band_centres_hz(self.n_mels, self.f_min, self.f_max, self.bins_per_patch)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(time index, frequency index) of every token, ``n = t * F + f``."""
        n = np.arange(self.num_tokens)
        return n // self.freq_patches, n % self.freq_patches

    def distances(self) -> dict[str, np.ndarray]:
        """(N, N) distance matrices between tokens, one per reported unit (module docstring):
        ``patches`` (on the grid), ``time_patches``, ``time_ms``, ``freq_patches``,
        ``freq_mel_bins``, ``freq_hz``."""
        t, f = self.positions()
        dt = np.abs(t[:, None] - t[None, :]).astype(np.float64)
        df = np.abs(f[:, None] - f[None, :]).astype(np.float64)
        centres = self.band_centres_hz[f]
        return {
            "patches": np.sqrt(dt**2 + df**2),
            "time_patches": dt,
            "time_ms": dt * self.ms_per_patch,
            "freq_patches": df,
            "freq_mel_bins": df * self.bins_per_patch,
            "freq_hz": np.abs(centres[:, None] - centres[None, :]),
        }

    def describe(self) -> dict[str, Any]:
        """The grid and the unit conversions, for the report."""
        return {"time_patches": self.time_patches, "freq_patches": self.freq_patches,
                "frames_per_patch": self.frames_per_patch, "bins_per_patch": self.bins_per_patch,
                "ms_per_patch": self.ms_per_patch,
                "band_centres_hz": [round(float(c), 1) for c in self.band_centres_hz],
                "front_end": {"sample_rate": self.sample_rate, "hop_length": self.hop_length,
                              "n_mels": self.n_mels, "f_min": self.f_min, "f_max": self.f_max,
                              "mel_scale": "htk"},
                "max_distance_patches": math.hypot(self.time_patches - 1,
                                                   self.freq_patches - 1)}
