"""Patch embedding, sin-cos position embeddings and random masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim): a sin block then a cos block, omega_i = 1/10000^(2i/E)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int]) -> np.ndarray:
    """(T*F, E) for a (time, freq) grid: first half encodes the frequency index, second the time.

    Tokens are numbered n = t * F + f, as the patch embedding flattens them.
    """
    t, f = grid_size
    freq_idx, time_idx = np.meshgrid(np.arange(f), np.arange(t))  # both (T, F)
    half = embed_dim // 2
    return np.concatenate([sincos_1d(half, freq_idx), sincos_1d(half, time_idx)], axis=1)


def with_cls_slot(table: np.ndarray, use_cls_token: bool) -> np.ndarray:
    """Prepend the zero row the class token's position takes, and a leading batch axis."""
    if use_cls_token:
        table = np.concatenate([np.zeros((1, table.shape[1]), table.dtype), table], axis=0)
    return table[None]


def patchify(imgs: jax.Array, patch_size: tuple[int, int]) -> jax.Array:
    """(B, T, F, C) -> (B, L, p*q*C) with tokens n = t*Fp + f and a patch ordered (frame, mel)."""
    b, t, f, c = imgs.shape
    p, q = patch_size
    x = imgs.reshape(b, t // p, p, f // q, q, c)
    x = jnp.einsum("nhpwqc->nhwpqc", x)
    return x.reshape(b, (t // p) * (f // q), p * q * c)


def unpatchify(x: jax.Array, patch_size: tuple[int, int], grid_size: tuple[int, int],
               in_chans: int = 1) -> jax.Array:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    p, q = patch_size
    h, w = grid_size
    x = x.reshape(b, h, w, p, q, in_chans)
    x = jnp.einsum("nhwpqc->nhpwqc", x)
    return x.reshape(b, h * p, w * q, in_chans)


def random_masking(x: jax.Array, noise: jax.Array, len_keep: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keep the ``len_keep`` tokens with the smallest noise.

    Kept tokens come in ``argsort(noise)`` order (not position order), exactly as the original,
    so windowed encoder heads see the same sequence. Returns (kept tokens, mask with 1 = removed,
    ids_restore).
    """
    ids_shuffle = jnp.argsort(noise, axis=1, stable=True)
    ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
    b, length = noise.shape
    mask = jnp.ones((b, length), jnp.float32).at[:, :len_keep].set(0.0)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return kept, mask, ids_restore
