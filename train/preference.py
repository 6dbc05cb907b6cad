"""Direct Preference Optimisation: the objective, its metrics, and reference log-probs.

For a prompt x with chosen response y_w and rejected y_l, the policy pi and the frozen reference give
sequence log-probs (summed over the response tokens; averaged per token for IPO, as in TRL). With
    h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)):
  sigmoid (Rafailov et al. 2023):  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps: label smoothing)
  ipo (Azar et al. 2023):          (h - 1 / (2 beta))^2
  hinge (SLiC):                    max(0, 1 - beta h)
Implicit rewards are beta (log pi(y) - log ref(y)); reward accuracy is the share of pairs whose chosen reward
beats the rejected one, and the margin is their mean difference.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError
from qwen_jax.lora import LoraConfig
from qwen_jax.model import stored_output_head
from qwen_jax.sharding import ShardingRules
from train.config import TrainConfig
from train.losses import token_logprobs
from train.placement import put_batch
from train.tasks import ForwardOptions, WeightedExamplesTask, forward_rows, model_params


LOSS_TYPES = ("sigmoid", "ipo", "hinge")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
           "logps/rejected")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def validate(self) -> "DPOConfig":
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ConfigError(f"--beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"--label-smoothing applies to the sigmoid loss only, not {self.loss_type!r}")
        return self


def dpo_loss(pi_w, pi_l, ref_w, ref_l, cfg: DPOConfig):
    """Per-pair (losses, chosen rewards, rejected rewards), each [N] float32, from sequence log-probs [N]."""
    h = (pi_w - pi_l) - (ref_w - ref_l)
    if cfg.loss_type == "sigmoid":
        eps = cfg.label_smoothing
        losses = -(1 - eps) * jax.nn.log_sigmoid(cfg.beta * h) - eps * jax.nn.log_sigmoid(-cfg.beta * h)
    elif cfg.loss_type == "ipo":
        losses = (h - 1 / (2 * cfg.beta)) ** 2
    else:
        losses = jax.nn.relu(1 - cfg.beta * h)
    return losses, cfg.beta * (pi_w - ref_w), cfg.beta * (pi_l - ref_l)


def sequence_logprobs(config: Qwen3Config, params, rows, opts: ForwardOptions, average: bool = False):
    """Summed (or per-token mean) log-probs of the loss-masked tokens of each row: rows [N, T+1] -> [N],
    plus the MoE load-balancing loss (0 if dense)."""
    f = forward_rows(config, params, rows, opts)
    N, T, D = f.hidden.shape
    head, axes = stored_output_head(config, params)
    lp = token_logprobs(f.hidden.reshape(N * T, D), head, f.targets.reshape(-1), opts.ce_chunk,
                        head_axes=axes).reshape(N, T)
    mask = f.mask.astype(jnp.float32)
    total = jnp.sum(lp * mask, axis=-1)
    if average:
        total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return total, f.aux


def _flat_pairs(batch):
    """{"tokens", "segment_ids", "loss_mask"}: [b, 2, T+1] -> [2b, T+1] (chosen and rejected interleaved)."""
    return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in ("tokens", "segment_ids", "loss_mask")}


class DPOTask(WeightedExamplesTask):
    """The DPO objective as a trainer task. Batches: tokens / segment_ids / loss_mask [b, 2, T+1] (chosen,
    rejected), weight [b] (0 on evaluation padding) and optionally ref_logps [b, 2] (precomputed).

    Without ref_logps, the reference is `frozen["ref"]` (a separate model) or, with LoRA, the frozen base
    without adapters (no extra memory)."""

    METRICS = METRICS

    def __init__(self, config: Qwen3Config, opts: ForwardOptions, dpo: DPOConfig,
                 aux_loss_coef: float | None = None):
        self.config, self.opts, self.dpo = config, opts, dpo.validate()
        self.aux_coef = config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
        self.average = dpo.loss_type == "ipo"

    @classmethod
    def of(cls, config: Qwen3Config, tc: TrainConfig, rules: ShardingRules | None, dpo: DPOConfig,
           lora: LoraConfig | None = None) -> "DPOTask":
        return cls(config, ForwardOptions.of(tc, rules, lora), dpo, tc.aux_loss_coef)

    def reference_logps(self, frozen, batch):
        """[b, 2] reference log-probs of a pair batch (the reference model never has adapters)."""
        ref = frozen["ref"] if "ref" in frozen else frozen["base"]
        opts = dataclasses.replace(self.opts, lora=None)
        lp, _ = sequence_logprobs(self.config, ref, _flat_pairs(batch), opts, self.average)
        return jax.lax.stop_gradient(lp.reshape(-1, 2))

    def _sums(self, trainable, frozen, mb):
        params = model_params(trainable, frozen, self.opts.lora)
        lp, aux = sequence_logprobs(self.config, params, _flat_pairs(mb), self.opts, self.average)
        pi = lp.reshape(-1, 2)
        ref = mb["ref_logps"] if "ref_logps" in mb else self.reference_logps(frozen, mb)
        losses, r_w, r_l = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], self.dpo)
        w = mb["weight"].astype(jnp.float32)
        return {"loss": jnp.sum(w * losses), "rewards/chosen": jnp.sum(w * r_w), "rewards/rejected": jnp.sum(w * r_l),
                "rewards/accuracy": jnp.sum(w * (r_w > r_l)), "rewards/margin": jnp.sum(w * (r_w - r_l)),
                "logps/chosen": jnp.sum(w * pi[:, 0]), "logps/rejected": jnp.sum(w * pi[:, 1]), "n": jnp.sum(w),
                "aux": aux}


def precompute_reference(task: DPOTask, frozen, ds, batch_size: int, rules: ShardingRules) -> np.ndarray:
    """Reference log-probs [N, 2] of every pair in `ds`, computed once (the reference can then be dropped)."""
    fn = jax.jit(task.reference_logps)
    out = []
    for batch in ds.sequential(batch_size):
        out.append(np.asarray(jax.device_get(fn(frozen, put_batch(batch, rules)))))
    return np.concatenate(out)[:len(ds)] if out else np.zeros((0, 2), np.float32)
