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

import qwen_jax
from qwen_jax import moe
from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError
from qwen_jax.lora import LoraConfig
from qwen_jax.model import output_head
from qwen_jax.sharding import ShardingRules
from train.losses import token_logprobs
from train.trainer import (
    TrainConfig,
    model_params,
    positions_from_segments,
    put_batch,
    target_mask,
)

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


def sequence_logprobs(config: Qwen3Config, tc: TrainConfig, params, rows, rules: ShardingRules | None,
                      lora: LoraConfig | None = None, average: bool = False):
    """Summed (or per-token mean) log-probs of the loss-masked tokens of each row: rows [N, T+1] -> [N],
    plus the MoE router logits (None if dense)."""
    tokens, seg = rows["tokens"], rows["segment_ids"]
    seg_in = seg[:, :-1]
    out = qwen_jax.forward(config, params, tokens[:, :-1], positions=positions_from_segments(seg_in),
                           segment_ids=seg_in, dtype=jnp.dtype(tc.compute_dtype), rules=rules, remat=tc.remat,
                           return_hidden=True, lora=lora)
    N, T, D = out.hidden.shape
    lp = token_logprobs(out.hidden.reshape(N * T, D), output_head(config, params), tokens[:, 1:].reshape(-1),
                        tc.ce_chunk).reshape(N, T)
    mask = target_mask(rows).astype(jnp.float32)
    total = jnp.sum(lp * mask, axis=-1)
    if average:
        total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return total, out.router_logits


def _flat_pairs(batch):
    """{"tokens", "segment_ids", "loss_mask"}: [b, 2, T+1] -> [2b, T+1] (chosen and rejected interleaved)."""
    return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in ("tokens", "segment_ids", "loss_mask")}


class DPOTask:
    """The DPO objective as a trainer task. Batches: tokens / segment_ids / loss_mask [b, 2, T+1] (chosen,
    rejected), weight [b] (0 on evaluation padding) and optionally ref_logps [b, 2] (precomputed).

    Without ref_logps, the reference is `frozen["ref"]` (a separate model) or, with LoRA, the frozen base
    without adapters (no extra memory)."""

    def __init__(self, config: Qwen3Config, tc: TrainConfig, rules: ShardingRules | None, dpo: DPOConfig,
                 lora: LoraConfig | None = None):
        self.config, self.tc, self.rules, self.dpo, self.lora = config, tc, rules, dpo.validate(), lora
        self.aux_coef = config.router_aux_loss_coef if tc.aux_loss_coef is None else tc.aux_loss_coef
        self.average = dpo.loss_type == "ipo"

    def reference_logps(self, frozen, batch):
        """[b, 2] reference log-probs of a pair batch."""
        ref = frozen["ref"] if "ref" in frozen else frozen["base"]
        lp, _ = sequence_logprobs(self.config, self.tc, ref, _flat_pairs(batch), self.rules, None, self.average)
        return jax.lax.stop_gradient(lp.reshape(-1, 2))

    def _sums(self, trainable, frozen, mb):
        params = model_params(trainable, frozen, self.lora)
        rows = _flat_pairs(mb)
        lp, router_logits = sequence_logprobs(self.config, self.tc, params, rows, self.rules, self.lora, self.average)
        pi = lp.reshape(-1, 2)
        ref = mb["ref_logps"] if "ref_logps" in mb else self.reference_logps(frozen, mb)
        losses, r_w, r_l = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], self.dpo)
        w = mb["weight"].astype(jnp.float32)
        sums = {"loss": jnp.sum(w * losses), "rewards/chosen": jnp.sum(w * r_w), "rewards/rejected": jnp.sum(w * r_l),
                "rewards/accuracy": jnp.sum(w * (r_w > r_l)), "rewards/margin": jnp.sum(w * (r_w - r_l)),
                "logps/chosen": jnp.sum(w * pi[:, 0]), "logps/rejected": jnp.sum(w * pi[:, 1]), "n": jnp.sum(w),
                "aux": jnp.float32(0.0)}
        if router_logits is not None:
            seg = rows["segment_ids"][:, :-1]
            sums["aux"] = moe.load_balancing_loss(router_logits, self.config.num_experts_per_tok,
                                                  (seg != 0).reshape(-1))
        return sums

    def normalizer(self, batch):  # the number of real pairs in the whole batch
        return jnp.maximum(jnp.sum(batch["weight"].astype(jnp.float32)), 1.0)

    def loss(self, trainable, frozen, mb, norm, A):
        sums = self._sums(trainable, frozen, mb)
        return sums["loss"] / norm + self.aux_coef * sums["aux"] / A, sums

    def metrics(self, sums, norm, A):
        return {**{k: sums[k] / norm for k in METRICS}, "aux_loss": sums["aux"] / A}

    def eval_sums(self, trainable, frozen, batch):
        return self._sums(trainable, frozen, batch)

    @staticmethod
    def eval_metrics(sums) -> dict | None:
        if not sums or float(sums["n"]) == 0:
            return None
        n = float(sums["n"])
        return {f"eval_{k}": float(sums[k]) / n for k in METRICS}


def precompute_reference(task: DPOTask, frozen, ds, batch_size: int, rules: ShardingRules) -> np.ndarray:
    """Reference log-probs [N, 2] of every pair in `ds`, computed once (the reference can then be dropped)."""
    fn = jax.jit(task.reference_logps)
    out = []
    for batch in ds.sequential(batch_size):
        out.append(np.asarray(jax.device_get(fn(frozen, put_batch(batch, rules)))))
    return np.concatenate(out)[:len(ds)] if out else np.zeros((0, 2), np.float32)
