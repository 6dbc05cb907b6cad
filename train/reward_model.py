"""Reward models: the pairwise (Bradley-Terry) objective as a trainer task, the starting weights, and the
reward-model reward of GRPO.

A reward model is a Qwen3 sequence classifier with one label (qwen_jax.classifier): the score of a whole
conversation is the score head at its last non-pad token. For a prompt with a chosen and a rejected reply,
scored r_w and r_l, the loss is

    -log sigmoid(r_w - r_l) + center * (r_w + r_l)^2

(Bradley-Terry, as in InstructGPT; `center` > 0 keeps the scores near zero, the centring term of TRL's
reward trainer). Metrics: loss, accuracy (the share of pairs with r_w > r_l), margin (mean r_w - r_l), and
the mean chosen and rejected scores, on training and held-out pairs.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax import moe
from qwen_jax.classifier import as_classifier, init_score_head, pooled_scores
from qwen_jax.config import Qwen3Config
from qwen_jax.errors import ConfigError, DataError
from qwen_jax.lora import LoraConfig
from qwen_jax.sharding import ShardingRules
from train.config import TrainConfig
from train.tasks import ForwardOptions, WeightedExamplesTask, model_params, positions_from_segments

METRICS = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")


def pairwise_loss(r_w, r_l, center: float = 0.0):
    """Per-pair Bradley-Terry losses [N] from chosen and rejected scores [N]."""
    return -jax.nn.log_sigmoid(r_w - r_l) + center * (r_w + r_l) ** 2


def pair_scores(config: Qwen3Config, params, rows, opts: ForwardOptions):
    """Scores of every sequence of a pair batch: tokens / segment_ids [N, 2, T] -> ([N, 2] f32, MoE aux)."""
    import qwen_jax

    tokens = rows["tokens"].reshape(-1, rows["tokens"].shape[-1])  # [2N, T]: chosen and rejected interleaved
    seg = rows["segment_ids"].reshape(tokens.shape)
    out = qwen_jax.forward(config, params, tokens, positions=positions_from_segments(seg), segment_ids=seg,
                           dtype=jnp.dtype(opts.compute_dtype), rules=opts.rules, remat=opts.remat,
                           return_hidden=True, lora=opts.lora)
    aux = jnp.float32(0.0)
    if out.router_logits is not None:
        aux = moe.load_balancing_loss(out.router_logits, config.num_experts_per_tok, (seg != 0).reshape(-1))
    return pooled_scores(config, params, tokens, out.hidden)[:, 0].reshape(-1, 2), aux


class RewardModelTask(WeightedExamplesTask):
    """The pairwise objective as a trainer task. Batches: tokens / segment_ids [b, 2, T] (chosen, rejected;
    padded with the pad token, segment 0), weight [b] (0 on evaluation padding)."""

    METRICS = METRICS

    def __init__(self, config: Qwen3Config, opts: ForwardOptions, center: float = 0.0,
                 aux_loss_coef: float | None = None):
        if config.num_labels != 1:
            raise ConfigError(f"a reward model has one score (num_labels 1), this config has {config.num_labels}")
        self.config, self.opts, self.center = config, opts, center
        self.aux_coef = config.router_aux_loss_coef if aux_loss_coef is None else aux_loss_coef

    @classmethod
    def of(cls, config: Qwen3Config, tc: TrainConfig, rules: ShardingRules | None, center: float = 0.0,
           lora: LoraConfig | None = None) -> "RewardModelTask":
        return cls(config, ForwardOptions.of(tc, rules, lora), center, tc.aux_loss_coef)

    def _sums(self, trainable, frozen, mb):
        r, aux = pair_scores(self.config, model_params(trainable, frozen, self.opts.lora), mb, self.opts)
        r_w, r_l = r[:, 0], r[:, 1]
        w = mb["weight"].astype(jnp.float32)
        return {"loss": jnp.sum(w * pairwise_loss(r_w, r_l, self.center)), "accuracy": jnp.sum(w * (r_w > r_l)),
                "margin": jnp.sum(w * (r_w - r_l)), "rewards/chosen": jnp.sum(w * r_w),
                "rewards/rejected": jnp.sum(w * r_l), "n": jnp.sum(w), "aux": aux}


def reward_model_config(config: Qwen3Config, tok) -> Qwen3Config:
    """The reward model's config: a causal LM's body with one score, or a one-score classifier as it is."""
    if config.is_classifier:
        if config.num_labels != 1:
            raise ConfigError(f"the model is a classifier with {config.num_labels} labels; a reward model has 1")
        return config if config.pad_token_id is not None else as_classifier(config, 1, tok.pad_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(tok.eos_token_ids), None)
    return as_classifier(config, 1, pad)


def load_reward_model_weights(args, config: Qwen3Config, rm_config: Qwen3Config, lora: LoraConfig | None, rules,
                              compute_dtype: str):
    """-> (trainable, frozen or None). From a causal LM the LM head is dropped and a fresh score head added;
    the score head is always trained, with LoRA too (beside the adapters)."""
    from qwen_jax import load_pretrained
    from qwen_jax.model import init_lora_params

    dtype = jnp.dtype(args.param_dtype if lora is None else (args.base_dtype or compute_dtype))
    _, params = load_pretrained(args.model, dtype=dtype, mesh=args.mesh_obj, progress=not args.no_progress)
    params = dict(params)
    params.pop("lm_head", None)
    key_head, key_lora = jax.random.split(jax.random.key(args.seed))
    if config.is_classifier:
        head = params.pop("score").astype(args.param_dtype)
    else:
        head = init_score_head(rm_config, key_head, jnp.dtype(args.param_dtype), rules)
    if lora is None:
        return {**params, "score": head}, None
    adapters = init_lora_params(rm_config, lora, key_lora, jnp.dtype(args.param_dtype), rules)
    return {**adapters, "score": head}, {"base": params}


def parse_reward_model(spec: str) -> tuple[str, float]:
    """`DIR[=WEIGHT]` -> (DIR, weight), the directory checked to hold a one-score classifier."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition("=")
    if sep:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass  # an '=' in the path itself
    if not np.isfinite(weight):
        raise ConfigError(f"--reward-model {spec}: the weight must be finite")
    check_reward_model(path)
    return path, weight


def check_reward_model(path: str) -> Qwen3Config:
    if not os.path.isdir(path):
        raise ConfigError(f"--reward-model {path}: not a directory (a train.rm export is expected)")
    config = Qwen3Config.from_json_file(path)
    if config.num_labels != 1:
        what = f"a classifier with {config.num_labels} labels" if config.is_classifier else "a causal LM"
        raise ConfigError(f"--reward-model {path}: {what}, not a reward model (train one with python -m train.rm)")
    return config


class RewardModelReward:
    """A trained reward model as a GRPO reward: batched (prompts, completions, infos) -> scores.

    The reward model reads the conversation in its own tokenizer and chat template: the prompt's messages
    (`info["messages"]`) plus the completion as the assistant's reply; a raw-text prompt is followed by
    the completion as text."""

    batched = True

    def __init__(self, path: str, rules: ShardingRules | None, dtype: str = "float32", batch_size: int = 16,
                 progress: bool = True):
        from qwen_jax import load_pretrained, load_tokenizer
        from qwen_jax.classifier import sequence_scores

        check_reward_model(path)
        self.path, self.tok, self.batch_size = path, load_tokenizer(path), batch_size
        config, self.params = load_pretrained(path, dtype=dtype, mesh=rules.mesh if rules else None, rules=rules,
                                              progress=progress)
        self.config = reward_model_config(config, self.tok)  # without a pad token: the tokenizer's pads rows
        self.pad = self.config.pad_token_id
        self._score = jax.jit(lambda p, t: sequence_scores(self.config, p, t, dtype=jnp.dtype(dtype), rules=rules))

    def ids(self, prompt: str, completion: str, info: dict) -> list[int]:
        if "messages" in info:
            text = self.tok.apply_chat_template(info["messages"] + [{"role": "assistant", "content": completion}],
                                                tokenize=False)
        else:
            text = prompt + completion
        return self.tok.encode(text)

    def __call__(self, prompts: list[str], completions: list[str], infos: list[dict]) -> list[float]:
        seqs = [self.ids(p, c, i) for p, c, i in zip(prompts, completions, infos)]
        longest = max(len(s) for s in seqs)
        if longest > self.config.max_position_embeddings:
            raise DataError(f"a completion is {longest} tokens long for the reward model {self.path}, longer "
                            f"than its context ({self.config.max_position_embeddings})")
        T = min(max(64, 1 << (longest - 1).bit_length()), self.config.max_position_embeddings)  # few shapes
        out = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            tokens = np.full((self.batch_size, T), self.pad, np.int32)
            for i, ids in enumerate(chunk):
                tokens[i, :len(ids)] = ids
            out.extend(np.asarray(jax.device_get(self._score(self.params, tokens)))[:len(chunk), 0].tolist())
        return out
