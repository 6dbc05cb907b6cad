"""Training objectives. A task supplies the loss of one micro-batch, normalised by whole-batch quantities so
that the micro-batch gradients add up to the full batch's, plus its metrics and held-out evaluation. Every
task runs the model through `forward_rows`, which takes explicit `ForwardOptions` (never a TrainConfig).

Rows are [N, T+1] token arrays: inputs are tokens[:, :-1], targets tokens[:, 1:]; segment ids mark packed
documents (0 = padding), and an optional loss_mask (SFT, DPO) marks which targets count."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

import qwen_jax
from qwen_jax import lora as lora_lib
from qwen_jax import moe
from qwen_jax.config import Qwen3Config
from qwen_jax.lora import LoraConfig
from qwen_jax.model import stored_output_head
from qwen_jax.sharding import ShardingRules
from train.config import TrainConfig
from train.losses import cross_entropy


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """How the training forward runs: compute dtype, activation checkpointing, cross-entropy chunking,
    sharding rules and the LoRA adapters' config (None: no adapters)."""
    compute_dtype: str = "float32"
    remat: str = "none"
    ce_chunk: int = 1024
    rules: ShardingRules | None = None
    lora: LoraConfig | None = None

    @classmethod
    def of(cls, tc: TrainConfig, rules: ShardingRules | None, lora: LoraConfig | None = None) -> "ForwardOptions":
        return cls(tc.compute_dtype, tc.remat, tc.ce_chunk, rules, lora)


class Task(Protocol):
    """What the trainer needs from an objective. Batch leaves are [A, b, ...] (A micro-batches)."""

    def normalizer(self, batch) -> jax.Array:
        """The whole batch's denominator (target tokens, pairs, ...)."""

    def loss(self, trainable, frozen, mb, norm, A) -> tuple[jax.Array, dict]:
        """(this micro-batch's share of the loss, its metric sums)."""

    def metrics(self, sums, norm, A) -> dict:
        """Metrics of a step from the summed metric sums."""

    def eval_sums(self, trainable, frozen, batch) -> dict:
        """Held-out sums over one batch (added up across batches)."""

    def eval_metrics(self, sums) -> dict | None:
        """Held-out metrics from the added-up sums (None: nothing was evaluated)."""


class RowsForward(NamedTuple):
    hidden: jax.Array  # [N, T, D] final hidden states (after the norm)
    targets: jax.Array  # [N, T] next tokens
    mask: jax.Array  # [N, T] bool: which targets count
    aux: jax.Array  # MoE load-balancing loss (0 for dense)


def positions_from_segments(seg_BT: jax.Array) -> jax.Array:
    """Positions restarting at 0 at every segment start. [B, T] -> [B, T] int32."""
    B, T = seg_BT.shape
    idx = jnp.arange(T, dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones((B, 1), bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def target_mask(batch) -> jax.Array:
    """Which next-token targets count: [..., T+1] rows -> [..., T] bool. A target counts when it is in the
    same segment as its input, is not padding (segment 0) and, with a loss_mask (SFT), is marked."""
    seg = batch["segment_ids"]
    mask = (seg[..., 1:] == seg[..., :-1]) & (seg[..., 1:] != 0)
    if "loss_mask" in batch:
        mask &= batch["loss_mask"][..., 1:] != 0
    return mask


def model_params(trainable, frozen, lora: LoraConfig | None):
    """The params the forward sees: the trainable tree itself, or with LoRA the frozen base plus adapters."""
    return lora_lib.combine(frozen["base"], trainable) if lora is not None else trainable


def forward_rows(config: Qwen3Config, params, rows, opts: ForwardOptions) -> RowsForward:
    """The forward over packed rows {"tokens", "segment_ids"[, "loss_mask"][, "routes"]} [N, T+1]; `params`
    are the forward's params (with adapters when opts.lora). `routes` [N, T, L_moe, k] (RL's routing
    replay) are the experts each input token goes to in each MoE layer."""
    tokens, seg = rows["tokens"], rows["segment_ids"]
    seg_in = seg[:, :-1]
    routes = jnp.moveaxis(rows["routes"], 2, 0) if "routes" in rows else None  # [L_moe, N, T, k]
    out = qwen_jax.forward(config, params, tokens[:, :-1], positions=positions_from_segments(seg_in),
                           segment_ids=seg_in, dtype=jnp.dtype(opts.compute_dtype), rules=opts.rules,
                           remat=opts.remat, return_hidden=True, lora=opts.lora, routes=routes)
    aux = jnp.float32(0.0)
    if out.router_logits is not None:
        aux = moe.load_balancing_loss(out.router_logits, config.num_experts_per_tok, (seg_in != 0).reshape(-1))
    return RowsForward(out.hidden, tokens[:, 1:], target_mask(rows), aux)


def lm_loss_terms(config: Qwen3Config, params, batch, opts: ForwardOptions, z_weight: float = 0.0):
    """Sums over one micro-batch [b, T+1] -> (ce_sum + z_weight * z_sum (the differentiable one), ce_sum,
    z_sum, aux, n_tokens)."""
    f = forward_rows(config, params, batch, opts)
    b, T, D = f.hidden.shape
    head, axes = stored_output_head(config, params)
    loss, ce, z = cross_entropy(f.hidden.reshape(b * T, D), head, f.targets.reshape(-1), f.mask.reshape(-1),
                                z_weight, opts.ce_chunk, head_axes=axes)
    return loss, ce, z, f.aux, jnp.sum(f.mask)


class LMTask:
    """Next-token cross-entropy over packed rows: pretraining, and SFT when rows carry a loss_mask."""

    def __init__(self, config: Qwen3Config, opts: ForwardOptions, z_loss: float = 0.0,
                 aux_loss_coef: float | None = None):
        self.config, self.opts, self.z_loss = config, opts, z_loss
        self.aux_coef = config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef

    @classmethod
    def of(cls, config: Qwen3Config, tc: TrainConfig, rules: ShardingRules | None,
           lora: LoraConfig | None = None) -> "LMTask":
        return cls(config, ForwardOptions.of(tc, rules, lora), tc.z_loss, tc.aux_loss_coef)

    def normalizer(self, batch):  # leaves [A, b, T+1] -> the batch's target-token count
        return jnp.maximum(jnp.sum(target_mask(batch)), 1)

    def loss(self, trainable, frozen, mb, norm, A):
        loss, ce, z, aux, _ = lm_loss_terms(self.config, model_params(trainable, frozen, self.opts.lora), mb,
                                            self.opts, self.z_loss)
        return loss / norm + self.aux_coef * aux / A, {"ce": ce, "z": z, "aux": aux}

    def metrics(self, sums, norm, A):
        return {"loss": sums["ce"] / norm, "z_loss": sums["z"] / norm, "aux_loss": sums["aux"] / A}

    def eval_sums(self, trainable, frozen, batch):
        _, ce, _, _, n = lm_loss_terms(self.config, model_params(trainable, frozen, self.opts.lora), batch, self.opts)
        return {"ce": ce, "n": n}

    @staticmethod
    def eval_metrics(sums) -> dict | None:
        if not sums or sums["n"] == 0:
            return None
        loss = float(sums["ce"]) / float(sums["n"])
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}


class WeightedExamplesTask:
    """What a task whose loss averages over weighted examples shares (DPO and reward-model pairs). A subclass
    gives `_sums(trainable, frozen, mb)`: sums over the micro-batch's examples of "loss" and of each of its
    METRICS, "n" (the real examples: batches carry weight [b], 0 on evaluation padding) and "aux" (MoE)."""

    METRICS: tuple[str, ...] = ()
    aux_coef: float = 0.0

    def normalizer(self, batch):  # the number of real examples in the whole batch
        return jnp.maximum(jnp.sum(batch["weight"].astype(jnp.float32)), 1.0)

    def loss(self, trainable, frozen, mb, norm, A):
        sums = self._sums(trainable, frozen, mb)
        return sums["loss"] / norm + self.aux_coef * sums["aux"] / A, sums

    def metrics(self, sums, norm, A):
        return {**{k: sums[k] / norm for k in self.METRICS}, "aux_loss": sums["aux"] / A}

    def eval_sums(self, trainable, frozen, batch):
        return self._sums(trainable, frozen, batch)

    def eval_metrics(self, sums) -> dict | None:
        if not sums or float(sums["n"]) == 0:
            return None
        n = float(sums["n"])
        return {f"eval_{k}": float(sums[k]) / n for k in self.METRICS}
