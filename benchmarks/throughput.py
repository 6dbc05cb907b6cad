"""Inference throughput: nano-vllm's workload, batch-1 decode and 2k prefill, beside HF transformers.

    python benchmarks/throughput.py                          # GPU: Qwen3-0.6B shape, 256 requests in [100, 1024]
    python benchmarks/throughput.py --models qwen3-0.6b,qwen3-1.7b --requests 256

Random weights at the preset's shape (saved once to a temporary HF directory, so both engines load the
same checkpoint). Rows: output tokens/s on the workload (prompt and output lengths uniform in
[min_len, max_len], greedy, EOS ignored), batch-1 decode tokens/s, and prefill tokens/s at --prefill-len.
transformers runs the same workload as one left-padded batch (useful tokens counted). On a CPU the model
and the workload are scaled down, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import qwen_jax
from benchmarks.common import markdown_table, record
from infer import LLM, SamplingParams
from qwen_jax.assets import DEFAULT_MODEL


def make_checkpoint(name: str, cpu: bool, out: str):
    cfg = qwen_jax.get_preset(name)
    if cpu:
        cfg = cfg.replace(hidden_size=cfg.hidden_size // 8, intermediate_size=cfg.intermediate_size // 8,
                          num_layers=4, vocab_size=8192, head_dim=64,
                          moe_intermediate_size=cfg.moe_intermediate_size // 8 if cfg.is_moe else 0,
                          num_experts=min(cfg.num_experts, 16) if cfg.is_moe else 0)
    params = qwen_jax.init_params(cfg, jax.random.key(0), jnp.bfloat16 if not cpu else jnp.float32)
    qwen_jax.save_pretrained(out, cfg, params, tokenizer=qwen_jax.load_tokenizer(DEFAULT_MODEL), progress=False)
    return cfg


def hf_workload(path, prompts, out_lens, cpu):
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if cpu else torch.bfloat16).to(dev).eval()
    model.generation_config.eos_token_id = None
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=max(out_lens), do_sample=False, pad_token_id=0)
    return sum(out_lens) / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b")
    p.add_argument("--requests", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    p.add_argument("--min-len", type=int, default=None, help="default: 100 on GPU, 16 on CPU")
    p.add_argument("--max-len", type=int, default=None, help="default: 1024 on GPU, 64 on CPU")
    p.add_argument("--prefill-len", type=int, default=None, help="default: 2048 on GPU, 256 on CPU")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    n = args.requests or (16 if cpu else 256)
    lo, hi = args.min_len or (16 if cpu else 100), args.max_len or (64 if cpu else 1024)
    prefill_len = args.prefill_len or (256 if cpu else 2048)
    seqs = args.max_num_seqs or (16 if cpu else 256)
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            cfg = make_checkpoint(name, cpu, d)
            rng = np.random.default_rng(0)
            prompts = [rng.integers(10, cfg.vocab_size, int(k)).tolist() for k in rng.integers(lo, hi + 1, n)]
            out_lens = [int(k) for k in rng.integers(lo, hi + 1, n)]
            max_len = max(2 * hi + 8, prefill_len + 16)
            llm = LLM(d, max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=max(prefill_len, 2048))
            params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in out_lens]
            # Warm-up: a different prompt set from the same distribution compiles the step shapes (rows,
            # tokens, block-table width buckets) without seeding the prefix cache with the timed prompts.
            warm = [rng.integers(10, cfg.vocab_size, len(p_)).tolist() for p_ in prompts]
            llm.generate(warm, params, use_tqdm=False)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            workload = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
            dec = SamplingParams(temperature=0, max_tokens=128 if not cpu else 64, ignore_eos=True)
            llm.generate([rng.integers(10, cfg.vocab_size, 32).tolist()], dec, use_tqdm=False)
            t = time.perf_counter()  # a fresh prompt of the same length: same shapes, no prefix-cache hit
            o = llm.generate([rng.integers(10, cfg.vocab_size, 32).tolist()], dec, use_tqdm=False)[0]
            decode = len(o.token_ids) / (time.perf_counter() - t)
            long = [rng.integers(10, cfg.vocab_size, prefill_len).tolist()]
            pre = SamplingParams(temperature=0, max_tokens=1)
            llm.generate(long, pre, use_tqdm=False)
            t = time.perf_counter()
            llm.generate([rng.integers(10, cfg.vocab_size, prefill_len).tolist()], pre, use_tqdm=False)
            prefill = prefill_len / (time.perf_counter() - t)
            hf = None if args.no_hf else hf_workload(d, prompts, out_lens, cpu)
            label = name + (" (CPU-scaled)" if cpu else "")
            rows.append([label, f"{n} req, len [{lo}, {hi}]", workload, "n/a" if hf is None else hf,
                         "n/a" if hf is None else f"{workload / hf:.2f}x", decode, prefill])
            del llm
    table = markdown_table(["model", "workload", "qwen-jax out tok/s", "HF generate out tok/s", "ratio",
                            "batch-1 decode tok/s", f"prefill tok/s @ {prefill_len}"], rows)
    record("Inference throughput (benchmarks/throughput.py)", table,
           notes=("CPU run, scaled-down model (hidden/8, 4 layers, vocab 8192) and workload: a smoke figure, "
                  "not a target" if cpu else "random weights, bf16, greedy, EOS ignored"))


if __name__ == "__main__":
    main()
