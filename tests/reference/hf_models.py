"""Tiny random Qwen3 / Qwen3-MoE models built with transformers: the PyTorch reference for tests.

Weights are redrawn with a large std (matrices ~ N(0, 1/fan_in) * gain, norms ~ 1 + N(0, 0.3)) so that
a wrong transpose, norm order or rope detail moves the logits by far more than the tolerance.
Nothing is downloaded.
"""

from __future__ import annotations

import math
import os

import torch

DENSE_BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)
MOE_BASE = dict(DENSE_BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])


def hf_config(**overrides):
    from transformers import Qwen3Config, Qwen3MoeConfig

    moe = "num_experts" in overrides or overrides.pop("moe", False)
    kw = dict(MOE_BASE if moe else DENSE_BASE)
    kw.update(overrides)
    cls = Qwen3MoeConfig if moe else Qwen3Config
    return cls(**kw, attn_implementation="eager")


@torch.no_grad()
def randomize(model, seed: int = 0, gain: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name:
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif p.ndim == 1:  # biases
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            fan_in = p.shape[-1]
            p.copy_(gain * torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def build(tmp_path, seed: int = 0, dtype=torch.float32, classifier: bool = False, **overrides):
    """Save a random model to tmp_path; return (hf_model in eval mode, directory). `classifier`: a
    *ForSequenceClassification with one label (a reward model), padded with token 0."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if classifier:
        overrides = {"num_labels": 1, "pad_token_id": 0, **overrides}
    cfg = hf_config(**overrides)
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32)
    randomize(model, seed)
    model = model.to(dtype).eval()
    path = os.fspath(tmp_path)
    model.save_pretrained(path)
    return model, path


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "To be, or not to be, that is the question.",
    "JAX is a library for array-oriented numerical computation.",
    "user assistant system tool think answer question",
]


def build_tokenizer(path, chat_template: str | None = None):
    """A small byte-level BPE tokenizer with Qwen's special tokens, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(os.fspath(path))
    return fast


def qwen3_chat_template() -> str:
    from qwen_jax.tokenizer import qwen3_chat_template as template

    return template()


def checkpoint_layout(named: dict) -> dict:
    """transformers-5 in-memory tensors -> the per-expert names and layout of a saved checkpoint.

    Experts live fused in memory (mlp.experts.gate_up_proj [E, 2F, D], mlp.experts.down_proj [E, D, F])."""
    out = {}
    for name, x in named.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            F = x.shape[1] // 2
            for e in range(x.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = x[e, :F]
                out[f"{prefix}{e}.up_proj.weight"] = x[e, F:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(x.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = x[e]
        else:
            out[name] = x
    return out
