"""python -m train.dpo: Direct Preference Optimisation against a frozen reference model.

Each JSONL line is {"prompt": ..., "chosen": ..., "rejected": ...}. The prompt is a string (one user
message) or a list of messages; chosen and rejected are strings (one assistant message), a message, or a
list of messages. Prompt plus response is rendered with the checkpoint's chat template; log-probs cover
the response's assistant tokens (through the end-of-turn token).

The reference is the starting checkpoint (a frozen copy; with LoRA, the base without adapters at no extra
memory), another checkpoint (--ref-model), or log-probs computed once before training (--precompute-ref)
so that no reference model stays in memory. Losses: sigmoid (the DPO paper, with --label-smoothing),
ipo, hinge. Metrics: loss, rewards/chosen, rewards/rejected, rewards/accuracy, rewards/margin,
logps/chosen, logps/rejected (train and held-out).

With no --data it runs the shipped demo preferences (real replies over word-shuffled ones) on the shipped
small model in a few minutes on a CPU.

    python -m train.dpo
    python -m train.dpo --model runs/sft/hf --data prefs.jsonl --beta 0.1 --lr 5e-7 --batch-size 32 --out runs/dpo
    python -m train.dpo --model /models/Qwen3-8B --data prefs.jsonl --lora-rank 16 --lr 5e-5 --out runs/dpo-lora
"""

from __future__ import annotations

import os
import sys

DEFAULTS = dict(steps=None, seq_len=2048, batch_size=16, lr=5e-7, warmup=10, weight_decay=0.0,
                out=os.path.join("runs", "dpo"), log_every=10, eval_every=0, save_every=500)
DEMO = dict(steps=30, seq_len=256, lr=2e-4, warmup=3, out=os.path.join("runs", "dpo-demo"), eval_every=10)


def parse_args(argv=None):
    from train import finetune as F
    from train.preference import LOSS_TYPES

    p = F.parser("python -m train.dpo", __doc__, "dpo_pairs.jsonl", DEFAULTS)
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="KL strength beta (default: %(default)s)")
    g.add_argument("--loss-type", default="sigmoid", choices=LOSS_TYPES, help="(default: %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed share of flipped labels, sigmoid loss only (default: %(default)s)")
    g.add_argument("--ref-model", default=None, help="HF checkpoint of the reference (default: --model)")
    g.add_argument("--precompute-ref", action="store_true",
                   help="compute reference log-probs once before training, then free the reference model")
    return F.parse_with_demo(p, argv, DEMO)


def main(argv=None) -> int:
    from train import cli

    return cli.main(lambda: _main(parse_args(argv)))


def _main(args) -> int:
    import jax
    import numpy as np

    from train import chat_data as C
    from train import finetune as F
    from train import cli
    from qwen_jax.cli import check_interrupt
    from train.cli import say, train_config
    from train.data import RowDataset
    from train.preference import DPOConfig, DPOTask, precompute_reference
    from train.trainer import fit

    dpo = DPOConfig(beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing).validate()
    rules, tok, config = F.setup(args)
    lora = F.lora_config(args)
    paths, pairs, row_len = F.read_pairs(args, tok, args.seq_len + 1, say)  # padded only as far as needed
    args.seq_len = row_len - 1
    train_p, eval_p = C.split_examples(pairs, args.eval_fraction, args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def dataset(ps):
        t, s, m = C.pad_pairs(ps, row_len, pad)
        return RowDataset({"tokens": t, "segment_ids": s, "loss_mask": m, "weight": np.ones(len(ps), np.float32)})

    train_ds, eval_ds = dataset(train_p), (dataset(eval_p) if eval_p else None)
    F.resolve_steps(args, len(train_ds))
    tc = train_config(args)
    tc.validate()
    train_ds.check_batch(tc.batch_size)
    check_interrupt()
    say(f"model: {args.model} ({config.num_params() / 1e6:.1f}M params) | data: {len(train_p)} train / "
        f"{len(eval_p)} held-out pairs, rows of {row_len} tokens | {dpo.loss_type} loss, beta {dpo.beta} | "
        f"{'LoRA rank ' + str(lora.rank) if lora else 'full fine-tuning'} | {tc.steps} steps on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    trainable, frozen = F.load_weights(args, config, lora, rules, tc.compute_dtype)
    frozen = F.reference_model(args, config, lora, frozen, trainable, tc.compute_dtype)
    task = DPOTask.of(config, tc, rules, dpo, lora)
    if args.precompute_ref:
        micro = tc.batch_size // tc.grad_accum
        for ds in (train_ds, eval_ds):
            if ds is not None:
                ds.arrays["ref_logps"] = precompute_reference(task, frozen, ds, micro, rules)
        frozen.pop("ref", None)
        say(f"reference log-probs precomputed for {len(train_ds) + (len(eval_ds) if eval_ds else 0)} pairs")
    meta = {"command": "dpo", "model": os.path.abspath(args.model), "data": [os.path.abspath(p) for p in paths],
            "ref_model": args.ref_model, "dpo": vars(dpo), "lora": vars(lora) if lora else None,
            "train": dict(vars(tc))}
    cli.write_run_files(args.out, config, tok, meta)
    result = fit(config, tc, trainable, train_ds, eval_ds, args.out, rules, resume=args.resume, meta=meta,
                 progress=not args.no_progress, task=task, frozen=frozen or None)
    summary = {"step": result["step"], "train": result["last"], "eval": result["eval"],
               "trainable_params": cli.num_trainable(result["state"]["params"]),
               "resumed_from": result["resumed_from"]}
    if not args.no_export:
        summary["export"] = cli.export(args.out, config, tok, result["state"]["params"], F.export_dtype(args),
                                       frozen, lora)
    ev = result["eval"] or {}
    return cli.finish(args.out, summary, f"done: step {result['step']}, train loss {cli.fmt(result['train_loss'])}; held-out "
                                   f"loss {cli.fmt(ev.get('eval_loss'))}, reward accuracy "
                                   f"{cli.fmt(ev.get('eval_rewards/accuracy'), '.1%')}, margin "
                                   f"{cli.fmt(ev.get('eval_rewards/margin'))}"
                    + (f"; exported to {summary['export']}" if "export" in summary else ""))


if __name__ == "__main__":
    sys.exit(main())
