"""Rotary position embeddings: inverse frequencies with default / linear / dynamic / yarn scaling,
and the half-split (`rotate_half`) application used by Qwen3.

Frequencies are computed in float32 like the HF reference; cos/sin are cast to the compute dtype
before they touch q/k, again like the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import Qwen3Config


def _base_inv_freq(base: float | jax.Array, dim: int) -> jax.Array:
    """[dim/2] inverse frequencies base^(-2i/dim) in float32."""
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (jnp.asarray(base, jnp.float32) ** exponents)


def _yarn(config: Qwen3Config, dim: int) -> tuple[np.ndarray, float]:
    rope = config.rope
    base = config.rope_theta
    factor = float(rope["factor"])
    omp = rope["original_max_position_embeddings"]

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(omp / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_factor = 1 - ramp
    inv_freq = inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def inv_freq_and_scale(config: Qwen3Config, max_position: jax.Array | None = None) -> tuple[jax.Array, float]:
    """Inverse frequencies [head_dim/2] (float32) and the cos/sin scale (yarn's attention factor).

    `max_position`: the largest position in this call (traced scalar); only `dynamic` uses it, following
    HF: the NTK base grows once the sequence passes max_position_embeddings.
    """
    dim = config.head_dim
    rope = config.rope
    rtype = rope["rope_type"]
    if rtype == "default":
        return _base_inv_freq(config.rope_theta, dim), 1.0
    if rtype == "linear":
        return _base_inv_freq(config.rope_theta, dim) / jnp.float32(rope["factor"]), 1.0
    if rtype == "dynamic":
        factor = jnp.float32(rope["factor"])
        mpe = jnp.float32(config.max_position_embeddings)
        seq_len = mpe if max_position is None else jnp.maximum(jnp.asarray(max_position, jnp.float32) + 1, mpe)
        base = config.rope_theta * ((factor * seq_len / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rtype == "yarn":
        inv, scale = _yarn(config, dim)
        return jnp.asarray(inv), scale
    raise ValueError(f"unsupported rope type {rtype!r}")  # validated in the config; unreachable


def cos_sin(config: Qwen3Config, positions_BT: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] for integer positions [B, T], in `dtype`."""
    max_pos = jnp.max(positions_BT) if config.rope["rope_type"] == "dynamic" else None
    inv_freq, scale = inv_freq_and_scale(config, max_pos)
    freqs_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs_BTF, freqs_BTF], axis=-1)  # [B, T, head_dim]
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    """Rotate q or k [B, T, N, head_dim] by cos/sin [B, T, head_dim]."""
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    return x_BTNH * cos + rotate_half(x_BTNH) * sin
