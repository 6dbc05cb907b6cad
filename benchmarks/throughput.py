"""Inference throughput beside HF transformers, in one run.

    python benchmarks/throughput.py                 # GPU: Qwen3-0.6B shape, 256 requests, lengths U[100, 1024]
    python benchmarks/throughput.py                 # CPU: Qwen3's vocabulary, hidden 512, 8 layers; 32 requests
    python benchmarks/throughput.py --models qwen3-0.6b,qwen3-1.7b --requests 256

Random weights at the model's shape, saved once to an HF directory that every engine loads. Tables:

1. The workload (prompt and output lengths uniform in [min_len, max_len], greedy, EOS ignored), output
   tokens/s (useful tokens only) for
   - qwen-jax cold: the first `LLM.generate` of a fresh engine with no compilation cache (compiles included),
     and warm: a second prompt set with the same lengths; with the number of programs compiled;
   - transformers: padded `generate` (one left-padded batch run to the longest output), and continuous
     batching (`generate_batch`'s manager, each request with its own max_new_tokens);
   - batch-1 decode and prefill tokens/s.
2. Host overhead: a tiny model with 256 requests decoding together, one decode step per host round trip
   against multi-step windows, with and without overlap: decode steps/s, and the host's milliseconds per
   step (wall time minus the time the jitted calls take, which the script measures by blocking on each
   when there is no overlap; with overlap, what the wall time adds to that device time).
3. Time to first token of a fresh process (`python -c` that loads the model and streams one request), with
   an empty persistent compilation cache and again with the cache it filled.
"""

from __future__ import annotations

import argparse
import os
import subprocess
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
from qwen_jax.compilation_cache import Compilations

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(name: str, cpu: bool, out: str):
    cfg = qwen_jax.get_preset(name)
    if cpu:  # the engine-speed issue's CPU shape: Qwen3's vocabulary, hidden 512, 8 layers, 8 / 4 heads
        cfg = cfg.replace(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4,
                          head_dim=64, moe_intermediate_size=256 if cfg.is_moe else 0,
                          num_experts=min(cfg.num_experts, 16) if cfg.is_moe else 0)
    params = qwen_jax.init_params(cfg, jax.random.key(0), jnp.bfloat16 if not cpu else jnp.float32)
    qwen_jax.save_pretrained(out, cfg, params, tokenizer=qwen_jax.load_tokenizer(DEFAULT_MODEL), progress=False)
    return cfg


def _hf_model(path, cpu):
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if cpu else torch.bfloat16).to(dev).eval()
    model.generation_config.eos_token_id = None
    return model, dev


def hf_padded(model, dev, prompts, out_lens) -> float:
    """transformers' generate on one left-padded batch -> useful output tokens/s."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=max(out_lens), do_sample=False, pad_token_id=0)
    return sum(out_lens) / (time.perf_counter() - t)


def hf_continuous(model, prompts, out_lens) -> float:
    """transformers' continuous batching, each request with its own max_new_tokens -> output tokens/s."""
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=max(out_lens))
    t = time.perf_counter()
    produced = 0
    with model.continuous_batching_context_manager(generation_config=gc, block=True, timeout=5) as manager:
        ids = [manager.add_request(p, max_new_tokens=k) for p, k in zip(prompts, out_lens)]
        left, deadline = set(ids), time.monotonic() + 3600
        while left and time.monotonic() < deadline:
            res = manager.get_result(timeout=1)
            if res is not None and res.is_finished() and res.request_id in left:
                left.discard(res.request_id)
                produced += len(res.generated_tokens)
            elif res is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped")
    return produced / (time.perf_counter() - t)


def workload_rows(name, d, cfg, args, cpu, n, lo, hi, prefill_len, seqs):
    rng = np.random.default_rng(0)
    lens = [int(k) for k in rng.integers(lo, hi + 1, n)]
    out_lens = [int(k) for k in rng.integers(lo, hi + 1, n)]
    prompt_sets = [[rng.integers(10, cfg.vocab_size, k).tolist() for k in lens] for _ in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in out_lens]
    max_len = max(2 * hi + 8, prefill_len + 16)
    llm = LLM(d, max_model_len=max_len, max_num_seqs=seqs, max_num_batched_tokens=max(prefill_len, 2048),
              compilation_cache=False, decode_steps=args.decode_steps)
    t = time.perf_counter()
    with Compilations() as built:
        outs = llm.generate(prompt_sets[0], params, use_tqdm=False)
    cold = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    programs = built.count("_step_impl", "_decode_impl")
    # warm: every step on its own program (a cold engine runs some on larger ones until they pay: see
    # infer/programs.py), built by an untimed call that builds them all at once
    llm.engine.runner.programs.patience = 0
    llm.generate(prompt_sets[1], params, use_tqdm=False)
    t = time.perf_counter()  # new prompts, same lengths: the same shapes, no prefix-cache hit
    outs = llm.generate(prompt_sets[2], params, use_tqdm=False)
    warm = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    dec = SamplingParams(temperature=0, max_tokens=128 if not cpu else 64, ignore_eos=True)
    llm.generate([rng.integers(10, cfg.vocab_size, 32).tolist()], dec, use_tqdm=False)
    t = time.perf_counter()
    o = llm.generate([rng.integers(10, cfg.vocab_size, 32).tolist()], dec, use_tqdm=False)[0]
    decode = len(o.token_ids) / (time.perf_counter() - t)
    pre = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([rng.integers(10, cfg.vocab_size, prefill_len).tolist()], pre, use_tqdm=False)
    t = time.perf_counter()
    llm.generate([rng.integers(10, cfg.vocab_size, prefill_len).tolist()], pre, use_tqdm=False)
    prefill = prefill_len / (time.perf_counter() - t)
    llm.shutdown()
    del llm
    padded = continuous = None
    if not args.no_hf:
        model, dev = _hf_model(d, cpu)
        padded = hf_padded(model, dev, prompt_sets[2], out_lens)
        continuous = hf_continuous(model, prompt_sets[2], out_lens)
        del model
    best = max(padded or 0, continuous or 0)
    ratio = (lambda x: f"{x / best:.2f}x") if best else (lambda x: "n/a")
    na = (lambda x: "n/a" if x is None else x)
    return [name + (" (CPU shape)" if cpu else ""), f"{n} req, len [{lo}, {hi}]", cold, ratio(cold), warm,
            ratio(warm), programs, na(padded), na(continuous), decode, prefill]


def host_overhead(args) -> list[list]:
    """Tiny model, 256 sequences decoding at once: per decode step, wall and host milliseconds."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cfg = qwen_jax.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                                   num_kv_heads=1, head_dim=32, max_position_embeddings=1024)
        qwen_jax.save_pretrained(d, cfg, qwen_jax.init_params(cfg, jax.random.key(0), jnp.float32), progress=False)
        device_ms = {}  # decode steps per window -> device ms per step, from the run without overlap
        K = args.decode_steps
        for k, overlap in dict.fromkeys([(1, False), (K, False), (K, True)]):  # (1, False) once when K is 1
            llm = LLM(d, skip_tokenizer_init=True, max_model_len=256, max_num_seqs=256, max_num_batched_tokens=4096,
                      compilation_cache=False, decode_steps=k, overlap=overlap)
            runner, device = llm.engine.runner, [0.0]

            def blocked(fn):
                def call(*a, **kw):
                    t = time.perf_counter()
                    out = jax.block_until_ready(fn(*a, **kw))
                    device[0] += time.perf_counter() - t
                    return out
                return call

            if not overlap:  # blocking on each call would undo the overlap
                runner._step, runner._decode = blocked(runner._step), blocked(runner._decode)
            rng = np.random.default_rng(0)
            sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
            for i in range(2):  # the first compiles
                device[0], s0 = 0.0, llm.stats()["steps"]
                t = time.perf_counter()
                llm.generate([rng.integers(10, 512, 8).tolist() for _ in range(256)], sp, use_tqdm=False)
                wall, steps = time.perf_counter() - t, llm.stats()["steps"] - s0
            if not overlap:
                device_ms[k] = 1000 * device[0] / steps
            # with overlap the host's share is what the wall time adds to the device time measured without it
            rows.append([k, "yes" if overlap else "no", steps, steps / wall, 1000 * wall / steps,
                         1000 * wall / steps - device_ms[k]])
            llm.shutdown()
    return rows


CHILD = r"""
import sys, time
from infer import LLM, SamplingParams
llm = LLM(sys.argv[1], compilation_cache=sys.argv[2], max_model_len=256)
stream = llm.engine.add_request(list(range(10, 74)), SamplingParams(temperature=0, max_tokens=4), stream=True)
next(iter(stream))
print(time.time(), flush=True)
"""


def time_to_first_token(d) -> list[list]:
    """A fresh process: python start, imports, checkpoint load, compiles (or cache loads), first token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label in ("empty compilation cache", "cache filled by the run above"):
            t = time.time()
            r = subprocess.run([sys.executable, "-c", CHILD, d, cache], env=env, capture_output=True, text=True,
                               timeout=1800)
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-2000:])
            rows.append([label, float(r.stdout.strip().splitlines()[-1]) - t])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="qwen3-0.6b")
    p.add_argument("--requests", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    p.add_argument("--min-len", type=int, default=None, help="default: 100 on GPU, 16 on CPU")
    p.add_argument("--max-len", type=int, default=None, help="default: 1024 on GPU, 128 on CPU")
    p.add_argument("--prefill-len", type=int, default=None, help="default: 2048 on GPU, 256 on CPU")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    p.add_argument("--decode-steps", type=int, default=8, help="qwen-jax's multi-step decode window")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: workload, host, ttft")
    args = p.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # "cold" means cold
    cpu = jax.default_backend() == "cpu"
    n = args.requests or (32 if cpu else 256)
    lo, hi = args.min_len or (16 if cpu else 100), args.max_len or (128 if cpu else 1024)
    prefill_len = args.prefill_len or (256 if cpu else 2048)
    seqs = args.max_num_seqs or (32 if cpu else 256)
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as d:
        if "workload" not in skip:
            rows = []
            for name in args.models.split(","):
                cfg = make_checkpoint(name, cpu, d)
                rows.append(workload_rows(name, d, cfg, args, cpu, n, lo, hi, prefill_len, seqs))
            table = markdown_table(["model", "workload", "qwen-jax cold tok/s", "cold / best HF", "qwen-jax warm tok/s",
                                    "warm / best HF", "programs compiled", "HF generate (padded) tok/s",
                                    "HF generate_batch tok/s", "batch-1 decode tok/s",
                                    f"prefill tok/s @ {prefill_len}"], rows)
            record("Inference throughput (benchmarks/throughput.py)", table,
                   notes=(f"random weights, greedy, EOS ignored, decode_steps={args.decode_steps}; cold = first "
                          f"generate of a fresh engine without a compilation cache (programs compiled: in that "
                          f"call); warm = every step on its own program, after a call that built them all; "
                          + ("CPU: fp32, Qwen3 vocabulary, hidden 512, 8 layers" if cpu else "bf16")))
        if "host" not in skip:
            table = markdown_table(["decode steps per round trip", "overlap", "decode steps", "steps/s",
                                    "ms per step", "host ms per step"], host_overhead(args))
            record("Engine host overhead (benchmarks/throughput.py)", table,
                   notes="tiny model (vocab 512, hidden 64, 2 layers), 256 sequences decoding together, 128 "
                         "tokens each, greedy; host = wall minus the jitted calls' blocked time (with overlap: minus "
                         "that run's device time per step)")
        if "ttft" not in skip:
            if "workload" in skip:
                make_checkpoint(args.models.split(",")[0], cpu, d)
            table = markdown_table(["fresh process", "time to first token (s)"], time_to_first_token(d))
            record("Time to first token of a fresh process (benchmarks/throughput.py)", table,
                   notes=f"{args.models.split(',')[0]}{' (CPU shape)' if cpu else ''}, a 64-token prompt")


if __name__ == "__main__":
    main()
