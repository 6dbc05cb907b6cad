"""Training metrics: a JSONL file, TensorBoard event files, and FLOP / MFU accounting."""

from __future__ import annotations

import json
import os

import jax

from qwen_jax.config import Qwen3Config

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity), matched against jax's device_kind.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
                   ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10", 125e12))


def peak_flops(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def flops_per_token(config: Qwen3Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting matmuls only.

    Active parameters (top-k experts only), the LM head, and attention scores/values with causal
    attention counted at half (MaxText's convention)."""
    attention = config.num_layers * 2 * seq_len * config.num_heads * config.head_dim / 2  # QK^T, PV; causal half
    return 6.0 * config.matmul_params(active=True) + 6.0 * attention


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out_dir: str, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            # Drop records past the checkpoint we resume from: they are about to be recomputed.
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"),
                                purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if v is not None else None) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if v is not None:
                self.tb.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
