"""Qwen3Config: the model's static description.

Reads HF `config.json` in both spellings:
  * transformers 4.x: `rope_theta`, `rope_scaling`, `num_experts`;
  * transformers 5.x: `rope_parameters`, `num_local_experts`.
Writes the 4.x spelling, which both 4.x and 5.x load.

The config is a frozen, hashable dataclass so it can be a static argument to `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from qwen_jax.errors import ConfigError, DataError, require
from qwen_jax.files import read_text

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
MODEL_TYPES = ("qwen3", "qwen3_moe")
# Keys of a rope dict that we keep; everything else in it is rejected so a typo does not pass silently.
_ROPE_KEYS = (
    "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "attention_factor", "mscale", "mscale_all_dim", "truncate",
)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Sorted tuple of (key, value) pairs (hashable); None for plain RoPE. See `rope` property.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    # Mixture of experts (num_experts == 0 means a dense model).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # Token ids (informational; used by the tokenizer and engine).
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    # A sequence classifier (HF *ForSequenceClassification, e.g. a reward model) has a [D, num_labels] score
    # head instead of the LM head; 0 means a causal LM.
    num_labels: int = 0

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_classifier(self) -> bool:
        return self.num_labels > 0

    @property
    def architecture(self) -> str:
        return f"Qwen3{'Moe' if self.is_moe else ''}For{'SequenceClassification' if self.is_classifier else 'CausalLM'}"

    @property
    def model_type(self) -> str:
        return "qwen3_moe" if self.is_moe else "qwen3"

    @property
    def rope(self) -> dict[str, Any]:
        """The rope scaling parameters as a dict, with `rope_type` always present."""
        if self.rope_scaling is None:
            return {"rope_type": "default"}
        return dict(self.rope_scaling)

    def is_moe_layer(self, i: int) -> bool:
        """HF's rule: a layer is sparse unless listed in mlp_only_layers or off the sparse step."""
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def layer_groups(self) -> tuple[tuple[bool, int, int], ...]:
        """Maximal runs of same-kind layers as (is_moe, start, stop); each run is one scan."""
        groups: list[tuple[bool, int, int]] = []
        for i in range(self.num_layers):
            kind = self.is_moe_layer(i)
            if groups and groups[-1][0] == kind:
                groups[-1] = (kind, groups[-1][1], i + 1)
            else:
                groups.append((kind, i, i + 1))
        return tuple(groups)

    def matmul_params(self, active: bool = True) -> int:
        """Weights that multiply activations: attention projections, router, MLP / experts (`active`: the top-k
        experts only) and the LM head. Norm scales, biases and the embedding lookup are not counted."""
        d, hd = self.hidden_size, self.head_dim
        experts = self.num_experts_per_tok if active else self.num_experts
        total = (self.num_labels if self.is_classifier else self.vocab_size) * d  # the output head
        for i in range(self.num_layers):
            total += d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
            if self.is_moe_layer(i):
                total += d * self.num_experts + experts * 3 * d * self.moe_intermediate_size
            else:
                total += 3 * d * self.intermediate_size
        return total

    def num_params(self, active: bool = False) -> int:
        """Parameter count (embeddings included); `active=True` counts only top-k experts."""
        d, hd = self.hidden_size, self.head_dim
        per_layer = 2 * hd + 2 * d  # q/k norms and the two layer norms
        if self.attention_bias:
            per_layer += hd * (self.num_heads + 2 * self.num_kv_heads) + d
        # The embedding, unless it doubles as the head (tied) that matmul_params counted.
        embed = 0 if self.tie_word_embeddings and not self.is_classifier else self.vocab_size * d
        return self.matmul_params(active) + embed + d + self.num_layers * per_layer

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"config: {name} must be a positive integer, got {v!r}")
        require(self.num_heads % self.num_kv_heads == 0,
             f"config: num_attention_heads ({self.num_heads}) must be divisible by "
             f"num_key_value_heads ({self.num_kv_heads})")
        require(self.head_dim % 2 == 0, f"config: head_dim must be even for RoPE, got {self.head_dim}")
        require(self.rms_norm_eps > 0, f"config: rms_norm_eps must be positive, got {self.rms_norm_eps}")
        require(self.rope_theta > 0, f"config: rope_theta must be positive, got {self.rope_theta}")
        require(isinstance(self.num_labels, int) and self.num_labels >= 0,
                f"config: num_labels must be a non-negative integer, got {self.num_labels!r}")
        require(self.decoder_sparse_step >= 1,
             f"config: decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.is_moe:
            require(1 <= self.num_experts_per_tok <= self.num_experts,
                 f"config: num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts "
                 f"({self.num_experts})]")
            require(self.moe_intermediate_size > 0,
                 f"config: moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
            require(not bad, f"config: mlp_only_layers has indices outside [0, {self.num_layers}): {bad}")
        if not self.is_moe or any(not self.is_moe_layer(i) for i in range(self.num_layers)):
            require(self.intermediate_size > 0,
                 f"config: intermediate_size must be positive, got {self.intermediate_size}")
        rope = self.rope
        rtype = rope.get("rope_type")
        require(rtype in ROPE_TYPES, f"config: unsupported rope type {rtype!r} (supported: {', '.join(ROPE_TYPES)})")
        unknown = sorted(set(rope) - set(_ROPE_KEYS))
        require(not unknown, f"config: unknown rope scaling keys {unknown}")
        if rtype in ("linear", "dynamic", "yarn"):
            f = rope.get("factor")
            require(isinstance(f, (int, float)) and f >= 1.0,
                 f"config: rope scaling type {rtype!r} needs factor >= 1, got {f!r}")
        if rtype == "yarn":
            omp = rope.get("original_max_position_embeddings")
            require(isinstance(omp, int) and omp > 0,
                 f"config: yarn rope scaling needs a positive original_max_position_embeddings, got {omp!r}")

    # ------------------------------------------------------------ HF round trip
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "Qwen3Config":
        """Build from a parsed HF config.json; `source` names the file in error messages."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ConfigError(f"{source}: unsupported model_type {mt!r} (supported: {', '.join(MODEL_TYPES)})")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (no official Qwen3 uses it)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act {act!r} (Qwen3 uses 'silu')")

        def get(key, default=None, required=False):
            if key in d and d[key] is not None:
                return d[key]
            if required:
                raise ConfigError(f"{source}: missing required key {key!r}")
            return default

        hidden = get("hidden_size", required=True)
        heads = get("num_attention_heads", required=True)
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
            raise ConfigError(f"{source}: hidden_size and num_attention_heads must be positive integers")
        rope_theta, rope_scaling = _parse_rope(d, source)
        is_moe = mt == "qwen3_moe"
        num_experts = (get("num_experts") or get("num_local_experts") or 0) if is_moe else 0
        eos = get("eos_token_id")
        archs = get("architectures", [])
        num_labels = 0
        if isinstance(archs, list) and any(str(a).endswith("ForSequenceClassification") for a in archs):
            labels = get("id2label")
            num_labels = len(labels) if isinstance(labels, dict) and labels else get("num_labels", 2)  # HF's default
        kw = dict(
            vocab_size=get("vocab_size", required=True),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", 0 if is_moe else None, required=not is_moe),
            num_layers=get("num_hidden_layers", required=True),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", heads),
            head_dim=get("head_dim", hidden // heads),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            bos_token_id=get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=get("pad_token_id"),
            num_labels=num_labels,
        )
        if is_moe:
            if not num_experts:
                raise ConfigError(f"{source}: qwen3_moe config needs num_experts (or num_local_experts) > 0")
            kw.update(
                num_experts=int(num_experts),
                num_experts_per_tok=get("num_experts_per_tok", required=True),
                moe_intermediate_size=get("moe_intermediate_size", required=True),
                norm_topk_prob=bool(get("norm_topk_prob", False)),
                decoder_sparse_step=get("decoder_sparse_step", 1),
                mlp_only_layers=tuple(get("mlp_only_layers", ())),
                router_aux_loss_coef=float(get("router_aux_loss_coef", 0.001)),
            )
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {str(e).removeprefix('config: ')}") from None
        except TypeError as e:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "Qwen3Config":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            d = json.loads(read_text(path))
        except DataError as e:  # a directory, no permission, bytes that are not UTF-8
            raise ConfigError(str(e)) from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{path}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')} at line "
                              f"{getattr(e, 'lineno', '?')})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=path)

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """HF config.json contents in the transformers-4 spelling (loads in 4.x and 5.x)."""
        rope = self.rope
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.is_moe:
            d.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers),
                router_aux_loss_coef=self.router_aux_loss_coef,
                output_router_logits=False,
            )
        if self.is_classifier:
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        if dtype is not None:
            d["torch_dtype"] = dtype
        return d

    def replace(self, **kw) -> "Qwen3Config":
        if "rope_scaling" in kw and isinstance(kw["rope_scaling"], dict):
            kw["rope_scaling"] = _freeze_rope(kw["rope_scaling"])
        return dataclasses.replace(self, **kw)


def _freeze_rope(rope: dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
    rope = dict(rope)
    rtype = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    rope.pop("rope_theta", None)
    if rtype == "default" and not rope:
        return None
    return tuple(sorted({"rope_type": rtype, **rope}.items()))


def _parse_rope(d: dict[str, Any], source: str) -> tuple[float, tuple | None]:
    """(rope_theta, frozen scaling) from either spelling."""
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object")
        if "rope_type" not in params and "type" not in params and all(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"{source}: per-layer-type rope_parameters are not supported by Qwen3")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object or null")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ConfigError(f"{source}: rope_theta must be a number, got {theta!r}")
    scaling = dict(scaling)
    rtype = scaling.get("rope_type") or scaling.get("type") or "default"
    if rtype == "yarn" and "original_max_position_embeddings" not in scaling:
        # HF's default (standardize_rope_params): the pretraining length is max_position_embeddings.
        scaling["original_max_position_embeddings"] = d.get("max_position_embeddings", 32768)
    return theta, _freeze_rope(scaling)


# Official Qwen3 shapes (config.json of the released checkpoints).
_DENSE = dict(vocab_size=151936, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=40960,
              rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645)
PRESETS: dict[str, Qwen3Config] = {
    "qwen3-0.6b": Qwen3Config(**_DENSE, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                              num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": Qwen3Config(**_DENSE, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                              num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-4b": Qwen3Config(**_DENSE, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                            num_kv_heads=8, tie_word_embeddings=True),
    "qwen3-8b": Qwen3Config(**_DENSE, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                            num_kv_heads=8, tie_word_embeddings=False),
    "qwen3-14b": Qwen3Config(**_DENSE, hidden_size=5120, intermediate_size=17408, num_layers=40, num_heads=40,
                             num_kv_heads=8, tie_word_embeddings=False),
    "qwen3-32b": Qwen3Config(**_DENSE, hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64,
                             num_kv_heads=8, tie_word_embeddings=False),
    "qwen3-30b-a3b": Qwen3Config(**_DENSE, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                                 num_kv_heads=4, tie_word_embeddings=False, num_experts=128,
                                 num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    "qwen3-235b-a22b": Qwen3Config(**_DENSE, hidden_size=4096, intermediate_size=12288, num_layers=94,
                                   num_heads=64, num_kv_heads=4, tie_word_embeddings=False, num_experts=128,
                                   num_experts_per_tok=8, moe_intermediate_size=1536, norm_topk_prob=True),
}


def get_preset(name: str) -> Qwen3Config:
    key = name.lower().removeprefix("qwen/")
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[key]


def num_params_str(n: int) -> str:
    e = int(math.log10(max(n, 1)) // 3)
    return f"{n / 10 ** (3 * e):.2f}{['', 'K', 'M', 'B', 'T'][e]}"
