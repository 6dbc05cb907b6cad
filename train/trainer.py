"""The sharded trainer: state, optimizer, jitted train/eval steps, and the loop with checkpoints and metrics.

State is a plain pytree {"params", "opt_state", "step", "rng"}. Params are the master weights
(`param_dtype`, default float32); the forward runs in `compute_dtype`. Gradient accumulation scans over
micro-batches inside one jitted step and normalises by the whole batch's token count, so accumulating
A micro-batches gives the gradient of the full batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import qwen_jax
from qwen_jax import lora as lora_lib
from qwen_jax import moe
from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError
from qwen_jax.lora import LoraConfig
from qwen_jax.model import output_head
from qwen_jax.sharding import ShardingRules
from train.checkpointing import Checkpointer
from train.data import RowDataset
from train.losses import chunked_cross_entropy
from train.metrics import MetricsLogger, flops_per_token, peak_flops


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

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.steps > 0, f"--steps must be positive, got {self.steps}")
        need(self.seq_len > 0, f"--seq-len must be positive, got {self.seq_len}")
        need(self.grad_accum >= 1 and self.batch_size % self.grad_accum == 0,
             f"--batch-size ({self.batch_size}) must be a positive multiple of --grad-accum ({self.grad_accum})")
        need(self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "--lr must be positive and --min-lr-ratio in [0, 1]")
        need(0 <= self.warmup_steps <= self.steps, f"--warmup ({self.warmup_steps}) must be in [0, --steps]")
        need(self.remat in qwen_jax.model.REMAT_POLICIES,
             f"--remat must be one of {list(qwen_jax.model.REMAT_POLICIES)}, got {self.remat!r}")
        for name in ("compute_dtype", "param_dtype"):
            need(getattr(self, name) in ("float32", "bfloat16", "float16"),
                 f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
        need(self.keep >= 1 and self.save_every >= 1, "--keep and --save-every must be >= 1")


def lr_schedule(tc: TrainConfig):
    """Linear warmup to tc.lr over warmup_steps (step 0 already trains), then cosine to lr * min_lr_ratio."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.float32(max(tc.warmup_steps, 1))
        progress = jnp.clip((step - tc.warmup_steps) / max(tc.steps - tc.warmup_steps, 1), 0.0, 1.0)
        cosine = tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return tc.lr * jnp.where(step < tc.warmup_steps, (step + 1) / warm, cosine)

    return schedule


def weight_decay_mask(params):
    """True where weight decay applies: every matrix except norm scales and biases."""
    def decays(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any("norm" in n or n.endswith("bias") for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=weight_decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw) if tc.clip_norm else adamw


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


def lm_loss_terms(config: Qwen3Config, tc: TrainConfig, params, batch, rules: ShardingRules | None,
                  lora: LoraConfig | None = None):
    """Sums over one micro-batch {"tokens", "segment_ids"[, "loss_mask"]}: [b, T+1] ->
    (ce_sum, z_sum, aux, n_tokens). `params` are the forward's params (with adapters when `lora`)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    inputs, targets, seg_in = tokens[:, :-1], tokens[:, 1:], seg[:, :-1]
    mask = target_mask(batch)  # never predict across a document boundary
    out = qwen_jax.forward(config, params, inputs, positions=positions_from_segments(seg_in), segment_ids=seg_in,
                           dtype=jnp.dtype(tc.compute_dtype), rules=rules, remat=tc.remat, return_hidden=True,
                           lora=lora)
    b, T, D = out.hidden.shape
    ce, z = chunked_cross_entropy(out.hidden.reshape(b * T, D), output_head(config, params), targets.reshape(-1),
                                  mask.reshape(-1), tc.ce_chunk)
    aux = jnp.float32(0.0)
    if out.router_logits is not None:
        aux = moe.load_balancing_loss(out.router_logits, config.num_experts_per_tok, (seg_in != 0).reshape(-1))
    return ce, z, aux, jnp.sum(mask)


class LMTask:
    """Next-token cross-entropy over packed rows: pretraining, and SFT when rows carry a loss_mask.

    A task supplies the objective of one micro-batch, normalised by whole-batch quantities so that the
    micro-batch gradients add up to the full batch's, plus its metrics and held-out evaluation."""

    def __init__(self, config: Qwen3Config, tc: TrainConfig, rules: ShardingRules | None,
                 lora: LoraConfig | None = None):
        self.config, self.tc, self.rules, self.lora = config, tc, rules, lora
        self.aux_coef = config.router_aux_loss_coef if tc.aux_loss_coef is None else tc.aux_loss_coef

    def normalizer(self, batch):  # leaves [A, b, T+1] -> the batch's target-token count
        return jnp.maximum(jnp.sum(target_mask(batch)), 1)

    def loss(self, trainable, frozen, mb, norm, A):
        ce, z, aux, _ = lm_loss_terms(self.config, self.tc, model_params(trainable, frozen, self.lora), mb,
                                      self.rules, self.lora)
        return ce / norm + self.tc.z_loss * z / norm + self.aux_coef * aux / A, {"ce": ce, "z": z, "aux": aux}

    def metrics(self, sums, norm, A):
        return {"loss": sums["ce"] / norm, "z_loss": sums["z"] / norm, "aux_loss": sums["aux"] / A}

    def eval_sums(self, trainable, frozen, batch):
        ce, _, _, n = lm_loss_terms(self.config, self.tc, model_params(trainable, frozen, self.lora), batch,
                                    self.rules, self.lora)
        return {"ce": ce, "n": n}

    @staticmethod
    def eval_metrics(sums) -> dict | None:
        if not sums or sums["n"] == 0:
            return None
        loss = float(sums["ce"]) / float(sums["n"])
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}


def make_train_step(config: Qwen3Config, tc: TrainConfig, optimizer, rules: ShardingRules | None,
                    shardings=None, task=None):
    """The jitted step (state, batch, frozen=None) -> (state, metrics); the state is donated. `shardings`
    (a tree like the state, e.g. `state_shardings(state)`) pins the new state to the same placement as the
    old. `task` defines the objective (default: LMTask); `frozen` holds what is not trained (the LoRA base,
    a DPO reference model)."""
    task = task or LMTask(config, tc, rules)
    schedule = lr_schedule(tc)

    def step(state, batch, frozen=None):  # batch leaves: [A, b, ...]
        A = jax.tree.leaves(batch)[0].shape[0]
        norm = task.normalizer(batch)

        def micro(carry, mb):
            g_acc, s_acc = carry
            (_, sums), g = jax.value_and_grad(task.loss, has_aux=True)(state["params"], frozen, mb, norm, A)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
            lambda: task.loss(state["params"], frozen, jax.tree.map(lambda x: x[0], batch), norm, A)[1]))
        (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.split(state["rng"])[0]}
        metrics = {**task.metrics(sums, norm, A), "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state["step"])}
        return new_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))


def make_eval_step(config: Qwen3Config, tc: TrainConfig, rules: ShardingRules | None, task=None):
    task = task or LMTask(config, tc, rules)
    return jax.jit(lambda params, batch, frozen=None: task.eval_sums(params, frozen, batch))


def init_state(params, optimizer, seed: int):
    """Fresh train state. The optimizer state is created eagerly, not under jit: eager zeros_like keeps each
    moment on its parameter's sharding, whereas under jit the zeros would come out unsharded. Scalars (step,
    RNG, optimizer counts) are replicated over the params' mesh."""
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0),
             "rng": jax.random.PRNGKey(seed)}
    first = jax.tree.leaves(params)[0].sharding
    if not isinstance(first, NamedSharding):
        return state
    replicated = NamedSharding(first.mesh, P())

    def place(x):
        on_mesh = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == first.mesh
        return x if on_mesh else jax.device_put(x, replicated)

    return jax.tree.map(place, state)


def state_shardings(state):
    return jax.tree.map(lambda x: x.sharding, state)


def batch_names(x: np.ndarray, lead: int) -> tuple:
    """Logical names for a batch array: `lead` leading axes unsharded (grad-accum), then the batch axis."""
    return (None,) * lead + ("act_batch",) + (None,) * (x.ndim - lead - 1)


def put_batch(batch: dict[str, np.ndarray], rules: ShardingRules, names=None, lead: int = 0) -> dict[str, jax.Array]:
    """Global numpy batch (identical on every process) -> global arrays sharded by logical `names` (default:
    the batch axis after `lead` leading axes); each device receives only its own block, whatever the mesh."""
    out = {}
    for k, x in batch.items():
        nm = names if names is not None else batch_names(x, lead)
        out[k] = jax.make_array_from_callback(x.shape, rules.sharding(nm, x.shape), lambda idx, x=x: x[idx])
    return out


def evaluate(eval_step, params, ds: RowDataset, batch_size: int, max_batches: int, rules, task=None,
             frozen=None) -> dict | None:
    """The task's held-out metrics over up to `max_batches` batches (None if there is no held-out data).
    For the LM task: {"eval_loss": mean token cross-entropy, "eval_ppl"}."""
    total = None
    for batch in ds.sequential(batch_size, max_batches):
        sums = jax.device_get(eval_step(params, put_batch(batch, rules), frozen))
        total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
    return (task or LMTask).eval_metrics(total)


def fit(config: Qwen3Config, tc: TrainConfig, params, train_ds: RowDataset, eval_ds: RowDataset | None,
        out_dir: str, rules: ShardingRules, *, resume: bool = False, meta: dict | None = None,
        progress: bool = True, task=None, frozen=None) -> dict[str, Any]:
    """Train `params` (the trainable tree: all weights, or LoRA adapters with the base in `frozen`) for
    tc.steps optimizer steps, resuming from out_dir/checkpoints when asked. Returns {"state", "step",
    "resumed_from", "train_loss", "eval_loss", "eval" (the task's held-out metrics), "last" (last logged)}."""
    tc.validate()
    task = task or LMTask(config, tc, rules)
    optimizer = make_optimizer(tc)
    state = init_state(params, optimizer, tc.seed)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=tc.keep)
    data_state, resumed_from = None, None
    if ckpt.latest_step() is not None:
        if not resume:
            raise ConfigError(f"{out_dir} already has checkpoints (step {ckpt.latest_step()}): pass --resume to "
                              f"continue, or choose another --out")
        state, data_state, _ = ckpt.restore(state)
        resumed_from = int(state["step"])
    is_main = jax.process_index() == 0
    logger = MetricsLogger(out_dir, resume_step=resumed_from, enabled=is_main)
    train_step = make_train_step(config, tc, optimizer, rules, state_shardings(state), task)
    eval_step = make_eval_step(config, tc, rules, task)
    micro = tc.batch_size // tc.grad_accum
    batches = train_ds.batches(tc.batch_size, tc.seed, data_state)
    tokens_per_step = tc.batch_size * tc.seq_len
    fpt, peak = flops_per_token(config, tc.seq_len), peak_flops()
    start = int(state["step"])
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", disable=not (progress and is_main) or None,
               dynamic_ncols=True)
    last = {"train_loss": None, "eval_loss": None, "eval": None, "last": None}

    def run_eval(step):
        ev = evaluate(eval_step, state["params"], eval_ds, micro, tc.eval_batches, rules, task, frozen)
        if ev is not None:
            logger.log(step, ev)
        return ev

    t0, steps_since = time.perf_counter(), 0
    step = start
    try:
        while step < tc.steps:
            batch, data_state = next(batches)
            batch = {k: v.reshape(tc.grad_accum, micro, *v.shape[1:]) for k, v in batch.items()}
            state, metrics = train_step(state, put_batch(batch, rules, lead=1), frozen)
            step += 1
            steps_since += 1
            if step % tc.log_every == 0 or step == tc.steps:
                metrics = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                tok_s = steps_since * tokens_per_step / dt
                mfu = tok_s * fpt / (peak * jax.device_count()) if peak else None
                record = {**metrics, "tokens_per_s": tok_s, "mfu": mfu}
                if not math.isfinite(float(metrics["loss"])):
                    raise FloatingPointError(f"loss became {metrics['loss']} at step {step}")
                logger.log(step, record)
                last["train_loss"] = float(metrics["loss"])
                last["last"] = {k: float(v) for k, v in metrics.items()}
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tok_s:,.0f}",
                                **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
                t0, steps_since = time.perf_counter(), 0
            bar.update(1)
            if eval_ds is not None and tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                run_eval(step)
                t0 = time.perf_counter()
            if step % tc.save_every == 0 or step == tc.steps:
                ckpt.save(step, state, data_state, meta, force=step == tc.steps)
    except KeyboardInterrupt:
        if step > start:
            ckpt.save(step, state, data_state, meta, force=True)
        ckpt.close()
        bar.close()
        logger.close()
        raise
    bar.close()
    if eval_ds is not None:
        last["eval"] = run_eval(step)
        last["eval_loss"] = last["eval"]["eval_loss"] if last["eval"] else None
    ckpt.close()
    logger.close()
    return {"state": state, "step": step, "resumed_from": resumed_from, **last}
