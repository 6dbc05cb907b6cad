"""python -m train.sft: supervised fine-tuning on chat conversations.

Each JSONL line is {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...]}.
The checkpoint's chat template renders each conversation; the loss covers the assistant turns only (their
content, Qwen3's think block, and the end-of-turn token), or with --last-turn-only the final assistant turn.
Conversations are packed whole into rows with segment ids. The result is exported to OUT/hf.

With no --data it fine-tunes the shipped small model on the shipped demo conversations (a few minutes on a
CPU), after which `python -m infer.generate --model runs/sft-demo/hf --chat --prompt "Reply as ROMEO:..."`
answers in the chat format.

    python -m train.sft
    python -m train.sft --model /models/Qwen3-0.6B --data chats.jsonl --seq-len 4096 --batch-size 16 \\
        --lr 1e-5 --epochs 2 --out runs/sft
    python -m train.sft --model /models/Qwen3-8B --data chats.jsonl --lora-rank 16 --lr 2e-4 --out runs/lora
"""

from __future__ import annotations

import math
import os
import sys

DEFAULTS = dict(steps=None, seq_len=2048, batch_size=16, lr=1e-5, warmup=20, weight_decay=0.0,
                out=os.path.join("runs", "sft"), log_every=10, eval_every=0, save_every=500)
# The demo (no --data): the shipped 4M model learns the chat format and to answer in character.
DEMO = dict(steps=100, seq_len=256, lr=1e-3, warmup=10, out=os.path.join("runs", "sft-demo"), eval_every=25)


def parse_args(argv=None):
    from train import finetune as F

    p = F.parser("python -m train.sft", __doc__, "sft_chats.jsonl", DEFAULTS)
    p.add_argument("--last-turn-only", action="store_true", help="loss on the final assistant turn only")
    return F.parse_with_demo(p, argv, DEMO)


def main(argv=None) -> int:
    from train import cli

    return cli.main(lambda: _main(parse_args(argv)))


def _main(args) -> int:
    import jax

    from train import chat_data as C
    from train import finetune as F
    from train import cli
    from qwen_jax.cli import check_interrupt
    from train.cli import say, train_config
    from train.data import PackedDataset
    from train.tasks import LMTask
    from train.trainer import fit

    rules, tok, config = F.setup(args)
    lora = F.lora_config(args)
    paths = args.data or [os.path.join(F.DEMO_DIR, "sft_chats.jsonl")]
    renderer = C.ChatRenderer(tok)
    row_len = args.seq_len + 1
    examples = F.read_all(paths, lambda p: C.read_conversations(p, renderer, row_len, args.last_turn_only,
                                                                args.strict), say)
    train_ex, eval_ex = C.split_examples(examples, args.eval_fraction, args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_ds = PackedDataset(*C.pack_conversations(train_ex, row_len, pad))
    eval_ds = PackedDataset(*C.pack_conversations(eval_ex, row_len, pad)) if eval_ex else None
    F.resolve_steps(args, len(train_ds))
    tc = train_config(args)
    tc.validate()
    train_ds.check_batch(tc.batch_size)
    check_interrupt()
    n_loss = int(train_ds.arrays["loss_mask"].sum())
    say(f"model: {args.model} ({config.num_params() / 1e6:.1f}M params) | data: {len(train_ex)} train / "
        f"{len(eval_ex)} held-out conversations in {len(train_ds)} rows of {row_len} tokens, {n_loss:,} "
        f"assistant tokens | {'LoRA rank ' + str(lora.rank) if lora else 'full fine-tuning'} | "
        f"{tc.steps} steps on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    trainable, frozen = F.load_weights(args, config, lora, rules, tc.compute_dtype)
    meta = {"command": "sft", "model": os.path.abspath(args.model), "data": [os.path.abspath(p) for p in paths],
            "lora": vars(lora) if lora else None, "train": dict(vars(tc))}
    cli.write_run_files(args.out, config, tok, meta)
    task = LMTask.of(config, tc, rules, lora)
    result = fit(config, tc, trainable, train_ds, eval_ds, args.out, rules, resume=args.resume, meta=meta,
                 progress=not args.no_progress, task=task, frozen=frozen)
    summary = {"step": result["step"], "train_loss": result["train_loss"], "eval_loss": result["eval_loss"],
               "trainable_params": cli.num_trainable(result["state"]["params"]),
               "resumed_from": result["resumed_from"]}
    if not args.no_export:
        summary["export"] = cli.export(args.out, config, tok, result["state"]["params"], F.export_dtype(args),
                                       frozen, lora)
    ev = result["eval_loss"]
    held = "n/a" if ev is None else f"{ev:.3f} (perplexity {math.exp(min(ev, 700)):.1f})"
    return cli.finish(args.out, summary, f"done: step {result['step']}, train loss {cli.fmt(result['train_loss'])}, "
                                   f"held-out loss on assistant tokens {held}"
                    + (f"; exported to {summary['export']}" if "export" in summary else ""))


if __name__ == "__main__":
    sys.exit(main())
