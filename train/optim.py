"""The optimiser: AdamW with a warmup + cosine schedule, decoupled weight decay on matrices only, and
global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.config import TrainConfig


def lr_schedule(tc: TrainConfig):
    """Linear warmup to tc.lr over warmup_steps (step 0 already trains), then cosine to lr * min_lr_ratio."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.float32(max(tc.warmup_steps, 1))
        progress = jnp.clip((step - tc.warmup_steps) / max(tc.steps - tc.warmup_steps, 1), 0.0, 1.0)
        cosine = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return tc.lr * jnp.where(step < tc.warmup_steps, (step + 1) / warm, cosine)

    return schedule


def weight_decay_mask(params):
    """True where weight decay applies: every matrix except norm scales and biases."""
    def decays(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any("norm" in n or n.endswith("bias") for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=weight_decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw) if tc.clip_norm else adamw
