"""What train.pretrain, train.sft and train.dpo share: common flags, multi-host initialisation, and one
setup / finish / export path (run files, the HF export, the summary). Turning user errors into one line
and exit code 2 is qwen_jax.cli's job; `main` adds the trainers' interruption message."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Callable

from qwen_jax.cli import run_cli, say
from qwen_jax.files import write_json

INTERRUPTED = "interrupted before training started: nothing new was saved"  # the trainer and export say more


def add_common_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    d = defaults.get
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d("steps", 1000),
                   help="optimizer steps (default: %(default)s)" if d("steps", 1000) is not None
                   else "optimizer steps (default: --epochs passes over the training rows)")
    g.add_argument("--seq-len", type=int, default=d("seq_len", 2048), help="tokens per row (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d("batch_size", 8),
                   help="rows per optimizer step, global across devices and hosts (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d("lr", 3e-4), help="peak learning rate (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=d("warmup", 100), help="linear warmup steps (default: %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    g.add_argument("--weight-decay", type=float, default=d("weight_decay", 0.1))
    g.add_argument("--clip-norm", type=float, default=1.0, help="global-norm clipping; 0 disables")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float32")
    g.add_argument("--param-dtype", default="float32", help="master weight dtype (default: %(default)s)")
    g.add_argument("--remat", default="none", help="activation checkpointing: none, full, dots, dots_no_batch")
    g.add_argument("--z-loss", type=float, default=0.0, help="z-loss coefficient (default: off)")
    g.add_argument("--aux-loss-coef", type=float, default=None,
                   help="MoE load-balancing loss coefficient (default: the config's router_aux_loss_coef)")
    g.add_argument("--ce-chunk", type=int, default=1024, help="tokens per cross-entropy chunk")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d("out"), help="run directory (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--log-every", type=int, default=d("log_every", 10))
    g.add_argument("--eval-every", type=int, default=d("eval_every", 0), help="0: evaluate only at the end")
    g.add_argument("--eval-batches", type=int, default=20)
    g.add_argument("--save-every", type=int, default=d("save_every", 500))
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--no-export", action="store_true", help="skip the HF export at the end")
    g.add_argument("--export-dtype", default=None, help="dtype of the exported weights (default: --param-dtype)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("parallelism")
    g.add_argument("--mesh", default="", help="e.g. 'data=2,fsdp=4,tensor=1' (default: data over all devices)")
    g.add_argument("--coordinator", default=None, help="multi-host: coordinator address host:port")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def resolve_dtype(name: str) -> str:
    import jax

    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return name


def train_config(args, resolve: bool = True, **overrides):
    """TrainConfig from the flags. resolve=False leaves jax alone (no backend yet): --dtype auto is checked as
    float32."""
    from train.config import TrainConfig

    return TrainConfig(
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        clip_norm=args.clip_norm or None, param_dtype=args.param_dtype,
        compute_dtype=resolve_dtype(args.dtype) if resolve else args.dtype.replace("auto", "float32"),
        remat=args.remat, z_loss=args.z_loss, aux_loss_coef=args.aux_loss_coef, ce_chunk=args.ce_chunk,
        seed=args.seed, log_every=args.log_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, keep=args.keep, **overrides)


def check_args(args) -> None:
    """Every flag that does not depend on the data, checked before any file is read or written: the
    optimisation settings, --eval-fraction, and --out (not a file; an existing run needs --resume)."""
    from qwen_jax.errors import ConfigError, require

    tc = train_config(args, resolve=False)
    if args.steps is None:  # set from --epochs once the data is read
        tc = dataclasses.replace(tc, steps=max(args.warmup, 1))
    if "--warmup" not in getattr(args, "given", {"--warmup"}):  # fine-tuning: a default warmup is capped at --steps
        tc = dataclasses.replace(tc, warmup_steps=min(tc.warmup_steps, tc.steps))
    tc.validate()
    require(0 <= args.eval_fraction < 1, f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out}: is a file, expected a run directory")
    ckpts = os.path.join(args.out, "checkpoints")
    if not args.resume and os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):
        raise ConfigError(f"{args.out} already has checkpoints: pass --resume to continue, or choose another --out")


def init_distributed(args) -> None:
    """jax.distributed from flags, or from the cluster environment (SLURM, or JAX_COORDINATOR_ADDRESS)."""
    import jax

    explicit = args.coordinator is not None
    from_env = int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "JAX_COORDINATOR_ADDRESS" in os.environ
    if not (explicit or from_env):
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("error: --coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    else:
        jax.distributed.initialize()


def main(fn: Callable[[], int | None]) -> int:
    """Run a trainer CLI body (qwen_jax.cli.run_cli with the trainers' interruption message)."""
    return run_cli(fn, interrupted=INTERRUPTED)


def write_run_files(out: str, config, tok, meta: dict) -> None:
    """The run directory's config.json, tokenizer/ and run.json (process 0 writes)."""
    import jax

    os.makedirs(out, exist_ok=True)
    if jax.process_index() == 0:
        write_json(os.path.join(out, "config.json"), config.to_hf_dict())
        tok.save_pretrained(os.path.join(out, "tokenizer"))
        write_json(os.path.join(out, "run.json"), meta)


def export(out: str, config, tok, params, dtype: str, frozen=None, lora=None) -> str:
    """Write the trained model as an HF directory out/hf (LoRA adapters merged into the base); -> its path."""
    import jax.numpy as jnp

    from qwen_jax import lora as lora_lib
    from qwen_jax import save_pretrained

    if lora is not None:
        params = lora_lib.merge(frozen["base"], params, lora)
    path = os.path.join(out, "hf")
    try:
        save_pretrained(path, config, params, tokenizer=tok, dtype=jnp.dtype(dtype), progress=False)
    except KeyboardInterrupt as e:
        e.args = (f"interrupted during the export to {path} (the training is saved): rerun with --resume to "
                  f"export",)
        raise
    return path


def finish(out: str, summary: dict, line: str) -> int:
    """summary.json in the run directory and on stdout, then the human line on stderr."""
    import jax

    if jax.process_index() == 0:
        write_json(os.path.join(out, "summary.json"), summary)
        print(json.dumps(summary))
    say(line)
    return 0


def num_trainable(trainable) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(trainable))


def fmt(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)
