"""AdamW with the paper's schedule: linear warmup from 0, then cosine decay to 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(base_lr: float, batch_size: int, warmup_steps: int, total_steps: int
                           ) -> optax.Schedule:
    """lr(step) with peak ``base_lr * batch_size / 256``; lr(0) = 0 as in the original."""
    peak = base_lr * batch_size / 256
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=max(1, warmup_steps),
        decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)


def decay_mask(params):
    """True where weight decay applies: kernels only, not biases, norms, embeddings, tokens."""
    def keep(path, _):
        # Dict keys only: boxed (logically partitioned) leaves add an attribute step to the path.
        names = [str(p.key) for p in path if hasattr(p, "key")]
        if any(n in ("pos_embed", "decoder_pos_embed", "mask_token", "cls_token")
               or n.startswith("rel_pos_bias") for n in names):
            return False
        return names[-1] == "kernel"
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o = config.optimizer
    schedule = learning_rate_schedule(o.base_learning_rate, config.batch_size,
                                      int(o.warmup_epochs * steps_per_epoch), total_steps)
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=decay_mask if o.decay_exempt_1d else None)
    if o.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx, schedule


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
