"""Sequence classifiers (HF `Qwen3ForSequenceClassification`): reward models.

A classifier is the Qwen3 body with a `score` head [D, num_labels] in place of the LM head
(`config.num_labels > 0`); `load_pretrained` and `save_pretrained` read and write it like any checkpoint.
HF scores every position and reports, for each row, the scores at the rightmost token that is not the pad
token (so right and left padding both work), or at the last position when the config has no pad token.
Here the head runs at that one position only: the same numbers, without a [B, T, L] intermediate.

    config, params = qwen_jax.load_pretrained("runs/rm/hf")
    scores_BL = sequence_scores(config, params, tokens_BT)       # a reward model: scores_BL[:, 0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError
from qwen_jax.sharding import ShardingRules


def as_classifier(config: Qwen3Config, num_labels: int = 1, pad_token_id: int | None = None) -> Qwen3Config:
    """The config of a classifier on `config`'s body (a reward model: num_labels=1). The pad token decides
    which position is scored, so a classifier always gets one (default: the config's own)."""
    pad = config.pad_token_id if config.pad_token_id is not None else pad_token_id
    if pad is None:
        raise ConfigError("a sequence classifier needs a pad token id: the config and the tokenizer have none")
    return config.replace(num_labels=num_labels, pad_token_id=pad)


def pool_index(config: Qwen3Config, tokens_BT: jax.Array) -> jax.Array:
    """HF's pooling position: the rightmost non-pad token of each row (0 for an all-pad row), or the last
    position without a pad token. [B, T] -> [B] int32."""
    B, T = tokens_BT.shape
    if config.pad_token_id is None:
        return jnp.full((B,), T - 1, jnp.int32)
    idx = jnp.arange(T, dtype=jnp.int32)
    return jnp.argmax(idx * (tokens_BT != config.pad_token_id), axis=-1).astype(jnp.int32)


def pooled_scores(config: Qwen3Config, params, tokens_BT: jax.Array, hidden_BTD: jax.Array) -> jax.Array:
    """The score head at each row's pooling position: hidden [B, T, D] (after the final norm) -> [B, L] f32."""
    idx = pool_index(config, tokens_BT)
    h_BD = jnp.take_along_axis(hidden_BTD, idx[:, None, None], axis=1)[:, 0]
    return jnp.einsum("BD,DL->BL", h_BD, params["score"].astype(h_BD.dtype), preferred_element_type=jnp.float32)


def sequence_scores(config: Qwen3Config, params, tokens_BT: jax.Array, segment_ids: jax.Array | None = None, *,
                    dtype=None, rules: ShardingRules | None = None) -> jax.Array:
    """Scores of whole sequences: tokens [B, T] (padded with the pad token) -> [B, num_labels] float32."""
    from qwen_jax.model import forward

    if not config.is_classifier:
        raise ConfigError(f"not a sequence classifier: the config's architecture is {config.architecture}")
    out = forward(config, params, tokens_BT, segment_ids=segment_ids, dtype=dtype, rules=rules, return_hidden=True)
    return pooled_scores(config, params, tokens_BT, out.hidden)


def init_score_head(config: Qwen3Config, key: jax.Array, dtype=jnp.float32,
                    rules: ShardingRules | None = None) -> jax.Array:
    """A fresh score head [D, L], normal(0, 0.02) as HF initialises a new `score` layer, in its sharding."""
    shape = (config.hidden_size, config.num_labels)

    def init():
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    if rules is None:
        return jax.jit(init)()
    return jax.jit(init, out_shardings=rules.sharding(("embed", None), shape))()
