"""python -m train.grpo: reinforcement learning with GRPO, rollouts from the paged engine in the same process.

Each JSONL line is {"prompt": "..."} (used as is) or {"messages": [...]} (rendered with the checkpoint's
chat template and its generation prompt), plus any fields the rewards read (e.g. "answer" for `math`).
Each step samples --group-size completions of --prompts-per-step prompts from the engine, running on the
trainer's current weights; scores them with the rewards; normalises the rewards within each prompt's group
into advantages; and takes one optimizer step on the clipped surrogate (train/rl.py). Held-out prompts
(--eval-fraction) are scored before and after training with fixed sampling seeds.

Rewards (--reward NAME[=WEIGHT], repeatable): math, format, length (--length-budget), even_tokens, or a
Python function module:function(prompt, completion, info) -> float; and --reward-model DIR[=WEIGHT], a reward
model trained with python -m train.rm.

With no --data it runs the shipped demo: the shipped small model learns to speak of love (a user reward,
train/demo/rewards.py) in a few minutes on a CPU.

    python -m train.grpo
    python -m train.grpo --model /models/Qwen3-1.7B --data prompts.jsonl --reward math --reward format=0.1 \\
        --group-size 8 --prompts-per-step 16 --max-new-tokens 512 --lr 1e-6 --beta 0.04 --out runs/grpo
    python -m train.grpo --model /models/Qwen3-8B --data prompts.jsonl --reward my_rewards:score \\
        --lora-rank 16 --lr 2e-5 --out runs/grpo-lora
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULTS = dict(steps=200, seq_len=0, batch_size=0, lr=1e-6, warmup=0, weight_decay=0.0,
                out=os.path.join("runs", "grpo"), log_every=1, eval_every=0, save_every=50)
# The demo (no --data): the shipped 4M model, raw play openings, a reward for words of love.
DEMO = dict(steps=60, lr=2e-4, out=os.path.join("runs", "grpo-demo"), reward=["train.demo.rewards:love_words"],
            max_prompt_len=96, max_new_tokens=24, prompts_per_step=8, group_size=8, eval_fraction=0.1,
            save_every=20)


def parse_args(argv=None):
    from train import finetune as F
    from train.rl import AGGREGATIONS

    p = F.parser("python -m train.grpo", __doc__, "grpo_prompts.jsonl", DEFAULTS)
    g = p.add_argument_group("GRPO")
    g.add_argument("--reward", action="append", default=None, metavar="NAME[=WEIGHT]",
                   help="math, format, length, even_tokens or module:function; repeatable (default: math)")
    g.add_argument("--reward-model", action="append", default=None, metavar="DIR[=WEIGHT]",
                   help="a reward model (python -m train.rm's export) as a reward; repeatable, adds to --reward "
                        "(default without --reward: the reward model alone)")
    g.add_argument("--length-budget", type=int, default=512, help="completion tokens before `length` penalises")
    g.add_argument("--group-size", type=int, default=8, help="G: samples per prompt (default: %(default)s)")
    g.add_argument("--prompts-per-step", type=int, default=8, help="P: prompts per step; a step trains on P x G")
    g.add_argument("--max-prompt-len", type=int, default=256, help="longer prompts are skipped and reported")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="Qwen3 thinking mode when rendering messages (default: the template's)")
    g.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model)")
    g.add_argument("--eps-low", type=float, default=0.2, help="lower clip of the ratio")
    g.add_argument("--eps-high", type=float, default=0.2, help="upper clip (DAPO's clip-higher: 0.28)")
    g.add_argument("--no-scale-std", action="store_true", help="do not divide advantages by the group std "
                                                                "(Dr. GRPO)")
    g.add_argument("--aggregation", default="token", choices=AGGREGATIONS,
                   help="average over all completion tokens, or per completion first (default: %(default)s)")
    g.add_argument("--inner-steps", type=int, default=1,
                   help="optimizer steps on each rollout batch (mu; TRL's num_iterations); --steps counts "
                        "optimizer steps (default: %(default)s)")
    g.add_argument("--reuse-rollout-logprobs", action="store_true",
                   help="take the sampling policy's log-probs from the engine instead of recomputing them")
    g.add_argument("--moe-routing", default="own", choices=("own", "replay"),
                   help="MoE: 'replay' trains on the experts the engine chose for each token (recorded during the "
                        "rollout) instead of re-routing (default: %(default)s)")
    g.add_argument("--ref-model", default=None, help="HF checkpoint of the KL reference (default: --model)")
    return F.parse_with_demo(p, argv, DEMO)


def main(argv=None) -> int:
    from train import cli

    return cli.main(lambda: _main(parse_args(argv)))


def _held_out_reward(source, trainable, prompts, seed: int) -> float | None:
    """Mean reward of G samples of every held-out prompt, with the same sampling seeds every time."""
    if not prompts:
        return None
    outs = source.generate(trainable, prompts, [source.sampling(seed, None, i) for i in range(len(prompts))])
    return float(source.score(prompts, outs)[0].mean())


def _main(args) -> int:
    import jax

    from qwen_jax.cli import check_interrupt
    from qwen_jax.errors import ConfigError, DataError, require
    from train import cli
    from train import finetune as F
    from train import rewards as R
    from train.cli import say, train_config
    from train.chat_data import split_examples
    from train.reward_model import RewardModelReward, parse_reward_model
    from train.rl import GRPOConfig, GRPOTask
    from train.rollout import RolloutConfig, RolloutSource, read_prompts
    from train.trainer import fit

    grpo = GRPOConfig(group_size=args.group_size, beta=args.beta, eps_low=args.eps_low, eps_high=args.eps_high,
                      scale_std=not args.no_scale_std, aggregation=args.aggregation).validate()
    for flag in ("prompts_per_step", "max_prompt_len", "max_new_tokens", "length_budget", "inner_steps"):
        require(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    require(args.temperature > 0 and 0 < args.top_p <= 1,
            f"--temperature must be > 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    rm_specs = [parse_reward_model(spec) for spec in args.reward_model or []]
    rewards = R.parse_rewards(args.reward or ["math"], args.length_budget) if args.reward or not rm_specs else []
    for flag in ("--batch-size", "--seq-len"):
        if flag in args.given:
            raise ConfigError(f"{flag} is set by GRPO itself: a step trains on --prompts-per-step x --group-size "
                              f"completions of --max-prompt-len + --max-new-tokens tokens")
    args.batch_size = args.prompts_per_step * args.group_size
    args.seq_len = args.max_prompt_len + args.max_new_tokens - 1
    rules, tok, config = F.setup(args)
    require(args.seq_len + 1 <= config.max_position_embeddings,
            f"--max-prompt-len + --max-new-tokens = {args.seq_len + 1} exceeds the model's context "
            f"({config.max_position_embeddings})")
    require(args.moe_routing == "own" or config.is_moe,
            f"--moe-routing replay needs a MoE model; {args.model} is dense")
    lora = F.lora_config(args)
    paths = args.data or [os.path.join(F.DEMO_DIR, "grpo_prompts.jsonl")]
    prompts = F.read_all(paths, lambda p: read_prompts(p, tok, args.max_prompt_len, args.enable_thinking,
                                                       args.strict), say)
    train_prompts, held_prompts = split_examples(prompts, args.eval_fraction, args.seed)
    if len(train_prompts) < args.prompts_per_step:
        raise DataError(f"{len(train_prompts)} training prompts, fewer than --prompts-per-step "
                        f"{args.prompts_per_step}")
    if args.steps is None:
        args.steps = max(1, int(args.epochs * len(train_prompts)) // args.prompts_per_step * args.inner_steps)
    tc = train_config(args)
    tc.validate()
    check_interrupt()
    rm_names = [(f"model:{os.path.normpath(path)}", w) for path, w in rm_specs]
    say(f"model: {args.model} ({config.num_params() / 1e6:.1f}M params) | data: {len(train_prompts)} train / "
        f"{len(held_prompts)} held-out prompts | rewards: "
        f"{', '.join(f'{n} x {w:g}' for n, w in [(r.name, r.weight) for r in rewards] + rm_names)} | "
        f"{args.prompts_per_step} prompts x {args.group_size} samples per step | "
        f"{'LoRA rank ' + str(lora.rank) if lora else 'full fine-tuning'} | {tc.steps} steps on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    trainable, frozen = F.load_weights(args, config, lora, rules, tc.compute_dtype)
    for (path, weight), (name, _) in zip(rm_specs, rm_names):
        rewards.append(R.Reward(name, RewardModelReward(path, rules, tc.compute_dtype, progress=not args.no_progress),
                                weight))
    if grpo.beta > 0:
        frozen = F.reference_model(args, config, lora, frozen, trainable, tc.compute_dtype)
    task = GRPOTask.of(config, tc, rules, grpo, lora, window=args.max_new_tokens)
    rc = RolloutConfig(prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, reuse_logprobs=args.reuse_rollout_logprobs,
                       routing_replay=args.moe_routing == "replay", inner_steps=args.inner_steps)
    source = RolloutSource(config, tok, rules, train_prompts, rewards, task, rc, args.seq_len + 1,
                           tc.batch_size // tc.grad_accum, frozen, lora, tc.compute_dtype, out_dir=args.out)
    meta = {"command": "grpo", "model": os.path.abspath(args.model), "data": [os.path.abspath(p) for p in paths],
            "grpo": vars(grpo), "rewards": [{"name": r.name, "weight": r.weight} for r in rewards],
            "lora": vars(lora) if lora else None, "train": dict(vars(tc))}
    cli.write_run_files(args.out, config, tok, meta)
    try:
        before = _held_out_reward(source, trainable, held_prompts, args.seed)
        if before is not None:
            say(f"held-out reward at the start: {before:.4f}")
        result = fit(config, tc, trainable, source, None, args.out, rules, resume=args.resume, meta=meta,
                     progress=not args.no_progress, task=task, frozen=frozen or None)
        after = _held_out_reward(source, result["state"]["params"], held_prompts, args.seed)
    finally:
        source.close()
    summary = {"step": result["step"], "train": result["last"], "held_out_reward_start": before,
               "held_out_reward_end": after, "trainable_params": cli.num_trainable(result["state"]["params"]),
               "resumed_from": result["resumed_from"]}
    if not args.no_export:
        summary["export"] = cli.export(args.out, config, tok, result["state"]["params"], F.export_dtype(args),
                                       frozen, lora)
    return cli.finish(args.out, summary, f"done: step {result['step']}, held-out reward {cli.fmt(before, '.4f')} -> "
                                         f"{cli.fmt(after, '.4f')}"
                      + (f"; exported to {summary['export']}" if "export" in summary else ""))


if __name__ == "__main__":
    sys.exit(main())
