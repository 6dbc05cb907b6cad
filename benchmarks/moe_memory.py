"""Peak memory of a forward and a greedy generation at Qwen3-30B-A3B's real widths (hidden 2048, 128
experts of width 768, top 8, vocab 151,936), 2 layers, fp32, against the size of the weights; side by side
with transformers on the same checkpoint.

    python benchmarks/moe_memory.py                  # writes a random checkpoint to a temporary directory
    python benchmarks/moe_memory.py --layers 4 --tokens 32

Each side runs in a fresh process that loads the checkpoint, runs one forward over a 128-token prompt
and a greedy generation of --tokens tokens, and reports its peak resident memory (ru_maxrss). The target
(issue: MoE at the cost of its active experts) is a peak below 2x the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROMPT_LEN = 128


def _peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_checkpoint(path: str, layers: int) -> int:
    """A random checkpoint at 30B-A3B widths -> its weight bytes."""
    import jax
    import jax.numpy as jnp

    import qwen_jax

    cfg = qwen_jax.get_preset("qwen3-30b-a3b").replace(num_layers=layers)
    params = qwen_jax.init_params(cfg, jax.random.key(0), jnp.float32)
    qwen_jax.save_pretrained(path, cfg, params, progress=False)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def run_ours(path: str, tokens: int) -> dict:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import qwen_jax
    from infer.llm import LLM
    from infer.sampling import SamplingParams
    from kernels.util import cdiv

    t = time.perf_counter()
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", max_num_seqs=1, max_model_len=PROMPT_LEN + tokens,
              num_kv_blocks=cdiv(PROMPT_LEN + tokens, 16) + 1, compilation_cache=False)
    runner = llm.engine.runner
    prompt = np.random.default_rng(0).integers(0, runner.config.vocab_size, PROMPT_LEN).tolist()
    logits = jax.jit(lambda p, x: qwen_jax.forward(runner.config, p, x).logits)(
        runner.params, jnp.asarray([prompt], jnp.int32))
    jax.block_until_ready(logits)
    del logits
    out = llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)
    llm.shutdown()
    return {"peak_gib": _peak_gib(), "tokens": len(out[0].outputs[0].token_ids), "seconds": time.perf_counter() - t}


def run_transformers(path: str, tokens: int) -> dict:
    import time

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt = torch.tensor([np.random.default_rng(0).integers(0, model.config.vocab_size, PROMPT_LEN).tolist()])
    with torch.no_grad():
        model(prompt)
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return {"peak_gib": _peak_gib(), "tokens": out.shape[1] - PROMPT_LEN, "seconds": time.perf_counter() - t}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to generate")
    p.add_argument("--side", choices=["ours", "transformers"], help=argparse.SUPPRESS)  # a child process
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        fn = run_ours if args.side == "ours" else run_transformers
        print(json.dumps(fn(args.checkpoint, args.tokens)))
        return
    from benchmarks.common import markdown_table, record

    with tempfile.TemporaryDirectory() as d:
        here = os.path.abspath(__file__)
        weights = json.loads(subprocess.run(
            [sys.executable, "-c", f"import sys, json; sys.path.insert(0, {os.path.dirname(here)!r}); "
                                   f"import moe_memory; print(json.dumps(moe_memory.write_checkpoint({d!r}, "
                                   f"{args.layers})))"], check=True, capture_output=True, text=True).stdout)
        rows = []
        for side in ("ours", "transformers"):
            res = subprocess.run([sys.executable, here, "--side", side, "--checkpoint", d, "--tokens",
                                  str(args.tokens)], capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"{side} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append([{"ours": "qwen-jax", "transformers": "transformers (torch eager)"}[side],
                         weights / 2**30, r["peak_gib"], f"{r['peak_gib'] * 2**30 / weights:.2f}x", r["tokens"],
                         r["seconds"]])
    table = markdown_table(["engine", "weights GiB", "peak RSS GiB", "peak / weights", "tokens", "seconds"], rows)
    record("MoE memory at Qwen3-30B-A3B widths (benchmarks/moe_memory.py)", table,
           notes=f"{args.layers} layers, 128 experts top 8, fp32; one {PROMPT_LEN}-token forward + greedy "
                 f"generation of {args.tokens} tokens in a fresh process per engine; target: peak < 2x weights")


if __name__ == "__main__":
    main()
