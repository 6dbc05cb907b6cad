"""LoRA adapters: low-rank updates W + (alpha / r) * A @ B on chosen projections, merged on export.

The model computes an adapted projection as x @ W + scale * (x @ A) @ B, so the merged weight never exists
during training. Adapter params live in their own tree with the same nesting as the base params:

    layers_<g>/attn/q_lora_a [L, D, r]        q_lora_b [L, r, Hq, Hd]     (likewise k, v)
    layers_<g>/attn/o_lora_a [L, Hq, Hd, r]   o_lora_b [L, r, D]
    layers_<g>/mlp/gate_lora_a [L, D, r]      gate_lora_b [L, r, F]       (likewise up; down is [L, F, r], [L, r, D])

A is initialised uniform(+-1/sqrt(fan_in)) and B to zero (PEFT's choice), so training starts exactly at the
base model. MoE experts and routers are never adapted: in MoE layers only the attention targets apply.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qwen_jax.errors import ConfigError

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_TARGETS = ("q", "k", "v", "o")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "LoraConfig":
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.alpha}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"unknown LoRA target(s) {bad or '(none given)'}: choose from {', '.join(LORA_TARGETS)}")
        return self

    @classmethod
    def parse_targets(cls, spec: str) -> tuple[str, ...]:
        """'all' | 'attn' | 'q,v,...' -> a tuple of target names."""
        spec = spec.strip()
        if spec == "all":
            return LORA_TARGETS
        if spec == "attn":
            return ATTN_TARGETS
        return tuple(t.strip() for t in spec.split(",") if t.strip())


def lora_a_init(key, shape, dtype=jnp.float32):
    """uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in is every dim but the last (the rank)."""
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def is_lora_key(name: str) -> bool:
    return name.endswith("_lora_a") or name.endswith("_lora_b")


def split(tree) -> tuple[dict, dict]:
    """A params tree holding both -> (base tree, adapter tree), each keeping only non-empty branches."""
    base, lora = {}, {}
    for k, v in tree.items():
        if isinstance(v, dict):
            b, a = split(v)
            if b:
                base[k] = b
            if a:
                lora[k] = a
        elif is_lora_key(k):
            lora[k] = v
        else:
            base[k] = v
    return base, lora


def combine(base, lora) -> dict:
    """Deep union of a base tree and an adapter tree (no copies)."""
    if not lora:
        return base
    out = dict(base)
    for k, v in lora.items():
        out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def merge(base, lora, lora_config: LoraConfig):
    """Base params with every adapter folded in: W + scale * A @ B, in W's dtype (for export)."""
    out = {}
    for k, v in base.items():
        if isinstance(v, dict):
            out[k] = merge(v, lora.get(k, {}), lora_config)
        elif f"{k}_lora_a" in lora:
            a, b = lora[f"{k}_lora_a"], lora[f"{k}_lora_b"]  # [L, *in, r], [L, r, *out]; W [L, *in, *out]
            L, r = a.shape[0], a.shape[-1]
            delta = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(jnp.float32),
                               b.reshape(L, r, -1).astype(jnp.float32))
            out[k] = (v.astype(jnp.float32) + lora_config.scale * delta.reshape(v.shape)).astype(v.dtype)
        else:
            out[k] = v
    return out

