"""python -m train.rm: train a reward model on preference pairs (the pairwise Bradley-Terry loss).

The data is DPO's: each JSONL line is {"prompt": ..., "chosen": ..., "rejected": ...} (strings or message
lists), rendered with the checkpoint's chat template. The model is --model's body with a one-score head (a
causal LM's LM head is dropped and a fresh score head added; a reward model continues as it is), scored at
the last token of each conversation. Held-out pair accuracy and margin are logged. The export (out/hf) is an
HF `Qwen3ForSequenceClassification` directory: transformers loads it with
AutoModelForSequenceClassification, and train.grpo uses it with --reward-model.

With no --data it runs the shipped demo pairs (real replies over word-shuffled ones) on the shipped small
model in about a minute on a CPU.

    python -m train.rm
    python -m train.rm --model runs/sft/hf --data prefs.jsonl --lr 1e-5 --batch-size 32 --out runs/rm
    python -m train.grpo --model runs/sft/hf --data prompts.jsonl --reward-model runs/rm/hf --out runs/grpo
"""

from __future__ import annotations

import os
import sys

DEFAULTS = dict(steps=None, seq_len=2048, batch_size=16, lr=1e-5, warmup=10, weight_decay=0.0,
                out=os.path.join("runs", "rm"), log_every=10, eval_every=0, save_every=500)
DEMO = dict(steps=40, seq_len=256, lr=3e-4, warmup=4, out=os.path.join("runs", "rm-demo"), eval_every=10)


def parse_args(argv=None):
    from train import finetune as F

    p = F.parser("python -m train.rm", __doc__, "dpo_pairs.jsonl", DEFAULTS)
    g = p.add_argument_group("reward model")
    g.add_argument("--center-rewards", type=float, default=0.0,
                   help="coefficient of (r_chosen + r_rejected)^2, keeping scores near 0 (default: %(default)s)")
    return F.parse_with_demo(p, argv, DEMO)


def main(argv=None) -> int:
    from train import cli

    return cli.main(lambda: _main(parse_args(argv)))


def _main(args) -> int:
    import jax
    import numpy as np

    from qwen_jax import lora as lora_lib
    from qwen_jax.cli import check_interrupt
    from qwen_jax.errors import require
    from train import chat_data as C
    from train import cli
    from train import finetune as F
    from train.cli import say, train_config
    from train.data import RowDataset
    from train.reward_model import RewardModelTask, load_reward_model_weights, reward_model_config
    from train.trainer import evaluate, fit, make_eval_step

    require(args.center_rewards >= 0, f"--center-rewards must be >= 0, got {args.center_rewards}")
    rules, tok, config = F.setup(args)
    rm_config = reward_model_config(config, tok)
    lora = F.lora_config(args)
    paths, pairs, args.seq_len = F.read_pairs(args, tok, args.seq_len, say)  # padded only as far as needed
    train_p, eval_p = C.split_examples(pairs, args.eval_fraction, args.seed)

    def dataset(ps):
        t, s, _ = C.pad_pairs(ps, args.seq_len, rm_config.pad_token_id)
        return RowDataset({"tokens": t, "segment_ids": s, "weight": np.ones(len(ps), np.float32)})

    train_ds, eval_ds = dataset(train_p), (dataset(eval_p) if eval_p else None)
    F.resolve_steps(args, len(train_ds))
    tc = train_config(args)
    tc.validate()
    train_ds.check_batch(tc.batch_size)
    check_interrupt()
    say(f"model: {args.model} ({config.num_params() / 1e6:.1f}M params) -> {rm_config.architecture} | data: "
        f"{len(train_p)} train / {len(eval_p)} held-out pairs, sequences of {args.seq_len} tokens | "
        f"{'LoRA rank ' + str(lora.rank) + ' + score head' if lora else 'full fine-tuning'} | {tc.steps} steps on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    trainable, frozen = load_reward_model_weights(args, config, rm_config, lora, rules, tc.compute_dtype)
    task = RewardModelTask.of(rm_config, tc, rules, args.center_rewards, lora)
    meta = {"command": "rm", "model": os.path.abspath(args.model), "data": [os.path.abspath(p) for p in paths],
            "center_rewards": args.center_rewards, "lora": vars(lora) if lora else None, "train": dict(vars(tc))}
    cli.write_run_files(args.out, rm_config, tok, meta)
    start = None
    if eval_ds is not None and not args.resume:  # where training starts from: chance for a fresh head
        start = evaluate(make_eval_step(rm_config, tc, rules, task), trainable, eval_ds,
                         tc.batch_size // tc.grad_accum, tc.eval_batches, rules, task, frozen)
        say(f"held-out pair accuracy at the start: {cli.fmt(start['eval_accuracy'], '.1%')}")
    result = fit(rm_config, tc, trainable, train_ds, eval_ds, args.out, rules, resume=args.resume, meta=meta,
                 progress=not args.no_progress, task=task, frozen=frozen)
    summary = {"step": result["step"], "train": result["last"], "eval_start": start, "eval": result["eval"],
               "trainable_params": cli.num_trainable(result["state"]["params"]),
               "resumed_from": result["resumed_from"]}
    if not args.no_export:
        params = result["state"]["params"]
        if lora is not None:  # the merged body, then the trained score head beside it
            adapters, head = lora_lib.split({k: v for k, v in params.items() if k != "score"})[1], params["score"]
            params = {**lora_lib.merge(frozen["base"], adapters, lora), "score": head}
        summary["export"] = cli.export(args.out, rm_config, tok, params, F.export_dtype(args))
    ev = result["eval"] or {}
    acc0 = f"{cli.fmt(start['eval_accuracy'], '.1%')} -> " if start else ""
    return cli.finish(args.out, summary, f"done: step {result['step']}, train loss {cli.fmt(result['train_loss'])}; "
                                         f"held-out pair accuracy {acc0}{cli.fmt(ev.get('eval_accuracy'), '.1%')}, margin "
                                         f"{cli.fmt(ev.get('eval_margin'))}"
                      + (f"; exported to {summary['export']}" if "export" in summary else ""))


if __name__ == "__main__":
    sys.exit(main())
