"""GRPO step time, ours beside TRL's GRPOTrainer: rollout tokens/s, training tokens/s and the time split.

    python benchmarks/grpo.py                                   # CPU: the shipped small model
    python benchmarks/grpo.py --model qwen3-0.6b --prompts 16 --group 8 --max-new-tokens 256      # GPU
    python benchmarks/grpo.py --model qwen3-30b-a3b --layers 4 ...                                 # GPU, MoE

Both train the same checkpoint on the same prompts (the shipped GRPO demo's play openings) with the same
recipe: P prompts x G samples per step at temperature 1, up to --max-new-tokens each, the even-token reward,
one optimizer step per rollout (AdamW), token-level loss (TRL's "dapo", our "token"), no KL, float32 on a
CPU and bfloat16 compute on a GPU. Ours is `python -m train.grpo` (a subprocess; the old policy's log-probs
from the engine); TRL's is `GRPOTrainer` with transformers' `generate`. The first --warmup steps (compiling,
warming caches) are not timed; the table has medians over the rest.

With --model PRESET the weights are random at the preset's shape (with --layers, fewer layers) and the
vocabulary is the shipped tokenizer's (4,096), since no hub is reachable. TRL needs `pip install trl`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import markdown_table, record  # noqa: E402
from qwen_jax.assets import DEFAULT_MODEL  # noqa: E402

PROMPTS = os.path.join(REPO, "train", "demo", "grpo_prompts.jsonl")


def make_checkpoint(preset: str, layers: int | None, out: str) -> str:
    """Random weights at a preset's shape with the shipped tokenizer, saved as an HF directory."""
    import jax
    import jax.numpy as jnp

    import qwen_jax

    tok = qwen_jax.load_tokenizer(DEFAULT_MODEL)
    cfg = qwen_jax.get_preset(preset).replace(vocab_size=len(tok), eos_token_id=tok.eos_token_ids[0],
                                                pad_token_id=tok.pad_token_id, bos_token_id=None)
    if layers:
        cfg = cfg.replace(num_layers=layers, mlp_only_layers=())
    params = qwen_jax.init_params(cfg, jax.random.key(0), jnp.bfloat16)
    qwen_jax.save_pretrained(out, cfg, params, tokenizer=tok, progress=False)
    return out


def run_ours(model: str, a, out: str, gpu: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "train.grpo", "--model", model, "--data", PROMPTS, "--reward", "even_tokens",
           "--steps", str(a.warmup + a.steps), "--prompts-per-step", str(a.prompts), "--group-size", str(a.group),
           "--max-new-tokens", str(a.max_new_tokens), "--max-prompt-len", "96", "--lr", "1e-5", "--beta", "0",
           "--aggregation", "token", "--eval-fraction", "0", "--reuse-rollout-logprobs", "--no-export",
           "--no-progress", "--log-every", "1", "--save-every", "100000", "--out", out,
           "--dtype", "bfloat16" if gpu else "float32"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"train.grpo failed: {done.stderr.strip().splitlines()[-1]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "step_s" in r][a.warmup:]


def run_trl(model: str, a, out: str, gpu: bool) -> list[dict]:
    """TRL's GRPOTrainer on the same checkpoint and prompts -> per-step {step_s, rollout_s, tokens}."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    prompts = [json.loads(line)["prompt"] for line in open(PROMPTS)]
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if gpu:
        lm = lm.to("cuda")
    steps, gen = [], []
    generate = lm.generate

    def timed_generate(*args, **kw):  # rollout time: the wall time of transformers' generate
        t = time.perf_counter()
        result = generate(*args, **kw)
        if gpu:
            torch.cuda.synchronize()
        gen.append(time.perf_counter() - t)
        return result

    lm.generate = timed_generate

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append(time.perf_counter() - self.t)

    lengths = []

    def even_tokens(completion_ids, **kw):
        lengths.append(statistics.mean(len(c) for c in completion_ids))
        return [sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completion_ids]

    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=a.prompts * a.group, num_generations=a.group,
                     max_completion_length=a.max_new_tokens, learning_rate=1e-5, beta=0.0, loss_type="dapo",
                     max_steps=a.warmup + a.steps, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=not gpu, bf16=gpu, disable_dropout=True, seed=0, temperature=1.0)
    trainer = GRPOTrainer(model=lm, reward_funcs=even_tokens, args=cfg, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    trainer.add_callback(StepTimes())
    trainer.train()
    return [{"step_s": s, "rollout_s": g, "completion_tokens": n}
            for s, g, n in list(zip(steps, gen, lengths))[a.warmup:]]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def summary(rows: list[dict], a, prompt_tokens: float) -> list:
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    step, rollout, comp = med("step_s"), med("rollout_s"), med("completion_tokens")
    n = a.prompts * a.group
    other = step - rollout
    return [step, rollout, other, n * comp / rollout, n * (prompt_tokens + comp) / other, comp]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a preset for random weights (default: the shipped model)")
    p.add_argument("--layers", type=int, default=None, help="with --model: this many layers")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per step")
    p.add_argument("--group", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (prompts of new lengths compile new engine shapes)")
    p.add_argument("--skip-trl", action="store_true")
    a = p.parse_args()
    import jax

    gpu = jax.default_backend() == "gpu"
    tmp = tempfile.mkdtemp(prefix="grpo-bench-")
    model = make_checkpoint(a.model, a.layers, os.path.join(tmp, "model")) if a.model else DEFAULT_MODEL
    import qwen_jax

    tok = qwen_jax.load_tokenizer(model)
    prompt_tokens = statistics.mean(len(tok.encode(json.loads(line)["prompt"])) for line in open(PROMPTS))
    headers = ["trainer", "step s", "rollout s", "train s", "rollout tok/s", "train tok/s", "completion tokens"]
    rows = [["qwen-jax train.grpo", *summary(run_ours(model, a, os.path.join(tmp, "ours"), gpu), a, prompt_tokens)]]
    if not a.skip_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("error: TRL is not installed (pip install trl), or pass --skip-trl") from None
        rows.append(["TRL GRPOTrainer", *summary(run_trl(model, a, os.path.join(tmp, "trl"), gpu), a, prompt_tokens)])
        rows.append(["speed-up (TRL step s / ours)", rows[1][1] / rows[0][1], "", "", "", "", ""])
    shape = f"{a.model} ({a.layers or 'all'} layers, vocab 4,096)" if a.model else "the shipped 4M model"
    record("GRPO step: qwen-jax vs TRL", markdown_table(headers, rows),
           f"{shape}; {a.prompts} prompts x {a.group} samples, up to {a.max_new_tokens} new tokens, the even-token "
           f"reward; medians of {a.steps} steps after {a.warmup} untimed; train s = step - rollout (ours: old "
           f"log-probs from the engine; TRL: num_iterations 1 needs none); train tok/s counts prompt + completion "
           f"tokens; torch {_version('torch')}, transformers {_version('transformers')}, TRL {_version('trl')}")


if __name__ == "__main__":
    main()
