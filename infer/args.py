"""Engine flags shared by `python -m infer.generate` and `python -m infer.serve`, and the LLM they build."""

from __future__ import annotations

import argparse
import os
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: the shipped small model)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model's)")
    g = p.add_argument_group("engine")
    g.add_argument("--tensor-parallel", type=int, default=1)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=1024)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--decode-steps", type=int, default=8,
                   help="decode steps run on device per host round trip (1: one at a time)")
    g.add_argument("--no-overlap", action="store_true",
                   help="read each decode window before dispatching the next (default: the next one is queued first)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (default: from memory)")
    g.add_argument("--kv-cache-memory-fraction", type=float, default=0.9, help="GPU: share of free memory for KV")
    g.add_argument("--kv-cache-gb", type=float, default=1.0, help="CPU: KV pool budget in GiB")
    g.add_argument("--dtype", default=None, help="compute dtype (default: bf16 on GPU, the checkpoint's on CPU)")
    g.add_argument("--attn-impl", default="auto", choices=["auto", "pallas", "cudnn", "xla"])
    g.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache (default: $QWEN_JAX_CACHE_DIR or ~/.cache/qwen-jax/xla)")
    g.add_argument("--no-compilation-cache", action="store_true", help="do not cache compiled programs on disk")
    g.add_argument("--warmup", type=int, nargs="?", const=2048, default=None, metavar="TOKENS",
                   help="compile at start-up the programs sequences of up to TOKENS (default 2048, at most "
                        "--max-model-len) meet, so no request waits for a compilation")


def check_engine_args(args) -> None:
    """Range-check the engine flags (before any file is written or model loaded)."""
    from qwen_jax.errors import require

    for flag in ("tensor_parallel", "max_num_seqs", "max_num_batched_tokens", "block_size", "decode_steps"):
        value = getattr(args, flag)
        require(value >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    require(args.warmup is None or args.warmup >= 2, f"--warmup must be >= 2 tokens, got {args.warmup}")
    require(args.max_model_len is None or args.max_model_len >= 2,
            f"--max-model-len must be >= 2, got {args.max_model_len}")
    require(args.num_kv_blocks is None or args.num_kv_blocks >= 1,
            f"--num-kv-blocks must be >= 1, got {args.num_kv_blocks}")
    require(args.kv_cache_gb > 0, f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")
    require(0 < args.kv_cache_memory_fraction <= 1,
            f"--kv-cache-memory-fraction must be in (0, 1], got {args.kv_cache_memory_fraction}")
    require(args.dtype in (None, "float32", "bfloat16", "float16"),
            f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    for flag in ("model", "tokenizer"):
        path = getattr(args, flag)
        require(path is None or os.path.isdir(path),
                f"--{flag} {path}: not a directory (an HF checkpoint directory is expected)")


def build_llm(args, **extra):
    """The LLM from parsed engine flags (says so when it falls back to the shipped model)."""
    from infer.llm import LLM
    from qwen_jax.assets import DEFAULT_MODEL

    check_engine_args(args)
    if args.model is None:
        print(f"(no --model: using the shipped small model {os.path.relpath(DEFAULT_MODEL)}, a 4M-parameter Qwen3 "
              f"trained on Shakespeare)", file=sys.stderr)
    return LLM(args.model, tokenizer=args.tokenizer, tensor_parallel=args.tensor_parallel,
               max_model_len=args.max_model_len, kv_cache_memory_fraction=args.kv_cache_memory_fraction,
               num_kv_blocks=args.num_kv_blocks, kv_cache_gb=args.kv_cache_gb, block_size=args.block_size,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, dtype=args.dtype,
               attn_impl=args.attn_impl, decode_steps=args.decode_steps, overlap=not args.no_overlap,
               warmup=args.warmup or False,
               compilation_cache=False if args.no_compilation_cache else (args.compilation_cache or True), **extra)
