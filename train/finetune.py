"""What train.sft and train.dpo add to train.cli: flags, loading the starting checkpoint (full fine-tuning or
LoRA), reading chat data with line-numbered problems, and the export dtype."""

from __future__ import annotations

import argparse
import os

from qwen_jax.assets import DEFAULT_MODEL

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


def parser(prog: str, doc: str, demo_file: str, defaults: dict) -> argparse.ArgumentParser:
    """A fine-tuning CLI's parser (one-line usage errors) with the shared flags."""
    from qwen_jax.cli import ArgumentParser

    p = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p, demo_file, defaults)
    return p


def add_finetune_args(p: argparse.ArgumentParser, demo_file: str, defaults: dict) -> None:
    from train.cli import add_common_args

    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF checkpoint directory to start from (default: the shipped small model)")
    g.add_argument("--data", nargs="+", default=None,
                   help=f"JSONL file(s) (default: the shipped demo, train/demo/{demo_file})")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="share of the examples held out")
    g.add_argument("--strict", action="store_true",
                   help="stop at the first malformed line instead of skipping and reporting it")
    g.add_argument("--epochs", type=float, default=1.0, help="training length when --steps is not given")
    g = p.add_argument_group("LoRA (default: full fine-tuning)")
    g.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 = full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    g.add_argument("--lora-targets", default="all",
                   help="'all' (q,k,v,o,gate,up,down), 'attn' (q,k,v,o) or a comma list (default: %(default)s)")
    g.add_argument("--base-dtype", default=None,
                   help="dtype of the frozen base weights with LoRA (default: the compute dtype)")
    add_common_args(p, defaults)


def parse_with_demo(p: argparse.ArgumentParser, argv, demo: dict):
    """Parse; without --data, the demo's settings replace the defaults of flags not given explicitly."""
    import sys

    args = p.parse_args(argv)
    args.given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args.data is None:
        for k, v in demo.items():
            if f"--{k.replace('_', '-')}" not in args.given:
                setattr(args, k, v)
    return args


def lora_config(args):
    from qwen_jax.lora import LoraConfig

    if args.lora_rank <= 0:
        return None
    return LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                      targets=LoraConfig.parse_targets(args.lora_targets)).validate()


def setup(args):
    """Flag checks, distributed init, mesh, tokenizer and config (no weights yet) -> (rules, tokenizer,
    config)."""
    from qwen_jax import Qwen3Config, ShardingRules, load_tokenizer, make_mesh
    from qwen_jax.errors import CheckpointError, require
    from train.cli import check_args, init_distributed

    check_args(args)
    require(args.epochs > 0, f"--epochs must be positive, got {args.epochs}")
    require(args.lora_rank >= 0, f"--lora-rank must be >= 0 (0: full fine-tuning), got {args.lora_rank}")
    for flag in ("model", "ref_model"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.isdir(path):
            raise CheckpointError(f"--{flag.replace('_', '-')} {path}: not a directory (an HF checkpoint directory "
                                  f"is expected)")
    init_distributed(args)
    args.mesh_obj = make_mesh(args.mesh)
    rules = ShardingRules(args.mesh_obj)
    config = Qwen3Config.from_json_file(args.model)
    tok = load_tokenizer(args.model)
    return rules, tok, config


def read_all(paths, read_one, say) -> list:
    """Examples from every file; reports the skipped lines and the degenerate examples of each; DataError
    when nothing is usable."""
    from qwen_jax.errors import DataError

    examples, total = [], 0
    for path in paths:
        got, bad, n = read_one(path)
        examples += got
        total += n
        if bad.items:
            say("warning: " + bad.summary(n))
        for line in bad.warnings():
            say(line)
    if not examples:
        raise DataError(f"no usable examples in {', '.join(paths)} ({total} lines read)")
    return examples


def read_pairs(args, tok, max_len: int, say):
    """Preference pairs of --data (default: the demo's), each side at most `max_len` tokens -> (paths, pairs,
    row length: the longest pair's, rounded up to 16, at most max_len)."""
    from kernels.util import cdiv
    from train import chat_data as C

    paths = args.data or [os.path.join(DEMO_DIR, "dpo_pairs.jsonl")]
    renderer = C.ChatRenderer(tok)
    pairs = read_all(paths, lambda p: C.read_preferences(p, renderer, max_len, args.strict), say)
    longest = max(max(len(p[0]), len(p[2])) for p in pairs)
    return paths, pairs, min(max_len, cdiv(longest, 16) * 16)


def load_weights(args, config, lora, rules, compute_dtype: str):
    """-> (trainable params, frozen dict or None). Full fine-tuning trains every weight in --param-dtype;
    LoRA trains fresh adapters (in --param-dtype) over the base held in --base-dtype."""
    import jax
    import jax.numpy as jnp

    from qwen_jax import load_pretrained
    from qwen_jax.model import init_lora_params

    if lora is None:
        _, params = load_pretrained(args.model, dtype=jnp.dtype(args.param_dtype), mesh=args.mesh_obj,
                                    progress=not args.no_progress)
        return params, None
    _, base = load_pretrained(args.model, dtype=jnp.dtype(args.base_dtype or compute_dtype), mesh=args.mesh_obj,
                              progress=not args.no_progress)
    adapters = init_lora_params(config, lora, jax.random.key(args.seed), jnp.dtype(args.param_dtype), rules)
    return adapters, {"base": base}


def resolve_steps(args, num_rows: int) -> None:
    """--steps from --epochs when not given."""
    if args.steps is None:
        args.steps = max(1, int(args.epochs * num_rows) // max(args.batch_size, 1))
    if "--warmup" not in args.given:
        args.warmup = min(args.warmup, args.steps)


def reference_model(args, config, lora, frozen, trainable, compute_dtype):
    """Add the frozen reference model of DPO and GRPO to `frozen` ({"ref": params}); with LoRA and no
    --ref-model the base serves."""
    import jax
    import jax.numpy as jnp

    from qwen_jax import ConfigError, load_pretrained

    frozen = dict(frozen or {})
    if args.ref_model:
        ref_config, ref = load_pretrained(args.ref_model, dtype=jnp.dtype(compute_dtype), mesh=args.mesh_obj,
                                          progress=not args.no_progress)
        if ref_config.vocab_size != config.vocab_size:
            raise ConfigError(f"--ref-model has vocab_size {ref_config.vocab_size}, the model {config.vocab_size}")
        frozen["ref"] = ref
    elif lora is None:  # a frozen copy of the starting weights (the trained ones are donated each step)
        frozen["ref"] = jax.tree.map(lambda x: jnp.copy(x).astype(compute_dtype), trainable)
    return frozen


def export_dtype(args) -> str:
    """The exported weights keep the dtype they trained in (--param-dtype, or with LoRA the base's) unless
    --export-dtype says otherwise."""
    from train.cli import resolve_dtype

    if args.export_dtype:
        return args.export_dtype
    return args.param_dtype if args.lora_rank <= 0 else args.base_dtype or resolve_dtype(args.dtype)
