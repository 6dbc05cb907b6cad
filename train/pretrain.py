"""python -m train.pretrain: pretrain a Qwen3 / Qwen3-MoE model.

With no arguments it trains the project's small default model on the shipped Shakespeare corpus (its own
4,096-token byte-level BPE with Qwen's special tokens and chat template) on the CPU in minutes, evaluates
held-out perplexity, checkpoints, and exports an HF directory to runs/pretrain-default/hf.

    python -m train.pretrain
    python -m train.pretrain --config qwen3-0.6b --tokenizer /models/Qwen3-0.6B --data corpus/ \\
        --seq-len 4096 --batch-size 64 --steps 20000 --lr 3e-4 --mesh fsdp=8 --out runs/q06b
    python -m train.pretrain --config /models/Qwen3-0.6B --data more.jsonl --out runs/cont   # continue
    python -m train.pretrain --out runs/q06b ... --resume
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

DEFAULT_OUT = os.path.join("runs", "pretrain-default")
# The default small model: ~4.2M parameters (1M of them the tied 4,096 x 256 embedding).
DEFAULT_MODEL = dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                     max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=True)
DEFAULTS = dict(steps=400, seq_len=256, batch_size=16, lr=3e-3, warmup=40, weight_decay=0.1, out=DEFAULT_OUT,
                log_every=10, eval_every=100, save_every=100)


def parse_args(argv=None):
    from train.cli import add_common_args
    from qwen_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m train.pretrain", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--config", default=None,
                   help="a preset (qwen3-0.6b, ..., qwen3-30b-a3b), an HF config.json, or an HF checkpoint directory "
                        "to continue from (default: the small default model)")
    g.add_argument("--data", nargs="+", default=None,
                   help=".txt / .jsonl / .parquet files or directories (default: the shipped Shakespeare corpus)")
    g.add_argument("--text-field", default="text", help="JSONL field / parquet column with the text")
    g.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: the checkpoint's, or a new "
                                                     "BPE trained on --data for the default model)")
    g.add_argument("--vocab-size", type=int, default=4096, help="BPE size when a tokenizer is trained")
    g.add_argument("--eval-fraction", type=float, default=0.02, help="fraction of the data held out")
    add_common_args(p, DEFAULTS)
    return p.parse_args(argv)


def _model_and_tokenizer(args, docs_for_bpe):
    """-> (config, tokenizer, HF checkpoint directory to continue from or None (random init)). Reads no
    weights, so a bad --config is reported before any data is read or weight loaded."""
    from qwen_jax import ConfigError, Qwen3Config, get_preset, load_tokenizer
    from train.data import train_bpe_tokenizer

    run_cfg = os.path.join(args.out, "config.json")
    run_tok = os.path.join(args.out, "tokenizer")
    if args.resume and os.path.exists(run_cfg):  # the run's own config and tokenizer win on resume
        return Qwen3Config.from_json_file(run_cfg), load_tokenizer(run_tok), None
    checkpoint = None
    if args.config is None:
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_bpe_tokenizer(docs_for_bpe(),
                                                                                         args.vocab_size)
        eos = tok.hf.convert_tokens_to_ids("<|endoftext|>")
        config = Qwen3Config(vocab_size=tok.vocab_size, bos_token_id=None, eos_token_id=eos, pad_token_id=eos,
                             **DEFAULT_MODEL)
    elif os.path.isdir(args.config):
        config = Qwen3Config.from_json_file(args.config)
        if os.path.exists(os.path.join(args.config, "model.safetensors")) or os.path.exists(
                os.path.join(args.config, "model.safetensors.index.json")):
            checkpoint = args.config
        tok = load_tokenizer(args.tokenizer or args.config)
    else:
        config = (Qwen3Config.from_json_file(args.config) if args.config.endswith(".json")
                  else get_preset(args.config))
        if not args.tokenizer:
            raise ConfigError(f"--config {args.config} needs --tokenizer (an HF tokenizer directory)")
        tok = load_tokenizer(args.tokenizer)
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                          f"{config.vocab_size}")
    return config, tok, checkpoint


def main(argv=None) -> int:
    from train import cli

    return cli.main(lambda: _main(parse_args(argv)))


def _main(args) -> int:
    import jax
    import jax.numpy as jnp

    from qwen_jax import ShardingRules, init_params, load_pretrained, make_mesh
    from qwen_jax.cli import check_interrupt
    from qwen_jax.errors import require
    from train import cli
    from train import data as D
    from train.cli import init_distributed, say, train_config
    from train.trainer import fit

    cli.check_args(args)
    require(args.vocab_size >= 266, f"--vocab-size must be >= 266 (the 256 bytes and Qwen's special tokens), got "
                                    f"{args.vocab_size}")
    init_distributed(args)
    tc = train_config(args)
    tc.validate()
    args.mesh_obj = make_mesh(args.mesh)
    rules = ShardingRules(args.mesh_obj)
    paths = args.data or [D.DEFAULT_CORPUS]
    read = functools.cache(lambda: D.read_documents(paths, args.text_field, warn=say))
    config, tok, checkpoint = _model_and_tokenizer(args, read)  # the default model's BPE reads the data first
    docs = read()
    check_interrupt()
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else tok.eos_token_ids[0]
    tokenized = D.tokenize_documents(tok, docs, eos)
    train_docs, eval_docs = D.split_holdout(tokenized, args.eval_fraction, args.seed)
    train_ds = D.PackedDataset(*D.pack(train_docs, tc.seq_len + 1))
    eval_ds = D.PackedDataset(*D.pack(eval_docs, tc.seq_len + 1))
    train_ds.check_batch(tc.batch_size)
    check_interrupt()
    meta = {"command": "pretrain", "model": config.to_hf_dict(), "data": [os.path.abspath(p) for p in paths],
            "train": dict(vars(tc))}
    cli.write_run_files(args.out, config, tok, meta)
    entropy = D.unigram_entropy(train_ds, config.vocab_size)
    say(f"model: {config.model_type}, {config.num_params() / 1e6:.2f}M params | data: {len(docs)} documents, "
        f"{train_ds.num_tokens:,} train / {eval_ds.num_tokens:,} held-out tokens, unigram entropy {entropy:.3f} "
        f"nats | mesh {dict(args.mesh_obj.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    if checkpoint is not None:
        config, params = load_pretrained(checkpoint, dtype=jnp.dtype(tc.param_dtype), mesh=args.mesh_obj)
    else:
        params = init_params(config, jax.random.key(tc.seed), jnp.dtype(tc.param_dtype), rules)
    result = fit(config, tc, params, train_ds, eval_ds if len(eval_ds) else None, args.out, rules,
                 resume=args.resume, meta=meta, progress=not args.no_progress)
    summary = {"step": result["step"], "train_loss": result["train_loss"], "eval_loss": result["eval_loss"],
               "unigram_entropy": entropy, "resumed_from": result["resumed_from"]}
    if not args.no_export:
        summary["export"] = cli.export(args.out, config, tok, result["state"]["params"],
                                       args.export_dtype or tc.param_dtype)
    ev = result["eval_loss"]
    held_out = "n/a" if ev is None else f"{ev:.3f} (perplexity {math.exp(min(ev, 700)):.1f})"
    return cli.finish(args.out, summary, f"done: step {result['step']}, train loss {cli.fmt(result['train_loss'])}, "
                                         f"held-out loss {held_out}, unigram entropy {entropy:.3f}"
                      + (f"; exported to {summary['export']}" if "export" in summary else ""))


if __name__ == "__main__":
    sys.exit(main())
