"""TrainConfig: the optimisation and run settings of one training run, validated in one place."""

from __future__ import annotations

import dataclasses

from qwen_jax.errors import require
from qwen_jax.model import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seq_len: int = 2048
    batch_size: int = 8  # sequences per optimizer step (global, across all devices and hosts)
    grad_accum: int = 1  # micro-batches per step
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"
    z_loss: float = 0.0
    aux_loss_coef: float | None = None  # None: the model config's router_aux_loss_coef
    ce_chunk: int = 1024
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 20
    save_every: int = 500
    keep: int = 3

    def validate(self) -> "TrainConfig":
        require(self.steps > 0, f"--steps must be positive, got {self.steps}")
        require(self.seq_len > 0, f"--seq-len must be positive, got {self.seq_len}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
                f"--batch-size ({self.batch_size}) must be a positive multiple of --grad-accum ({self.grad_accum})")
        require(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "--lr must be positive and --min-lr-ratio in [0, 1]")
        require(0 <= self.warmup_steps <= self.steps, f"--warmup ({self.warmup_steps}) must be in [0, --steps]")
        require(self.remat in REMAT_POLICIES, f"--remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        for name, flag in (("compute_dtype", "--dtype"), ("param_dtype", "--param-dtype")):
            require(getattr(self, name) in ("float32", "bfloat16", "float16"),
                    f"{flag} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
        require(self.keep >= 1 and self.save_every >= 1, "--keep and --save-every must be >= 1")
        require(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        require(self.ce_chunk >= 1, f"--ce-chunk must be >= 1, got {self.ce_chunk}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(self.clip_norm is None or self.clip_norm > 0, f"--clip-norm must be >= 0, got {self.clip_norm}")
        require(self.z_loss >= 0, f"--z-loss must be >= 0, got {self.z_loss}")
        require(self.aux_loss_coef is None or self.aux_loss_coef >= 0,
                f"--aux-loss-coef must be >= 0, got {self.aux_loss_coef}")
        require(self.eval_every >= 0 and self.eval_batches >= 1,
                f"--eval-every must be >= 0 and --eval-batches >= 1, got {self.eval_every} and {self.eval_batches}")
        return self
