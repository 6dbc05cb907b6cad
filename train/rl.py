"""GRPO: group-relative advantages and the clipped-surrogate loss with a k3 KL penalty, as a trainer task.

For G samples of one prompt with rewards r_1..r_G, the advantage of sample i is r_i - mean(r), divided by
the group's standard deviation (sample std, + 1e-4) unless `scale_std` is off (Dr. GRPO). Every completion
token t of sample i then contributes

    -( min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i) - beta * kl )
    ratio = exp(logp - logp_old),   kl = exp(logp_ref - logp) - (logp_ref - logp) - 1   (the k3 estimator)

where logp is the trained policy's log-prob of the token, logp_old the policy's that sampled it and logp_ref
the frozen reference's. `eps_high > eps_low` is DAPO's clip-higher. Aggregation: "token" averages over
every completion token of the batch (DAPO), "sequence" averages within each completion, then over
completions (the DeepSeekMath paper).

Batches (rows [b, T+1], as every task): tokens, segment_ids (1 on real tokens), loss_mask (1 on completion
tokens), old_logps and ref_logps [b, T] aligned with the targets (tokens[:, 1:]), advantages [b] and
weight [b] (0 on padding rows); with MoE routing replay also routes [b, T, L_moe, k], the experts the engine
chose for each input token, which the policy's forward then uses (its router still sets their weights).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.config import Qwen3Config
from qwen_jax.errors import require
from qwen_jax.lora import LoraConfig
from qwen_jax.model import stored_output_head
from qwen_jax.sharding import ShardingRules
from train.config import TrainConfig
from train.losses import token_logprobs
from train.tasks import ForwardOptions, forward_rows, model_params

AGGREGATIONS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8  # G: samples per prompt
    beta: float = 0.0  # KL coefficient (0: no reference model)
    eps_low: float = 0.2
    eps_high: float = 0.2  # > eps_low: DAPO's clip-higher
    scale_std: bool = True  # divide advantages by the group's std (Dr. GRPO: off)
    aggregation: str = "token"

    def validate(self) -> "GRPOConfig":
        require(self.group_size >= 2, f"--group-size must be >= 2 (advantages compare samples of a prompt), got "
                                      f"{self.group_size}")
        require(self.beta >= 0, f"--beta must be >= 0, got {self.beta}")
        require(0 <= self.eps_low < 1 and self.eps_high >= 0,
                f"--eps-low must be in [0, 1) and --eps-high >= 0, got {self.eps_low} and {self.eps_high}")
        require(self.aggregation in AGGREGATIONS, f"--aggregation must be one of {AGGREGATIONS}, got "
                                                  f"{self.aggregation!r}")
        return self


def group_advantages(rewards_PG: np.ndarray, scale_std: bool) -> np.ndarray:
    """[P, G] rewards -> [P, G] advantages, normalised within each group."""
    r = np.asarray(rewards_PG, np.float64)
    adv = r - r.mean(axis=1, keepdims=True)
    if scale_std:
        adv = adv / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return adv.astype(np.float32)


def grpo_token_terms(logp, old_logp, ref_logp, adv, cfg: GRPOConfig):
    """Per-token (loss, kl, clipped) for log-probs [b, T] and advantages [b]."""
    a = adv[:, None]
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * a
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high) * a
    surrogate = jnp.minimum(unclipped, clipped)
    if cfg.beta > 0:
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
    else:
        kl = jnp.zeros_like(logp)
    return -(surrogate - cfg.beta * kl), kl, (clipped < unclipped).astype(jnp.float32)


def token_weights(mask, cfg: GRPOConfig):
    """[b, T] weights of each completion token in the batch's sum: 1 (token level) or 1 / its completion's
    length (sequence level)."""
    m = mask.astype(jnp.float32)
    if cfg.aggregation == "sequence":
        return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    return m


def policy_logprobs(config: Qwen3Config, params, rows, opts: ForwardOptions, entropy: bool = False,
                    window: int = 0):
    """Log-probs [b, T] of every target token (and with entropy=True the policy's entropy there [b, T]),
    the completion mask [b, T] and the MoE load-balancing loss.

    `window` > 0 (at least the longest completion, e.g. max_new_tokens): the LM head and its softmax run
    only on the `window` positions from each row's first completion target, not on the prompt's (the
    values elsewhere are 0, and masked out by every user)."""
    f = forward_rows(config, params, rows, opts)
    b, T, D = f.hidden.shape
    if window and window < T:
        pos = jnp.argmax(f.mask, axis=1)[:, None] + jnp.arange(window)[None, :]  # [b, W]: the completion's targets
        inside = pos < T
        pos = jnp.minimum(pos, T - 1)
        h, targets = jnp.take_along_axis(f.hidden, pos[..., None], axis=1), jnp.take_along_axis(f.targets, pos, axis=1)

        def place(x):  # [b * W] -> [b, T]; a clipped duplicate of position T - 1 adds 0
            x = jnp.where(inside, x.reshape(b, window), 0)
            return jnp.zeros((b, T), x.dtype).at[jnp.arange(b)[:, None], pos].add(x)
    else:
        h, targets = f.hidden, f.targets

        def place(x):
            return x.reshape(b, T)

    head, axes = stored_output_head(config, params)
    out = token_logprobs(h.reshape(-1, D), head, targets.reshape(-1), opts.ce_chunk, entropy=entropy,
                         head_axes=axes)
    lp, ent = out if entropy else (out, None)
    return place(lp), None if ent is None else place(ent), f.mask, f.aux


class GRPOTask:
    """The GRPO objective as a trainer task (see the module docstring for the batch)."""

    def __init__(self, config: Qwen3Config, opts: ForwardOptions, grpo: GRPOConfig,
                 aux_loss_coef: float | None = None, window: int = 0):
        self.config, self.opts, self.grpo = config, opts, grpo.validate()
        self.aux_coef = config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef
        self.window = window  # > 0: the LM head runs on the completion positions only (policy_logprobs)

    @classmethod
    def of(cls, config: Qwen3Config, tc: TrainConfig, rules: ShardingRules | None, grpo: GRPOConfig,
           lora: LoraConfig | None = None, window: int = 0) -> "GRPOTask":
        return cls(config, ForwardOptions.of(tc, rules, lora), grpo, tc.aux_loss_coef, window)

    def logprobs(self, params, rows):
        """[b, T] log-probs of the targets under `params` (the forward's params, adapters included)."""
        return policy_logprobs(self.config, params, rows, self.opts, window=self.window)[0]

    def reference_logprobs(self, frozen, rows):
        """[b, T] log-probs under the reference: frozen["ref"], or with LoRA the base without adapters. The
        reference routes by its own router (replayed routes are the sampling policy's)."""
        ref = frozen["ref"] if "ref" in frozen else frozen["base"]
        opts = dataclasses.replace(self.opts, lora=None)
        return policy_logprobs(self.config, ref, {k: v for k, v in rows.items() if k != "routes"}, opts,
                               window=self.window)[0]

    def _sums(self, trainable, frozen, mb):
        params = model_params(trainable, frozen, self.opts.lora)
        logp, ent, mask, aux = policy_logprobs(self.config, params, mb, self.opts, entropy=True, window=self.window)
        ref = mb["ref_logps"] if self.grpo.beta > 0 else logp
        loss, kl, clipped = grpo_token_terms(logp, mb["old_logps"], ref, mb["advantages"], self.grpo)
        w = token_weights(mask, self.grpo)
        m = mask.astype(jnp.float32)
        return {"loss": jnp.sum(w * loss), "kl": jnp.sum(m * kl), "clip_fraction": jnp.sum(m * clipped),
                "entropy": jnp.sum(m * jax.lax.stop_gradient(ent)), "tokens": jnp.sum(m),
                "completions": jnp.sum(mb["weight"].astype(jnp.float32)), "aux": aux}

    def normalizer(self, batch):
        """Completion tokens (token level) or completions (sequence level) in the whole batch."""
        if self.grpo.aggregation == "sequence":
            return jnp.maximum(jnp.sum(batch["weight"].astype(jnp.float32)), 1.0)
        return jnp.maximum(jnp.sum(batch["loss_mask"][..., 1:].astype(jnp.float32)), 1.0)

    def loss(self, trainable, frozen, mb, norm, A):
        sums = self._sums(trainable, frozen, mb)
        return sums["loss"] / norm + self.aux_coef * sums["aux"] / A, sums

    def metrics(self, sums, norm, A):
        tokens = jnp.maximum(sums["tokens"], 1.0)
        return {"loss": sums["loss"] / norm, "kl": sums["kl"] / tokens, "clip_fraction": sums["clip_fraction"] / tokens,
                "entropy": sums["entropy"] / tokens, "aux_loss": sums["aux"] / A}

    def eval_sums(self, trainable, frozen, batch):
        return self._sums(trainable, frozen, batch)

    @staticmethod
    def eval_metrics(sums) -> dict | None:
        if not sums or float(sums["tokens"]) == 0:
            return None
        return {"eval_loss": float(sums["loss"]) / float(sums["tokens"])}

