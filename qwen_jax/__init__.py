"""qwen-jax: Qwen3 (dense and MoE) in JAX.

    config, params = qwen_jax.load_pretrained("path/to/Qwen3-0.6B", dtype=jnp.bfloat16)
    out = qwen_jax.forward(config, params, input_ids)      # out.logits [B, T, V]
    qwen_jax.save_pretrained("out_dir", config, params)
"""

from qwen_jax.lazy import lazy_exports

__all__, __getattr__ = lazy_exports("qwen_jax", {
    "qwen_jax.checkpoint": ["load_pretrained", "save_pretrained"],
    "qwen_jax.config": ["PRESETS", "Qwen3Config", "get_preset"],
    "qwen_jax.errors": ["CheckpointError", "ConfigError", "DataError", "QwenJaxError", "RequestError"],
    "qwen_jax.model": ["AttentionMeta", "ForwardOutput", "abstract_params", "forward", "init_cache", "init_params",
                       "param_logical_axes", "param_shardings"],
    "qwen_jax.sharding": ["ShardingRules", "make_mesh"],
    "qwen_jax.tokenizer": ["Tokenizer", "load_tokenizer"],
}, globals())  # loaded on first use: see qwen_jax/lazy.py
