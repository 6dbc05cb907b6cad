"""The trainer: state, the jitted train/eval steps, and the loop with checkpoints and metrics.

State is a plain pytree {"params", "opt_state", "step", "rng"}. Params are the master weights
(`param_dtype`, default float32); the forward runs in `compute_dtype`. Gradient accumulation scans over
micro-batches inside one jitted step and normalises by the whole batch's token count, so accumulating
A micro-batches gives the gradient of the full batch. The objective is a task (train/tasks.py).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from qwen_jax.cli import check_interrupt, deferred_interrupts, say
from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError
from qwen_jax.sharding import ShardingRules
from train.checkpointing import Checkpointer
from train.config import TrainConfig
from train.data import RowDataset
from train.metrics import MetricsLogger, flops_per_token, peak_flops
from train.optim import lr_schedule, make_optimizer
from train.placement import put_batch
from train.tasks import LMTask, Task


def make_train_step(config: Qwen3Config, tc: TrainConfig, optimizer, rules: ShardingRules | None,
                    shardings=None, task: Task | None = None):
    """The jitted step (state, batch, frozen=None) -> (state, metrics); the state is donated. `shardings`
    (a tree like the state, e.g. `state_shardings(state)`) pins the new state to the same placement as the
    old. `task` defines the objective (default: LMTask); `frozen` holds what is not trained (the LoRA base,
    a DPO reference model)."""
    task = task or LMTask.of(config, tc, rules)
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


def make_eval_step(config: Qwen3Config, tc: TrainConfig, rules: ShardingRules | None, task: Task | None = None):
    task = task or LMTask.of(config, tc, rules)
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


def evaluate(eval_step, params, ds: RowDataset, batch_size: int, max_batches: int, rules, task: Task | None = None,
             frozen=None) -> dict | None:
    """The task's held-out metrics over up to `max_batches` batches (None if there is no held-out data).
    For the LM task: {"eval_loss": mean token cross-entropy, "eval_ppl"}."""
    total = None
    for batch in ds.sequential(batch_size, max_batches):
        check_interrupt()
        sums = jax.device_get(eval_step(params, put_batch(batch, rules), frozen))
        total = sums if total is None else jax.tree.map(lambda a, b: a + b, total, sums)
    return (task or LMTask).eval_metrics(total)


def fit(config: Qwen3Config, tc: TrainConfig, params, train_ds: RowDataset, eval_ds: RowDataset | None,
        out_dir: str, rules: ShardingRules, *, resume: bool = False, meta: dict | None = None,
        progress: bool = True, task: Task | None = None, frozen=None) -> dict[str, Any]:
    """Train `params` (the trainable tree: all weights, or LoRA adapters with the base in `frozen`) for
    tc.steps optimizer steps, resuming from out_dir/checkpoints when asked. `train_ds` is a RowDataset, or
    a batch source that samples from the policy being trained (RL: train.rollout.RolloutSource): one with
    `needs_params = True` gets `current`, a function returning the parameters of the moment, as a fourth
    argument of `batches`, and its `last_metrics` are logged with each step. Returns {"state", "step",
    "resumed_from", "train_loss", "eval_loss", "eval" (the task's held-out metrics), "last" (last logged)}.
    An interruption (Ctrl-C, SIGTERM) stops the loop between steps, logs and saves a checkpoint of the last
    completed step, and propagates with a message saying what was saved."""
    tc.validate()
    check_interrupt()
    task = task or LMTask.of(config, tc, rules)
    optimizer = make_optimizer(tc)
    state = init_state(params, optimizer, tc.seed)
    ckpt = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=tc.keep)
    data_state, resumed_from = None, None
    if ckpt.latest_step() is not None:
        if not resume:
            ckpt.close()
            raise ConfigError(f"{out_dir} already has checkpoints (step {ckpt.latest_step()}): pass --resume to "
                              f"continue, or choose another --out")
        state, data_state, _ = ckpt.restore_latest(state, say)
        resumed_from = int(state["step"])
    is_main = jax.process_index() == 0
    logger = MetricsLogger(out_dir, resume_step=resumed_from, enabled=is_main)
    train_step = make_train_step(config, tc, optimizer, rules, state_shardings(state), task)
    eval_step = make_eval_step(config, tc, rules, task)
    micro = tc.batch_size // tc.grad_accum
    if getattr(train_ds, "needs_params", False):  # a batch source that samples from the current policy (RL)
        batches = train_ds.batches(tc.batch_size, tc.seed, data_state, lambda: state["params"])
    else:
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

    t0, steps_since, waited = time.perf_counter(), 0, 0.0
    step = saved = start
    unlogged = None  # the newest step's metrics while not yet in metrics.jsonl

    def log_step(step, metrics):
        nonlocal t0, steps_since, waited
        metrics = jax.device_get(metrics)
        dt = time.perf_counter() - t0
        tok_s = steps_since * tokens_per_step / dt
        mfu = tok_s * fpt / (peak * jax.device_count()) if peak else None
        if not math.isfinite(float(metrics["loss"])):
            raise FloatingPointError(f"loss became {metrics['loss']} at step {step}")
        timing = {"tokens_per_s": tok_s, "mfu": mfu, "step_s": dt / max(steps_since, 1),
                  "batch_s": waited / max(steps_since, 1)}  # batch_s: waiting for data (RL: the rollout)
        source = getattr(train_ds, "last_metrics", {})
        if "batch_tokens" in source:  # a source that counts its real tokens (RL): training throughput alone
            timing["train_tokens_per_s"] = source["batch_tokens"] / max(timing["step_s"] - timing["batch_s"], 1e-9)
        logger.log(step, {**metrics, **timing, **source})
        waited = 0.0
        last["train_loss"] = float(metrics["loss"])
        last["last"] = {k: float(v) for k, v in metrics.items()}
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tok_s:,.0f}",
                        **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
        t0, steps_since = time.perf_counter(), 0

    try:
        with deferred_interrupts():  # signals stop the loop between steps, never inside one
            while step < tc.steps:
                check_interrupt()
                t_batch = time.perf_counter()
                batch, next_data_state = next(batches)
                waited += time.perf_counter() - t_batch
                batch = {k: v.reshape(tc.grad_accum, micro, *v.shape[1:]) for k, v in batch.items()}
                state, metrics = train_step(state, put_batch(batch, rules, lead=1), frozen)
                step, data_state = step + 1, next_data_state
                steps_since += 1
                unlogged = (step, metrics)
                save = step % tc.save_every == 0 or step == tc.steps
                if step % tc.log_every == 0 or save:  # every checkpointed step is in metrics.jsonl
                    log_step(step, metrics)
                    unlogged = None
                bar.update(1)
                if eval_ds is not None and tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                    run_eval(step)
                    t0 = time.perf_counter()
                if save:
                    ckpt.save(step, state, data_state, meta, force=step == tc.steps)
                    saved = step
            check_interrupt()
        bar.close()
        if eval_ds is not None:
            last["eval"] = run_eval(step)
            last["eval_loss"] = last["eval"]["eval_loss"] if last["eval"] else None
    except KeyboardInterrupt as e:
        intact = not any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array))
        if step > saved and intact:
            if unlogged is not None and unlogged[0] == step:
                log_step(*unlogged)
            ckpt.save(step, state, data_state, meta, force=True)
            saved = step
        where = os.path.join(out_dir, "checkpoints")
        e.args = (f"interrupted at step {step}: checkpoint {saved} is in {where}; continue with --resume"
                  if saved else "interrupted before the first step: nothing was saved",)
        raise
    finally:
        bar.close()
        ckpt.close()
        logger.close()
    return {"state": state, "step": step, "resumed_from": resumed_from, **last}
