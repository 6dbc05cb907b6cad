"""qwen-jax: Qwen3 (dense and MoE) in JAX.

    config, params = qwen_jax.load_pretrained("path/to/Qwen3-0.6B", dtype=jnp.bfloat16)
    out = qwen_jax.forward(config, params, input_ids)      # out.logits [B, T, V]
    qwen_jax.save_pretrained("out_dir", config, params)
"""

import importlib

# Names are loaded on first use (PEP 562), so that `import qwen_jax.cli` stays light: a CLI installs its
# signal handlers before jax and transformers are imported, and a Ctrl-C during those imports is clean.
_EXPORTS = {
    "qwen_jax.checkpoint": ["load_pretrained", "save_pretrained"],
    "qwen_jax.config": ["PRESETS", "Qwen3Config", "get_preset"],
    "qwen_jax.errors": ["CheckpointError", "ConfigError", "DataError", "QwenJaxError", "RequestError"],
    "qwen_jax.model": ["AttentionMeta", "ForwardOutput", "abstract_params", "forward", "init_cache", "init_params",
                       "param_logical_axes", "param_shardings"],
    "qwen_jax.sharding": ["ShardingRules", "make_mesh"],
    "qwen_jax.tokenizer": ["Tokenizer", "load_tokenizer"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'qwen_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
