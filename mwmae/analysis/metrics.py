"""What the analysis measures, as plain numpy functions of captured arrays.

Attention probabilities ``p`` have shape ``(..., B, H, N, N)``: clips, heads, queries ``i``,
keys ``j``; each row ``p_i.`` sums to 1.

* Mean attention distance of a head: ``D = mean_{b, i} sum_j p_ij d(i, j)`` for a distance
  ``d`` between token positions (:mod:`mwmae.analysis.geometry`), i.e. how far from the query
  the attended keys lie on average, as in ViT's "attention distance" (Dosovitskiy et al. 2021).
* Attention entropy of a head: ``E = mean_{b, i} -sum_j p_ij log p_ij`` in nats (0 log 0 = 0):
  0 for a query that attends to one key, ``log k`` for one that spreads evenly over ``k``.
* Similarity of two heads' outputs ``X (n, d1)`` and ``Y (n, d2)`` over the same ``n`` tokens:
  linear CKA (Kornblith et al. 2019), with ``X``, ``Y`` centred over the tokens,
  ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, equal to HSIC of the linear kernels
  ``tr(K H L H) / sqrt(tr(K H K H) tr(L H L H))`` with ``K = X X^T``, ``L = Y Y^T``.

Why CKA and not PWCCA (Morcos et al. 2018): CKA is invariant to orthogonal transforms and
isotropic scaling of either representation (changes that leave what a head encodes intact) but
not to every invertible linear map, as CCA-based measures are, which therefore cannot tell
representations apart once the dimension approaches the number of samples; it needs no SVD
truncation choice (PWCCA first keeps the directions explaining 99% of the variance, a threshold
the result depends on); and its estimate is stable with few samples (Kornblith et al. 2019).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import special


def mean_attention_distance(probs: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """``(..., B, H, N, N)`` probabilities and an ``(N, N)`` distance -> ``(..., H)``: the
    expected key distance ``sum_j p_ij d(i, j)``, averaged over clips and queries."""
    probs = np.asarray(probs)
    if probs.shape[-2:] != distance.shape:
        raise ValueError(f"probabilities over {probs.shape[-2:]} tokens, distances over "
                         f"{distance.shape}")
    b, n = probs.shape[-4], probs.shape[-1]
    # Summed in float64: a base encoder's layer is tens of millions of terms.
    total = np.einsum("...bhij,ij->...h", probs, distance.astype(np.float64))
    return total / (b * n)


def attention_entropy(probs: np.ndarray) -> np.ndarray:
    """``(..., B, H, N, N)`` -> ``(..., H)``: ``-sum_j p_ij log p_ij`` (nats), averaged over
    clips and queries."""
    probs = np.asarray(probs)
    b, n = probs.shape[-4], probs.shape[-2]
    per_query = special.entr(probs).sum(axis=-1, dtype=np.float64)  # entr(0) = 0
    return per_query.sum(axis=(-3, -1)) / (b * n)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of ``(n, d1)`` and ``(n, d2)`` features of the same ``n`` samples; NaN when
    either is constant over the samples."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (samples, dims) of the same samples; got {x.shape} "
                         f"and {y.shape}")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def cka_matrix(features: Sequence[np.ndarray]) -> np.ndarray:
    """``(G, G)`` linear CKA between every pair of ``(n, d_g)`` feature arrays."""
    g = len(features)
    out = np.eye(g)
    for a in range(g):
        for b in range(a + 1, g):
            out[a, b] = out[b, a] = linear_cka(features[a], features[b])
    return out


class CkaAccumulator:
    """Linear CKA between ``G`` groups of ``d`` features (every head of a stack), from batches
    of samples, without keeping them.

    CKA needs only the centred covariance ``C = Z_c^T Z_c`` of all groups' features side by
    side (``Z``: n x G d): block (a, b) is ``X_a^T X_b``, so CKA(a, b) =
    ``||C_ab||^2 / (||C_aa|| ||C_bb||)``. ``C`` is summed batch by batch around the first
    batch's mean (the shifted-data formula; summing raw products would cancel catastrophically
    when centring at the end).
    """

    def __init__(self, groups: int, dim: int):
        self.groups, self.dim = groups, dim
        self.count = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(groups * dim)
        self._products = np.zeros((groups * dim, groups * dim))

    def add(self, features: np.ndarray) -> None:
        """``(n, G, d)`` features of ``n`` more samples."""
        features = np.asarray(features, np.float32)
        if features.ndim != 3 or features.shape[1:] != (self.groups, self.dim):
            raise ValueError(f"features {features.shape}, expected (n, {self.groups}, "
                             f"{self.dim})")
        z = features.reshape(features.shape[0], -1)
        if self._shift is None:
            self._shift = z.mean(axis=0)
        z = z - self._shift
        self.count += z.shape[0]
        self._sum += z.sum(axis=0, dtype=np.float64)
        # float32 products of shifted values (small), summed in float64 across batches.
        self._products += z.T @ z

    def matrix(self) -> np.ndarray:
        """``(G, G)`` CKA of the samples added so far (NaN rows for a constant group)."""
        if self.count < 2:
            raise ValueError("CKA needs at least 2 samples")
        mean = self._sum / self.count
        c = self._products - self.count * np.outer(mean, mean)
        g, d = self.groups, self.dim
        cross = np.square(c).reshape(g, d, g, d).sum(axis=(1, 3))
        scale = np.sqrt(np.diag(cross))
        with np.errstate(invalid="ignore", divide="ignore"):
            return cross / np.outer(scale, scale)


def window_cka_summary(matrix: np.ndarray, layers: Sequence[int], windows: Sequence[int]
                       ) -> dict[str, float | int | None]:
    """Mean CKA over pairs of heads in different layers, split by whether their window sizes
    are equal: the paper's claim is that the first is high (heads of one window size form a
    group across decoder layers) and above the second."""
    layers, windows = np.asarray(layers), np.asarray(windows)
    other_layer = layers[:, None] != layers[None, :]
    same = other_layer & (windows[:, None] == windows[None, :])
    other = other_layer & (windows[:, None] != windows[None, :])

    def mean(mask: np.ndarray) -> float | None:
        values = matrix[mask]
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else None

    return {"same_window_other_layer": mean(same), "pairs_same_window": int(same.sum() // 2),
            "other_window_other_layer": mean(other), "pairs_other_window": int(other.sum() // 2)}


def uniform_window_probs(length: int, window: int, shift: bool = False) -> np.ndarray:
    """``(N, N)`` attention spread evenly over each query's window (the whole sequence for
    window 0), windows placed as the model places them: the baseline a head's distance and
    entropy are read against (entropy ``log w``). For shifted windows the region mask that
    splits the wrapped window is not modelled."""
    if window == 0:
        return np.full((length, length), 1.0 / length)
    if length % window:
        raise ValueError(f"window {window} does not divide {length} tokens")
    block = np.arange(length) // window
    probs = (block[:, None] == block[None, :]) / window
    s = window // 2 if shift else 0
    # The model's shifted windows: the sequence rolled by -s, cut, rolled back.
    return np.roll(probs, (s, s), axis=(0, 1)) if s else probs
