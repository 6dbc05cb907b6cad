"""HF safetensors checkpoint <-> params pytree.

One table (`_LAYER_TABLE`, `_GLOBAL_TABLE`) says which HF tensor feeds which parameter and how:
  * "linear": HF stores [out, in]; ours is [in..., out...]: transpose, then reshape (and back on export);
  * "plain":  same shape (embeddings, norms);
  * "flat":   HF stores it 1-D, ours is [heads, head_dim] (q/k/v biases).
The transpose happens here and nowhere else.

Loading streams: each parameter is assembled from its HF tensors on its own (through a memory map), so
the file set is never in memory twice; with a mesh, each device shard is read straight from the files
with `jax.make_array_from_callback`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from qwen_jax.config import Qwen3Config
from qwen_jax.errors import CheckpointError
from qwen_jax.files import write_json
from qwen_jax.safetensors_io import SafetensorsFile, save_file

# (HF key suffix under model.layers.{i}., param sub-path inside a layer group, kind, number of "in" dims)
# `{e}` marks per-expert tensors, stacked on the expert axis.
_LAYER_TABLE = (
    ("input_layernorm.weight", ("input_norm", "scale"), "plain", 0),
    ("post_attention_layernorm.weight", ("post_attn_norm", "scale"), "plain", 0),
    ("self_attn.q_proj.weight", ("attn", "q"), "linear", 1),
    ("self_attn.k_proj.weight", ("attn", "k"), "linear", 1),
    ("self_attn.v_proj.weight", ("attn", "v"), "linear", 1),
    ("self_attn.o_proj.weight", ("attn", "o"), "linear", 2),
    ("self_attn.q_proj.bias", ("attn", "q_bias"), "flat", 0),
    ("self_attn.k_proj.bias", ("attn", "k_bias"), "flat", 0),
    ("self_attn.v_proj.bias", ("attn", "v_bias"), "flat", 0),
    ("self_attn.o_proj.bias", ("attn", "o_bias"), "plain", 0),
    ("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), "plain", 0),
    ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), "plain", 0),
    ("mlp.gate_proj.weight", ("mlp", "gate"), "linear", 1),
    ("mlp.up_proj.weight", ("mlp", "up"), "linear", 1),
    ("mlp.down_proj.weight", ("mlp", "down"), "linear", 1),
    ("mlp.gate.weight", ("moe", "router"), "linear", 1),
    ("mlp.experts.{e}.gate_proj.weight", ("moe", "gate"), "linear", 1),
    ("mlp.experts.{e}.up_proj.weight", ("moe", "up"), "linear", 1),
    ("mlp.experts.{e}.down_proj.weight", ("moe", "down"), "linear", 1),
)
_GLOBAL_TABLE = (
    ("model.embed_tokens.weight", ("embed",), "plain", 0),
    ("model.norm.weight", ("final_norm", "scale"), "plain", 0),
    ("lm_head.weight", ("lm_head",), "linear", 1),
    ("score.weight", ("score",), "linear", 1),  # sequence classifiers (reward models)
)
# HF keys that may appear in a checkpoint and carry nothing we need.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)")


@dataclass(frozen=True)
class ParamSource:
    """How one parameter leaf is built: HF keys indexed [layer][expert] (or a single key)."""

    path: tuple[str, ...]
    keys: tuple  # nested tuples of HF key names: () levels for stacked layers / experts
    kind: str
    n_in: int
    stacked: int  # number of leading stacked axes in the leaf (0: global, 1: layers, 2: layers+experts)


def _leaves_by_path(tree) -> dict[tuple[str, ...], object]:
    return {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def param_sources(config: Qwen3Config, abstract) -> list[ParamSource]:
    """Every parameter leaf with the HF tensors it comes from."""
    by_sub = {sub: (hf, kind, n_in) for hf, sub, kind, n_in in _LAYER_TABLE}
    by_global = {sub: (hf, kind, n_in) for hf, sub, kind, n_in in _GLOBAL_TABLE}
    out = []
    for path in _leaves_by_path(abstract):
        if path[0].startswith("layers_"):
            _, start, stop = config.layer_groups[int(path[0].split("_")[1])]
            hf, kind, n_in = by_sub[path[1:]]
            if "{e}" in hf:
                keys = tuple(tuple(f"model.layers.{i}." + hf.format(e=e) for e in range(config.num_experts))
                             for i in range(start, stop))
                stacked = 2
            else:
                keys = tuple(f"model.layers.{i}.{hf}" for i in range(start, stop))
                stacked = 1
        else:
            hf, kind, n_in = by_global[path]
            keys, stacked = hf, 0
        out.append(ParamSource(path, keys, kind, n_in, stacked))
    return out


def _flat_keys(src: ParamSource) -> Iterator[str]:
    if src.stacked == 0:
        yield src.keys
    elif src.stacked == 1:
        yield from src.keys
    else:
        for per_layer in src.keys:
            yield from per_layer


def _hf_shape(kind: str, n_in: int, ours: tuple[int, ...]) -> tuple[int, ...]:
    """HF tensor shape for one un-stacked leaf slice of shape `ours`."""
    if kind == "linear":
        return (math.prod(ours[n_in:]), math.prod(ours[:n_in]))
    if kind == "flat":
        return (math.prod(ours),)
    return tuple(ours)


def _to_ours(x: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    return (x.T if kind == "linear" else x).reshape(shape)


def _to_hf(x: np.ndarray, kind: str, n_in: int) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(x.reshape(math.prod(x.shape[:n_in]), -1).T)
    return x.reshape(-1) if kind == "flat" else x


class CheckpointReader:
    """All safetensors files of an HF checkpoint directory, indexed by tensor name."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        index = os.path.join(self.path, "model.safetensors.index.json")
        single = os.path.join(self.path, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: malformed index (expected a 'weight_map' object)") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
            if not files:
                others = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
                hint = f" (found {others[0]}: only safetensors is supported, never pickle)" if others else ""
                raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json{hint}")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        for name in files:
            fp = os.path.join(self.path, name)
            if not os.path.exists(fp):
                raise CheckpointError(f"{fp}: weight file listed in the index is missing")
            st = SafetensorsFile(fp)
            self.files[name] = st
            for k in st.keys():
                self.where[k] = name

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str):
        return self.files[self.where[key]].shape(key)

    def dtype(self, key: str):
        return self.files[self.where[key]].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self.files[self.where[key]].get(key)


def _check_tensors(reader: CheckpointReader, config: Qwen3Config, sources: list[ParamSource], abstract) -> None:
    """Missing / unexpected / mis-shaped tensors -> one CheckpointError naming the first offender."""
    leaves = _leaves_by_path(abstract)
    wanted = {}  # HF key -> expected HF shape
    for src in sources:
        want = _hf_shape(src.kind, src.n_in, leaves[src.path].shape[src.stacked:])
        wanted.update((key, want) for key in _flat_keys(src))
    missing = sorted((k for k in wanted if k not in reader), key=_natural_key)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{reader.path}: missing tensor {missing[0]!r}{more}")
    for key in sorted(wanted, key=_natural_key):
        got = tuple(reader.shape(key))
        if got != tuple(wanted[key]):
            raise CheckpointError(f"{reader.path}: tensor {key!r} has shape {list(got)}, "
                                  f"expected {list(wanted[key])} for this config")
        if reader.dtype(key).name not in ("float16", "float32", "float64", "bfloat16"):
            raise CheckpointError(f"{reader.path}: tensor {key!r} has non-float dtype {reader.dtype(key)}")
    unexpected = sorted((k for k in reader.where if k not in wanted and not _IGNORED.search(k)
                         and not (k == "lm_head.weight" and config.tie_word_embeddings)), key=_natural_key)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{reader.path}: unexpected tensor {unexpected[0]!r}{more} "
                              f"(config.json may not match the weights)")


def _read_block(reader: CheckpointReader, src: ParamSource, leaf_shape, index, dtype) -> np.ndarray:
    """The block `index` (tuple of slices over the leaf) of a parameter, read from the files."""
    inner = tuple(leaf_shape[src.stacked:])

    def one(key, rest):
        x = _to_ours(reader.get(key), src.kind, inner)
        return np.asarray(x[rest], dtype=dtype)

    if src.stacked == 0:
        return one(src.keys, index)
    layers = range(*index[0].indices(leaf_shape[0]))
    if src.stacked == 1:
        return np.stack([one(src.keys[i], index[1:]) for i in layers])
    experts = range(*index[1].indices(leaf_shape[1]))
    return np.stack([np.stack([one(src.keys[i][e], index[2:]) for e in experts]) for i in layers])


def _assemble(reader: CheckpointReader, src: ParamSource, shape, sharding, dtype) -> jax.Array:
    """One parameter on device. Stacked leaves go in one layer at a time into a donated buffer, so the
    host holds at most one layer's tensor (or its shard) at once."""

    def read(index):
        return _read_block(reader, src, shape, tuple(index), dtype)

    whole = tuple(slice(None) for _ in shape)
    layers_sharded = sharding is not None and len(sharding.spec) > 0 and sharding.spec[0] is not None
    if src.stacked == 0 or layers_sharded:
        if sharding is None:
            return jax.device_put(read(whole))
        return jax.make_array_from_callback(shape, sharding, read)
    layer_shape = tuple(shape[1:])
    if sharding is None:
        buf = jnp.zeros(shape, dtype)
    else:
        layer_sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
        buf = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    for i in range(shape[0]):
        def read_layer(index, i=i):
            return read((slice(i, i + 1),) + tuple(index))[0]

        if sharding is None:
            layer = jax.device_put(read_layer(whole[1:]))
        else:
            layer = jax.make_array_from_callback(layer_shape, layer_sharding, read_layer)
        buf = _set_layer(buf, layer, i)
    return buf


@partial(jax.jit, donate_argnums=0)
def _set_layer(buf, layer, i):
    return jax.lax.dynamic_update_index_in_dim(buf, layer, i, axis=0)


def _checkpoint_dtype(reader: CheckpointReader):
    key = "model.embed_tokens.weight"
    return jnp.dtype(reader.dtype(key)) if key in reader else jnp.float32


def load_pretrained(path: str, dtype=None, mesh=None, rules=None, progress: bool = True):
    """Load an HF Qwen3 / Qwen3-MoE checkpoint directory -> (config, params).

    dtype: parameter dtype (default: the checkpoint's). mesh / rules: place each parameter directly in
    its sharding (`rules` defaults to the standard table over `mesh`)."""
    from qwen_jax.model import abstract_params, param_shardings
    from qwen_jax.sharding import ShardingRules

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    config = Qwen3Config.from_json_file(os.path.join(path, "config.json"))
    reader = CheckpointReader(path)
    dtype = jnp.dtype(dtype) if dtype is not None else _checkpoint_dtype(reader)
    abstract = abstract_params(config, dtype)
    sources = param_sources(config, abstract)
    _check_tensors(reader, config, sources, abstract)
    if rules is None and mesh is not None:
        rules = ShardingRules(mesh)
    shardings = param_shardings(config, rules, dtype) if rules is not None else None
    leaves_abs = _leaves_by_path(abstract)
    leaves_sh = _leaves_by_path(shardings) if shardings is not None else {}
    loaded = {}
    bar = tqdm(sources, desc=f"loading {os.path.basename(os.path.normpath(path))}", unit="tensor",
               disable=not progress or None)
    for src in bar:
        loaded[src.path] = _assemble(reader, src, leaves_abs[src.path].shape, leaves_sh.get(src.path), dtype)
    params = jax.tree_util.tree_map_with_path(lambda kp, _: loaded[tuple(k.key for k in kp)], abstract)
    return config, params


def _to_numpy(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _export_items(config: Qwen3Config, params, out_dtype) -> list[tuple[str, ParamSource, tuple, int]]:
    """(HF key, source, index into the leaf, bytes) for every HF tensor, in HF's natural key order."""
    from qwen_jax.model import abstract_params

    leaves = _leaves_by_path(params)
    items = []
    for src in param_sources(config, abstract_params(config, params["embed"].dtype)):
        nbytes = math.prod(leaves[src.path].shape[src.stacked:]) * jnp.dtype(out_dtype).itemsize
        if src.stacked == 0:
            items.append((src.keys, src, (), nbytes))
        elif src.stacked == 1:
            items += [(k, src, (i,), nbytes) for i, k in enumerate(src.keys)]
        else:
            items += [(k, src, (i, e), nbytes) for i, per in enumerate(src.keys) for e, k in enumerate(per)]
    return sorted(items, key=lambda it: _natural_key(it[0]))


def _hf_tensor(leaves, src: ParamSource, idx: tuple) -> np.ndarray:
    return _to_hf(_to_numpy(leaves[src.path][idx] if idx else leaves[src.path]), src.kind, src.n_in)


def hf_state_dict(config: Qwen3Config, params) -> dict[str, np.ndarray]:
    """The params (or any pytree shaped like them, e.g. gradients) as HF-named tensors in HF layout."""
    leaves = _leaves_by_path(params)
    return {key: _hf_tensor(leaves, src, idx) for key, src, idx, _ in _export_items(config, params, jnp.float32)}


def _parse_size(s: int | str) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", s.upper())
    if not m:
        raise ValueError(f"max_shard_size must be like '5GB', got {s!r}")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])


def save_pretrained(path: str, config: Qwen3Config, params, tokenizer=None, dtype=None,
                    max_shard_size: int | str = "5GB", progress: bool = True) -> None:
    """Export to an HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    Writes config.json, model.safetensors (or model-0000i-of-0000N.safetensors + index) and, if given,
    the tokenizer. Tensors are pulled from the devices one HF tensor at a time. Everything is written into
    PATH.incomplete first, then moved into PATH with config.json last (an older export's config.json and
    weight files are removed first; other files in PATH stay): an export cut short (a crash, Ctrl-C) never
    leaves a directory that looks complete, nor a mix of an old and a new export."""
    final = os.path.abspath(os.fspath(path))
    path = final + ".incomplete"
    write = jax.process_index() == 0
    if write:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(params["embed"].dtype)
    leaves = _leaves_by_path(params)

    items = _export_items(config, params, out_dtype)
    limit = _parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it[3] > limit:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it[3]
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    weight_map = {}
    bar = tqdm(total=len(items), desc=f"saving {os.path.basename(final)}", unit="tensor",
               disable=not progress or None)
    for name, shard in zip(names, shards):
        tensors = {}
        for key, src, idx, _ in shard:
            tensors[key] = _hf_tensor(leaves, src, idx).astype(out_dtype)
            weight_map[key] = name
            bar.update(1)
        if write:
            save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    bar.close()
    if not write:
        return
    if n > 1:
        total = sum(it[3] for it in items)
        write_json(os.path.join(path, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    write_json(os.path.join(path, "config.json"), config.to_hf_dict(dtype=_torch_dtype_name(out_dtype)))  # last
    _move_into(path, final)


def _move_into(staged: str, final: str) -> None:
    """Move a complete export from `staged` into `final`: config.json (what makes a directory look like a
    checkpoint) goes first on the way out and last on the way in."""
    os.makedirs(final, exist_ok=True)
    names = set(os.listdir(staged))
    for old in ["config.json"] + sorted(os.listdir(final)):
        if old == "config.json" or (old.startswith("model") and old.endswith((".safetensors", ".index.json"))
                                    and old not in names):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(final, old))
    for name in sorted(names - {"config.json"}) + ["config.json"]:
        os.replace(os.path.join(staged, name), os.path.join(final, name))
    os.rmdir(staged)


def _torch_dtype_name(dtype) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(jnp.dtype(dtype).name, "float32")


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


