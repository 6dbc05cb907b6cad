"""Batch placement: a global numpy batch becomes global jax arrays, each device receiving only its block."""

from __future__ import annotations

import jax
import numpy as np

from qwen_jax.sharding import ShardingRules


def batch_names(x: np.ndarray, lead: int) -> tuple:
    """Logical names for a batch array: `lead` leading axes unsharded (grad-accum), then the batch axis."""
    return (None,) * lead + ("act_batch",) + (None,) * (x.ndim - lead - 1)


def put_batch(batch: dict[str, np.ndarray], rules: ShardingRules, names=None, lead: int = 0) -> dict[str, jax.Array]:
    """Global numpy batch (identical on every process) -> global arrays sharded by logical `names` (default:
    the batch axis after `lead` leading axes); each device receives only its own block, whatever the mesh."""
    out = {}
    for k, x in batch.items():
        nm = names if names is not None else batch_names(x, lead)
        out[k] = jax.make_array_from_callback(x.shape, rules.sharding(nm, x.shape), lambda idx, x=x: x[idx])
    return out
