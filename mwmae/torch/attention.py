"""Multi-window multi-head attention, with the JAX reference's semantics.

Per head, a window size ``w`` (0: global attention over the whole sequence, no bias):

* windows are contiguous runs of ``w`` tokens of the flattened sequence (cls token first when
  there is one; patches in time-major order, token ``t * F + f``), not tiles of the
  time/frequency grid;
* inside a window, query ``i`` and key ``j`` get the bias ``table[i - j + w - 1]`` of the head's
  learned table of ``2w - 1`` entries;
* with ``shift`` (the odd blocks of a ``shifting_windows`` model), q, k and v are rolled by
  ``-(w // 2)`` along the sequence, ``-100`` (a finite value, not -inf) is added between tokens
  whose Swin-style region labels differ, and the output is rolled back. Only the last window
  of the rolled sequence holds more than one region: it is where the sequence's tail meets its
  head.

Heads that share a window size are computed together, as batched matrix products over the
windows; global heads go through ``scaled_dot_product_attention``. Scores and softmax are
float32 whatever the compute dtype, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHIFT_MASK_VALUE = -100.0


def relative_index(window: int, device: torch.device | None = None) -> torch.Tensor:
    """(w, w) indices into a table of 2w-1 entries: ``i - j + w - 1``."""
    pos = torch.arange(window, device=device)
    return pos[:, None] - pos[None, :] + window - 1


def shift_mask(length: int, window: int, device: torch.device | None = None) -> torch.Tensor:
    """(length / w, w, w) additive float32 mask of a shifted layer, in rolled positions."""
    shift = window // 2
    labels = torch.zeros(length, dtype=torch.long, device=device)
    labels[length - window:length - shift] = 1
    labels[length - shift:] = 2
    labels = labels.reshape(length // window, window)
    differ = labels[:, :, None] != labels[:, None, :]
    return torch.where(differ, SHIFT_MASK_VALUE, 0.0).to(torch.float32)


def windowed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor,
                       window: int, shift: bool) -> torch.Tensor:
    """q, k, v (B, g, L, d) of ``g`` heads sharing ``window``; tables (g, 2w-1). -> (B, g, L, d)
    in the dtype of v."""
    b, g, length, d = q.shape
    s = window // 2 if shift else 0
    if s:
        q, k, v = (t.roll(-s, dims=2) for t in (q, k, v))
    n = length // window
    qw, kw, vw = (t.reshape(b, g, n, window, d) for t in (q, k, v))
    scores = torch.matmul(qw, kw.transpose(-1, -2)).float() * d ** -0.5
    bias = tables.float()[:, relative_index(window, tables.device)]  # (g, w, w)
    scores = scores + bias[None, :, None]
    if s:
        scores = scores + shift_mask(length, window, scores.device)
    probs = scores.softmax(dim=-1).to(vw.dtype)
    out = torch.matmul(probs, vw).reshape(b, g, length, d)
    return out.roll(s, dims=2) if s else out


class MultiWindowAttention(nn.Module):
    """qkv projection, per-head windowed or global attention, output projection.

    Parameters: ``qkv`` (Linear D -> 3D, output channels ordered (q|k|v, head, head_dim)),
    ``proj`` (Linear D -> D, input channels ordered (head, head_dim)) and one table
    ``rel_pos_bias_<h>`` of 2w-1 entries per windowed head ``h`` (its index among all heads).
    """

    def __init__(self, dim: int, num_heads: int, window_sizes: tuple[int, ...],
                 shift: bool = False) -> None:
        super().__init__()
        if len(window_sizes) != num_heads:
            raise ValueError(f"{len(window_sizes)} window sizes for {num_heads} heads")
        self.num_heads = num_heads
        self.window_sizes = tuple(window_sizes)
        self.shift = shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        for h, w in enumerate(self.window_sizes):
            if w > 0:
                self.register_parameter(f"rel_pos_bias_{h}", nn.Parameter(torch.zeros(2 * w - 1)))
        groups: dict[int, list[int]] = {}
        for h, w in enumerate(self.window_sizes):
            groups.setdefault(w, []).append(h)
        self.groups = tuple((w, tuple(heads)) for w, heads in groups.items())
        order = [h for _, heads in self.groups for h in heads]
        # Group outputs come concatenated in group order; this puts the heads back.
        self.register_buffer("_restore", torch.argsort(torch.tensor(order)), persistent=False)
        self._reorder = order != sorted(order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        for h, w in enumerate(self.window_sizes):
            if w and length % w:
                raise ValueError(f"head {h}: window size {w} does not divide the sequence "
                                 f"length {length}")
        qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
        out = self.attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, L, d) q, k, v -> (B, H, L, d): every head with its own window."""
        if len(self.groups) == 1 and self.groups[0][0] == 0:
            return F.scaled_dot_product_attention(q, k, v)
        parts = []
        for w, heads in self.groups:
            idx = list(heads)
            qg, kg, vg = q[:, idx], k[:, idx], v[:, idx]
            if w == 0:
                parts.append(F.scaled_dot_product_attention(qg, kg, vg))
            else:
                tables = torch.stack([getattr(self, f"rel_pos_bias_{h}") for h in heads])
                parts.append(windowed_attention(qg, kg, vg, tables, w, self.shift))
        out = torch.cat([p.to(v.dtype) for p in parts], dim=1) if len(parts) > 1 else parts[0]
        return out[:, self._restore] if self._reorder else out
