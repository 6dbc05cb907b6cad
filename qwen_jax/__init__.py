"""qwen-jax: Qwen3 (dense and MoE) in JAX.

    config, params = qwen_jax.load_pretrained("path/to/Qwen3-0.6B", dtype=jnp.bfloat16)
    out = qwen_jax.forward(config, params, input_ids)      # out.logits [B, T, V]
    qwen_jax.save_pretrained("out_dir", config, params)
"""

from qwen_jax.checkpoint import load_pretrained, save_pretrained
from qwen_jax.config import PRESETS, Qwen3Config, get_preset
from qwen_jax.errors import CheckpointError, ConfigError, DataError, QwenJaxError, RequestError
from qwen_jax.model import (
    AttentionMeta,
    ForwardOutput,
    abstract_params,
    forward,
    init_cache,
    init_params,
    param_logical_axes,
    param_shardings,
)
from qwen_jax.sharding import ShardingRules, make_mesh
from qwen_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "AttentionMeta", "CheckpointError", "ConfigError", "DataError", "ForwardOutput", "PRESETS", "Qwen3Config",
    "QwenJaxError", "RequestError", "ShardingRules", "Tokenizer", "abstract_params", "forward", "get_preset",
    "init_cache", "init_params", "load_pretrained", "load_tokenizer", "make_mesh", "param_logical_axes",
    "param_shardings", "save_pretrained",
]
