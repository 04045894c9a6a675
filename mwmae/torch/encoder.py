"""The MW-MAE / MAE encoder as a PyTorch module: what the JAX serving path computes.

Input: normalised log-mel (B, T, F, C) as the JAX model takes it ((B, T, F) for one channel).
Patches of p frames x q mel bins become tokens ``n = t * (F / q) + f`` (time-major), each plus
its position embedding; a cls token (with its own position slot) goes first when the config
has one; pre-norm transformer blocks with multi-window attention; a final LayerNorm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mwmae.torch.attention import MultiWindowAttention
from mwmae.torch.config import EncoderConfig
from mwmae.torch.weights import state_dict_from_params

LN_EPS = 1e-6  # flax LayerNorm's, not torch's 1e-5


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): sines then cosines at frequencies 10000^(-2i/E)."""
    freqs = 1.0 / 10000.0 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = positions.reshape(-1, 1).astype(np.float64) * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int]) -> np.ndarray:
    """(T*F, E) for the token grid: the first half encodes the frequency index, the second the
    time index (the original's order)."""
    t, f = grid_size
    time_idx, freq_idx = np.divmod(np.arange(t * f), f)
    half = embed_dim // 2
    return np.concatenate([sincos_1d(half, freq_idx), sincos_1d(half, time_idx)], axis=1)


class PatchEmbed(nn.Module):
    """Non-overlapping (p, q) patches -> D channels: a strided convolution's weights (D, C, p,
    q), applied as one matrix product. On GPUs PyTorch lets cuDNN convolutions use TF32 by
    default, which would cost float32 parity; matrix products keep full precision by default."""

    def __init__(self, in_chans: int, dim: int, patch_size: tuple[int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size
        conv = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.weight, self.bias = conv.weight, conv.bias  # its init too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F, C) -> (B, T/p * F/q, D), tokens in time-major order."""
        b, t, f, c = x.shape
        p, q = self.patch_size
        x = x.reshape(b, t // p, p, f // q, q, c).permute(0, 1, 3, 5, 2, 4)  # (.., C, p, q)
        return F.linear(x.reshape(b, (t // p) * (f // q), c * p * q),
                        self.weight.reshape(self.weight.shape[0], -1), self.bias)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, window_sizes: tuple[int, ...], shift: bool,
                 mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MultiWindowAttention(dim, num_heads, window_sizes, shift)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """Patch embedding, position embeddings, (cls token), blocks, final norm.

    ``forward`` gives the serving features (``mwmae.Model.features``): (B, T/p, (F/q) * D)
    float32, feature ``f * D + d`` for frequency patch ``f``. ``tokens`` gives the normalised
    encoder outputs per token, (B, [1 +] T/p * F/q, D), cls first when the config has one.

    Built from a config alone, the position embeddings are the sin-cos table the JAX model
    starts from and the rest is PyTorch's default init; :meth:`from_params` loads trained
    weights (see :mod:`mwmae.torch.weights` for the names).
    """

    def __init__(self, config: EncoderConfig | Mapping[str, Any] | Any) -> None:
        super().__init__()
        c = self.config = EncoderConfig.coerce(config)
        self.patch_embed = PatchEmbed(c.in_chans, c.embed_dim, c.patch_size)
        table = sincos_2d(c.embed_dim, c.grid_size)
        if c.use_cls_token:  # the cls token's slot starts at zero, as in the JAX model
            table = np.concatenate([np.zeros((1, c.embed_dim), np.float32), table])
        # A parameter, not a buffer: the JAX model trains its position embeddings too.
        self.pos_embed = nn.Parameter(torch.from_numpy(table)[None])
        if c.use_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.blocks = nn.ModuleList(
            Block(c.embed_dim, c.num_heads, c.window_sizes,
                  shift=c.shifting_windows and i % 2 == 1, mlp_ratio=c.mlp_ratio)
            for i in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.embed_dim, eps=LN_EPS)

    @classmethod
    def from_params(cls, config: EncoderConfig | Mapping[str, Any] | Any,
                    params: Mapping[str, Any]) -> Encoder:
        """An encoder with the JAX encoder's weights: ``params`` maps each flax parameter path
        joined with "/" to its array (numpy, torch or JAX), stacked layers as stored. Every
        missing, unexpected or mis-shaped tensor is reported in one :class:`WeightsError`."""
        model = cls(config)
        model.load_state_dict(state_dict_from_params(model.config, params), strict=True)
        return model.eval()

    def _check_input(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(x)
        c = self.config
        if x.ndim == 3 and c.in_chans == 1:
            x = x[..., None]
        if x.ndim != 4 or tuple(x.shape[1:]) != c.input_shape:
            raise ValueError(f"input has shape {tuple(x.shape)}; expected (batch, "
                             f"{', '.join(map(str, c.input_shape))}) = (batch, frames, mel "
                             "bins, channels) of normalised log-mel")
        if not x.is_floating_point():
            raise ValueError(f"input dtype is {x.dtype}; expected a floating dtype")
        return x.to(self.pos_embed.device, self.patch_embed.weight.dtype)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F, C) -> (B, L, D) patch tokens with their position embeddings."""
        h = self.patch_embed(self._check_input(x))
        return h + self.pos_embed[:, self.config.num_extra_tokens:].to(h.dtype)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F, C) -> (B, [1 +] L, D): normalised encoder outputs, cls first if any."""
        h = self.embed(x)
        if self.config.use_cls_token:
            cls = (self.cls_token + self.pos_embed[:, :1]).to(h.dtype)
            h = torch.cat([cls.expand(h.shape[0], -1, -1), h], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.encoder_norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F, C) -> (B, T/p, (F/q) * D) float32 features, as ``mwmae.Model.features``."""
        c = self.config
        h = self.tokens(x)[:, c.num_extra_tokens:]
        return h.reshape(h.shape[0], c.grid_size[0], c.feature_dim).float()
