"""RL rollouts in the trainer's process: the paged engine (infer.Engine) runs on the trainer's mesh and reads
the trainer's current parameters (no host copy, no checkpoint round trip, no second model; with LoRA it
serves the merged view). Each step samples G completions of P prompts, scores them, and hands the trainer
one GRPO batch.

Sampling seeds come from (run seed, step, prompt index) per request, and the engine derives each sample's
own from the request's; the engine forgets its prefix cache whenever the weights change. A resumed run
therefore samples exactly what the uninterrupted run sampled. With `inner_steps` mu > 1 each rollout batch
serves mu optimizer steps (its old log-probs stay those of the policy that sampled it); it is kept in
out/rollouts/ so that a run stopped between two inner steps resumes on the same batch.

`RolloutSource` is a batch source for `train.trainer.fit`: `batches(batch_size, seed, state, current)`
yields (batch, data state after it) forever, where `current()` returns the trainer's parameters now; its
`last_metrics` (rewards, lengths, time split) are logged with each step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import numpy as np

from infer.engine import Engine
from infer.sampling import SamplingParams
from kernels.util import cdiv
from qwen_jax import lora as lora_lib
from qwen_jax.config import Qwen3Config
from qwen_jax.errors import DataError
from qwen_jax.sharding import ShardingRules
from train import rewards as R
from train.chat_data import BadLines, check_messages, read_lines
from train.data import shuffled_batches
from train.placement import put_batch
from train.rl import GRPOTask, group_advantages
from train.tasks import model_params


@dataclasses.dataclass(frozen=True)
class Prompt:
    where: str  # "file:line", for messages
    text: str  # as the model sees it (the chat template applied to messages)
    ids: tuple[int, ...]
    info: dict  # the line's other fields (e.g. "answer")


def read_prompts(path: str, tok, max_prompt_len: int, enable_thinking: bool | None = None,
                 strict: bool = False) -> tuple[list[Prompt], BadLines, int]:
    """Prompts of a JSONL file: {"prompt": str} (used as is) or {"messages": [...]} (rendered with the chat
    template and its generation prompt), plus any fields the rewards read. -> (prompts, skipped lines, lines
    read)."""
    bad, out = BadLines(path, strict), []
    for n, obj in read_lines(path, bad):
        text, err = obj.get("prompt"), None
        if "messages" in obj:
            err = check_messages(obj["messages"])
            if err is None:
                try:
                    text = tok.apply_chat_template(obj["messages"], tokenize=False, add_generation_prompt=True,
                                                   enable_thinking=enable_thinking)
                except Exception as e:  # jinja's TemplateError, raise_exception() in templates
                    err = f"the chat template rejected it ({e})"
        elif not isinstance(text, str) or not text.strip():
            err = "expected a non-empty string 'prompt' or a 'messages' list"
        if err is None:
            ids = tok.encode(text)
            if len(ids) > max_prompt_len:
                err = f"{len(ids)} prompt tokens, more than --max-prompt-len {max_prompt_len}"
        if err is not None:
            bad.add(n, err)
            continue
        info = {k: v for k, v in obj.items() if k != "prompt"}  # messages stay: a reward model reads them
        out.append(Prompt(f"{path}:{n}", text, tuple(ids), info))
    return out, bad, bad.total


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 8  # P: a step's batch is P x G completions
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    reuse_logprobs: bool = False  # take the old policy's log-probs from the engine (the contract)
    routing_replay: bool = False  # MoE: record the engine's experts; the trainer's forward uses them
    inner_steps: int = 1  # optimizer steps on each rollout batch (mu; the ratio leaves 1 from the second on)
    block_size: int = 16


class RolloutSource:
    needs_params = True  # fit passes `current`: the trainer's parameters at each step

    def __init__(self, config: Qwen3Config, tok, rules: ShardingRules, prompts: list[Prompt], rewards: list,
                 task: GRPOTask, rc: RolloutConfig, row_len: int, micro: int, frozen=None, lora=None,
                 compute_dtype: str = "float32", out_dir: str | None = None):
        if len(prompts) < rc.prompts_per_step:
            raise DataError(f"{len(prompts)} usable prompts, fewer than --prompts-per-step {rc.prompts_per_step}")
        self.config, self.tok, self.rules, self.prompts = config, tok, rules, prompts
        self.rewards, self.task, self.rc, self.row_len, self.micro = rewards, task, rc, row_len, micro
        self.frozen, self.lora, self.dtype = frozen, lora, compute_dtype
        if rc.inner_steps > 1 and out_dir is None:
            raise ValueError("inner_steps > 1 keeps each rollout batch in out_dir (for --resume): give out_dir")
        self.saved = os.path.join(out_dir, "rollouts") if out_dir else None
        self.G = task.grpo.group_size
        self.engine: Engine | None = None
        self.last_metrics: dict = {}
        self._logp = jax.jit(lambda trainable, frozen, rows: task.logprobs(model_params(trainable, frozen, lora), rows))
        self._ref = jax.jit(task.reference_logprobs)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def _engine(self, params) -> Engine:
        rows = self.rc.prompts_per_step * self.G
        if self.engine is None:
            self.engine = Engine(self.config, params, self.tok, self.rules, max_model_len=self.row_len,
                                 block_size=self.rc.block_size, max_num_seqs=rows,
                                 max_num_batched_tokens=max(1024, self.row_len),
                                 num_kv_blocks=rows * cdiv(self.row_len, self.rc.block_size) + 1,
                                 dtype=jax.numpy.dtype(self.dtype), record_routes=self.rc.routing_replay)
        else:
            self.engine.update_params(params)
        return self.engine

    def batches(self, batch_size: int, seed: int, state: dict | None, current: Callable):
        P = self.rc.prompts_per_step
        if batch_size != P * self.G:
            raise ValueError(f"batch_size {batch_size} != prompts_per_step x group_size = {P * self.G}")
        mu, state = self.rc.inner_steps, dict(state or {})
        inner, number = state.pop("inner", 0), state.pop("rollout", None)

        def groups():  # (rollout batch, its number, data state after it, first inner step to take)
            if inner:  # resumed between two inner steps of a rollout: its batch is on disk
                yield self._load(number), number, state, inner
            for chosen, step, nxt in shuffled_batches(len(self.prompts), P, seed, state or None):
                batch = self.rollout(current(), [int(i) for i in chosen], seed, step)
                if mu > 1:
                    self._save(step, batch)
                yield batch, step, nxt, 0

        for batch, number, nxt, first in groups():
            for j in range(first, mu):
                self.last_metrics = {**self.last_metrics, "inner_step": j}
                yield batch, {**nxt, "inner": (j + 1) % mu, "rollout": number}

    def _save(self, number: int, batch: dict) -> None:
        """Keep a rollout batch and its metrics (and the one before) for a resume between its inner steps;
        atomic."""
        if jax.process_index() != 0:
            return
        os.makedirs(self.saved, exist_ok=True)
        tmp = os.path.join(self.saved, f"{number}.incomplete.npz")
        np.savez(tmp, **batch, _metrics=np.asarray(json.dumps(self.last_metrics)))
        os.replace(tmp, os.path.join(self.saved, f"{number}.npz"))
        for name in os.listdir(self.saved):
            stem = name.removesuffix(".npz")
            if stem.isdigit() and int(stem) < number - 1:
                os.remove(os.path.join(self.saved, name))

    def _load(self, number: int) -> dict:
        """A kept rollout batch; its metrics become last_metrics again."""
        path = os.path.join(self.saved or "", f"{number}.npz")
        if not os.path.exists(path):
            raise DataError(f"cannot resume between the inner steps of rollout {number}: {path} is missing "
                            f"(only the last two rollouts are kept)")
        with np.load(path) as f:
            batch = {k: f[k] for k in f.files}
        self.last_metrics = json.loads(str(batch.pop("_metrics")))
        return batch

    def sampling(self, seed: int, step: int | None, prompt_index: int) -> SamplingParams:
        """G samples of one prompt; the request's seed comes from (run seed, step, prompt index), or for
        held-out evaluation (step None) from (run seed, prompt index) alone, the same at every evaluation."""
        key = [seed, 0, step, prompt_index] if step is not None else [seed, 1, prompt_index]
        request_seed = int(np.random.SeedSequence(key).generate_state(1)[0] >> 1)
        return SamplingParams(n=self.G, max_tokens=self.rc.max_new_tokens, temperature=self.rc.temperature,
                              top_p=self.rc.top_p, seed=request_seed, logprobs=0 if self.rc.reuse_logprobs else None)

    def generate(self, trainable, prompts: list[Prompt], params_list: list[SamplingParams]):
        """Completions of `prompts` under `trainable` -> the engine's RequestOutputs."""
        view = lora_lib.merge(self.frozen["base"], trainable, self.lora) if self.lora is not None else trainable
        engine = self._engine(view)
        streams = engine.add_requests([list(p.ids) for p in prompts], params_list)
        try:
            bad = next((s for s in streams if isinstance(s, Exception)), None)
            if bad is not None:  # prompts were checked when read: this is a bug, not bad input
                raise RuntimeError(f"a rollout request was refused: {bad}")
            return [s.result() for s in streams]
        finally:
            for s in streams:
                if not isinstance(s, Exception):
                    s.close()

    def score(self, prompts: list[Prompt], outs) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """-> (weighted total rewards [len(prompts), n], each reward's values {name: [len(prompts) * n]})."""
        items = [R.Scored(p.text, c.text, {**p.info, "completion_tokens": len(c.token_ids),
                                           "completion_token_ids": c.token_ids}, p.where)
                 for p, out in zip(prompts, outs) for c in out.outputs]
        per = R.score(self.rewards, items)
        return R.total(self.rewards, per).reshape(len(prompts), -1), per

    def rollout(self, trainable, indices: list[int], seed: int, step: int) -> dict:
        """One GRPO batch [P*G, T+1] from fresh samples of prompts[indices] under `trainable`; T+1 is the
        longest prompt + completion rounded up to a power of two, at most row_len."""
        jax.block_until_ready(trainable)  # the last training step may still run: its time is not the rollout's
        t0 = time.perf_counter()
        prompts = [self.prompts[i] for i in indices]
        outs = self.generate(trainable, prompts, [self.sampling(seed, step, i) for i in indices])
        t1 = time.perf_counter()
        rewards, per_reward = self.score(prompts, outs)
        adv = group_advantages(rewards, self.task.grpo.scale_std)
        # Rows as long as this batch needs, in powers of two (few shapes to compile), at most row_len.
        longest = max(len(p.ids) + len(c.token_ids) for p, o in zip(prompts, outs) for c in o.outputs)
        n, T1 = len(indices) * self.G, min(self.row_len, max(16, 1 << (longest - 1).bit_length()))
        batch = {"tokens": np.zeros((n, T1), np.int32), "segment_ids": np.zeros((n, T1), np.int32),
                 "loss_mask": np.zeros((n, T1), np.int8), "old_logps": np.zeros((n, T1 - 1), np.float32),
                 "ref_logps": np.zeros((n, T1 - 1), np.float32), "advantages": adv.reshape(-1),
                 "weight": np.ones(n, np.float32)}
        if self.rc.routing_replay:  # positions without a recorded route (padding) get experts 0..k-1
            c = self.config
            L = sum(c.is_moe_layer(i) for i in range(c.num_layers))
            batch["routes"] = np.broadcast_to(np.arange(c.num_experts_per_tok, dtype=np.int32),
                                              (n, T1 - 1, L, c.num_experts_per_tok)).copy()
        lengths = []
        for r, (pr, out) in enumerate((pr, c) for pr, o in zip(prompts, outs) for c in o.outputs):
            prompt, comp = list(pr.ids), list(out.token_ids)
            ids = (prompt + comp)[:T1]
            p, k = len(prompt), len(ids) - len(prompt)
            batch["tokens"][r, :len(ids)], batch["segment_ids"][r, :len(ids)] = ids, 1
            batch["loss_mask"][r, p:len(ids)] = 1
            if self.rc.routing_replay:
                batch["routes"][r, :len(out.routes)] = out.routes[:T1 - 1]
            if self.rc.reuse_logprobs:  # the engine's log-prob of each sampled token (the chosen one first)
                batch["old_logps"][r, p - 1:p - 1 + k] = [next(iter(lp.values())) for lp in out.logprobs[:k]]
            lengths.append(k)
        t2 = time.perf_counter()
        if not self.rc.reuse_logprobs:
            batch["old_logps"] = self._forward(self._logp, trainable, self.frozen, batch)
        t3 = time.perf_counter()
        if self.task.grpo.beta > 0:
            batch["ref_logps"] = self._forward(lambda _, frozen, rows: self._ref(frozen, rows), None, self.frozen,
                                               batch)
        t4 = time.perf_counter()
        zero = float(np.mean(np.all(np.isclose(rewards, rewards[:, :1]), axis=1)))
        self.last_metrics = {
            "reward": float(rewards.mean()), "reward_std": float(rewards.std()), "zero_advantage_groups": zero,
            "completion_tokens": float(np.mean(lengths)), "rollout_s": t1 - t0, "old_logprobs_s": t3 - t2,
            "reference_s": t4 - t3, "rollout_tokens_per_s": sum(lengths) / max(t1 - t0, 1e-9),
            "batch_tokens": int(batch["segment_ids"].sum()),  # real prompt + completion tokens
            **{f"reward/{k}": float(np.mean(v)) for k, v in per_reward.items()},
            **{f"reward/{k}_std": float(np.std(v)) for k, v in per_reward.items()}}
        return batch

    def _forward(self, fn, trainable, frozen, batch) -> np.ndarray:
        """[n, T] log-probs of a whole batch, micro-batch by micro-batch."""
        out = []
        rows = {k: batch[k] for k in ("tokens", "segment_ids", "loss_mask", "routes") if k in batch}
        for s in range(0, len(batch["tokens"]), self.micro):
            mb = {k: v[s:s + self.micro] for k, v in rows.items()}
            out.append(np.asarray(jax.device_get(fn(trainable, frozen, put_batch(mb, self.rules)))))
        return np.concatenate(out).astype(np.float32)
