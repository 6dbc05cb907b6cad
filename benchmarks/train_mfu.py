"""Training throughput and MFU at real Qwen3 shapes with random weights and random data.

    python benchmarks/train_mfu.py                          # GPU: 0.6B, 1.7B, reduced-depth 30B-A3B at seq 4096
    python benchmarks/train_mfu.py --models qwen3-0.6b --batch-size 8 --remat full
    python benchmarks/train_mfu.py --torch                  # side by side with PyTorch (CPU: the shapes below)

Each row: one jitted optimizer step (bf16 compute, fp32 master weights, AdamW, chunked cross-entropy),
timed after compilation. On a CPU the shapes are scaled down (and the table says so): the CPU has no
meaningful peak for MFU. Every table also gives the compiled step's matmul FLOPs over the model FLOPs
(train.metrics.flops_per_token): qwen_jax.hlo_flops counts every dot in the optimized program with each
loop's trip count, so padding, recomputation (remat) and masked attention blocks show as a ratio above 1.

--torch runs each model side by side with PyTorch: the transformers model loaded from the same weights,
torch.optim.AdamW with the same hyper-parameters and clipping, the same batch, steps interleaved (ours,
theirs, ours, ...) and paired medians. On a CPU its default models are `cpu-dense` (vocab 151,936, hidden
512, 8 layers) and `cpu-moe` (4 layers, 32 experts, top 4, expert width 256), batch 4 x 512, fp32.
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
from benchmarks.step_profile import CATEGORIES, split_cells, step_split
from qwen_jax import ShardingRules, get_preset, make_mesh
from qwen_jax.hlo_flops import matmul_flops
from train.metrics import flops_per_token, peak_flops
from train.config import TrainConfig
from train.optim import make_optimizer
from train.placement import put_batch
from train.trainer import init_state, make_train_step, state_shardings


MODELS_DEFAULT = "qwen3-0.6b,qwen3-1.7b,qwen3-30b-a3b-reduced"
CPU_SHAPES = {
    "cpu-dense": dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                      num_kv_heads=4, head_dim=64, tie_word_embeddings=True),
    "cpu-moe": dict(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=64, tie_word_embeddings=True, num_experts=32, num_experts_per_tok=4,
                    moe_intermediate_size=256),
}


def model_config(name: str, cpu: bool):
    if name in CPU_SHAPES:
        return qwen_jax.Qwen3Config(**CPU_SHAPES[name])
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


def flops_ratio(hlo_text: str, cfg, seq: int, tokens: int) -> str:
    """The compiled step's matmul FLOPs (loops multiplied out, qwen_jax.hlo_flops) over the model FLOPs of
    `tokens` tokens (train.metrics.flops_per_token): above 1 is work beyond the model's (padding, recompute,
    masked attention blocks). Marked with '*' where some work could not be counted (a Pallas kernel, a loop
    without a known trip count)."""
    counted = matmul_flops(hlo_text)
    partial = "*" if counted.unknown_loops or counted.opaque_calls else ""
    return f"{counted.flops / (flops_per_token(cfg, seq) * tokens):.2f}{partial}"


def torch_side_by_side(cfg, tc, state, step, batch_np, rules, iters: int):
    """-> (our median s, torch median s, median of the paired ratios torch s / our s, our step's time split,
    our compiled step's HLO text)
    over interleaved steps from the same weights and batch. Each pair is one of our steps and the torch step
    right after it, so the ratio follows the machine's speed as it drifts."""
    import tempfile
    import time

    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        qwen_jax.save_pretrained(d, cfg, state["params"], progress=False)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.train()
    if cfg.is_moe:
        model.config.output_router_logits = True  # the load-balancing loss, as ours
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(tc.b1, tc.b2), eps=tc.eps)
    tokens = torch.tensor(batch_np["tokens"][0], dtype=torch.long)
    batch = put_batch(batch_np, rules, (None, "act_batch", None))
    holder = {"state": state}

    def ours():
        holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])

    def theirs():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=tokens[:, :-1])
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        if cfg.is_moe:
            from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

            loss = loss + cfg.router_aux_loss_coef * load_balancing_loss_func(
                out.router_logits, cfg.num_experts, cfg.num_experts_per_tok)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
        opt.step()

    ours(), theirs()  # compile / warm up
    a, b = [], []
    for _ in range(iters):
        t = time.perf_counter()
        ours()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs()
        b.append(time.perf_counter() - t)
    hlo = step.lower(holder["state"], batch).compile().as_text()
    split = step_split(ours, hlo)
    return float(np.median(a)), float(np.median(b)), float(np.median(np.array(b) / np.array(a))), split, hlo


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=MODELS_DEFAULT)
    p.add_argument("--seq-len", type=int, default=None, help="default: 4096 on GPU, 256 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 4 GPU, 2 CPU)")
    p.add_argument("--remat", default="dots_no_batch")
    p.add_argument("--mesh", default="")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--torch", action="store_true", help="side by side with PyTorch (see above)")
    args = p.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    if args.torch:
        return main_torch(args, cpu)
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
        hlo = step.lower(holder["state"], batch).compile().as_text()
        split = step_split(lambda: jax.block_until_ready(run()), hlo)
        tok_s = bs * seq / seconds
        fpt = flops_per_token(cfg, seq)
        mfu = tok_s * fpt / (peak * jax.device_count()) if peak else None
        mem = jax.devices()[0].memory_stats() or {}
        rows.append([name + (" (CPU-scaled)" if cpu else ""), f"{cfg.num_params(active=True) / 1e6:,.0f}M", seq, bs,
                     seconds * 1e3, tok_s, fpt * tok_s / 1e12, "n/a" if mfu is None else f"{mfu:.1%}",
                     flops_ratio(hlo, cfg, seq, bs * seq),
                     f"{mem.get('peak_bytes_in_use', 0) / 2**30:.1f}" if mem else "n/a", *split_cells(split)])
        del state, params, holder["state"]
    table = markdown_table(["model", "active params", "seq", "batch", "step ms", "tokens/s", "TFLOP/s", "MFU",
                            "compiled / model FLOPs", "peak GiB", *CATEGORIES], rows)
    record("Training throughput (benchmarks/train_mfu.py)", table,
           notes=("CPU run with scaled-down shapes (hidden/8, 2 layers, vocab 8192): a smoke figure, not a target"
                  if cpu else f"bf16 compute, fp32 master weights, AdamW, remat={args.remat}; MFU over "
                              f"{peak / 1e12:.0f} TFLOP/s per device" if peak else ""))


def main_torch(args, cpu: bool):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    models = args.models if args.models != MODELS_DEFAULT else ("cpu-dense,cpu-moe" if cpu else "qwen3-0.6b")
    seq = args.seq_len or 512
    bs = args.batch_size or 4
    rules = ShardingRules(make_mesh(args.mesh))
    rows = []
    for name in models.split(","):
        cfg = model_config(name, cpu)
        tc = TrainConfig(steps=10**6, seq_len=seq, batch_size=bs, warmup_steps=10, compute_dtype="float32",
                         remat="none")
        params = qwen_jax.init_params(cfg, jax.random.key(0), jnp.float32, rules)
        opt = make_optimizer(tc)
        state = init_state(params, opt, 0)
        step = make_train_step(cfg, tc, opt, rules, state_shardings(state))
        rng = np.random.default_rng(0)
        batch = {"tokens": rng.integers(0, cfg.vocab_size, (1, bs, seq + 1)).astype(np.int32),
                 "segment_ids": np.ones((1, bs, seq + 1), np.int32)}
        ours, theirs, ratio, split, hlo = torch_side_by_side(cfg, tc, state, step, batch, rules, args.iters)
        rows.append([name, f"{cfg.num_params(active=True) / 1e6:,.0f}M", f"{bs} x {seq}", bs * seq / ours,
                     bs * seq / theirs, f"{ratio:.2f}x", flops_ratio(hlo, cfg, seq, bs * seq), *split_cells(split)])
    table = markdown_table(["model", "active params", "batch", "qwen-jax tok/s", "torch eager tok/s", "ratio",
                            "ours: compiled / model FLOPs", *(f"ours: {c}" for c in CATEGORIES)], rows)
    record("Training step side by side with PyTorch (benchmarks/train_mfu.py --torch)", table,
           notes=f"fp32, AdamW + clipping on both; the same weights and batch; {args.iters} interleaved steps each, "
                 f"medians; ratio: median of the paired ratios; torch {torch.__version__} eager (transformers' MoE uses its grouped_mm path); "
                 f"'ours: ...' columns: share of our step's summed op time (benchmarks/step_profile.py)")


if __name__ == "__main__":
    main()
