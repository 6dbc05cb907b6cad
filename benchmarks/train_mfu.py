"""Training throughput and MFU at real Qwen3 shapes with random weights and random data.

    python benchmarks/train_mfu.py                          # GPU: 0.6B, 1.7B, reduced-depth 30B-A3B at seq 4096
    python benchmarks/train_mfu.py --models qwen3-0.6b --batch-size 8 --remat full

Each row: one jitted optimizer step (bf16 compute, fp32 master weights, AdamW, chunked cross-entropy),
timed after compilation. On a CPU the shapes are scaled down (and the table says so): the CPU has no
meaningful peak for MFU.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import qwen_jax
from benchmarks.common import markdown_table, record, time_fn
from qwen_jax import ShardingRules, get_preset, make_mesh
from train.metrics import flops_per_token, peak_flops
from train.config import TrainConfig
from train.optim import make_optimizer
from train.placement import put_batch
from train.trainer import init_state, make_train_step, state_shardings


def model_config(name: str, cpu: bool):
    reduced = name.endswith("-reduced")
    cfg = get_preset(name.removesuffix("-reduced"))
    if reduced:  # same layer shapes, fewer layers, so it fits one GPU
        cfg = cfg.replace(num_layers=8 if cfg.is_moe else 4)
    if cpu:  # a scaled-down shape with the same structure
        cfg = cfg.replace(hidden_size=cfg.hidden_size // 8, intermediate_size=max(cfg.intermediate_size // 8, 8),
                          num_layers=2, vocab_size=8192, head_dim=64,
                          moe_intermediate_size=cfg.moe_intermediate_size // 8 if cfg.is_moe else 0,
                          num_experts=min(cfg.num_experts, 16) if cfg.is_moe else 0)
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b,qwen3-1.7b,qwen3-30b-a3b-reduced")
    p.add_argument("--seq-len", type=int, default=None, help="default: 4096 on GPU, 256 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 4 GPU, 2 CPU)")
    p.add_argument("--remat", default="dots_no_batch")
    p.add_argument("--mesh", default="")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    seq = args.seq_len or (256 if cpu else 4096)
    bs = args.batch_size or (2 if cpu else 4)
    rules = ShardingRules(make_mesh(args.mesh))
    peak = peak_flops()
    rows = []
    for name in args.models.split(","):
        cfg = model_config(name, cpu)
        tc = TrainConfig(steps=10**6, seq_len=seq, batch_size=bs, warmup_steps=10,
                         compute_dtype="float32" if cpu else "bfloat16", remat=args.remat)
        params = qwen_jax.init_params(cfg, jax.random.key(0), jnp.float32, rules)
        opt = make_optimizer(tc)
        state = init_state(params, opt, 0)
        step = make_train_step(cfg, tc, opt, rules, state_shardings(state))
        rng = np.random.default_rng(0)
        batch = put_batch({"tokens": rng.integers(0, cfg.vocab_size, (1, bs, seq + 1)).astype(np.int32),
                           "segment_ids": np.ones((1, bs, seq + 1), np.int32)}, rules, (None, "act_batch", None))
        holder = {"state": state}

        def run():
            holder["state"], m = step(holder["state"], batch)
            return m["loss"]

        seconds = time_fn(run, warmup=2, iters=args.iters)
        tok_s = bs * seq / seconds
        fpt = flops_per_token(cfg, seq)
        mfu = tok_s * fpt / (peak * jax.device_count()) if peak else None
        mem = jax.devices()[0].memory_stats() or {}
        rows.append([name + (" (CPU-scaled)" if cpu else ""), f"{cfg.num_params(active=True) / 1e6:,.0f}M", seq, bs,
                     seconds * 1e3, tok_s, fpt * tok_s / 1e12, "n/a" if mfu is None else f"{mfu:.1%}",
                     f"{mem.get('peak_bytes_in_use', 0) / 2**30:.1f}" if mem else "n/a"])
        del state, params, holder["state"]
    table = markdown_table(["model", "active params", "seq", "batch", "step ms", "tokens/s", "TFLOP/s", "MFU",
                            "peak GiB"], rows)
    record("Training throughput (benchmarks/train_mfu.py)", table,
           notes=("CPU run with scaled-down shapes (hidden/8, 2 layers, vocab 8192): a smoke figure, not a target"
                  if cpu else f"bf16 compute, fp32 master weights, AdamW, remat={args.remat}; MFU over "
                              f"{peak / 1e12:.0f} TFLOP/s per device" if peak else ""))


if __name__ == "__main__":
    main()
