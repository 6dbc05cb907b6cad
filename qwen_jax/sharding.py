"""Logical axis names -> mesh axes.

Every parameter carries logical axis names (set where it is declared in model.py) and key activations
are constrained with `constrain`. One rules table maps logical names onto the mesh axes
(`data`, `fsdp`, `tensor`, `expert`); changing parallelism is changing the table, never the model.
A dimension that a mesh axis does not divide (e.g. 2 kv heads on tensor=4) is replicated instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
# Parameters use the plain names; activations use the `act_*` names.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # KV cache pool [layers, blocks, block_size, kv_heads, head_dim]
    ("cache_blocks", None),
    ("cache_kv_heads", "tensor"),
)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,tensor=4' -> {'data': 2, 'tensor': 4}."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"mesh spec {spec!r}: expected entries like 'tensor=4' with axes from {MESH_AXES}")
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {value!r}") from None
        if (n < 1 and n != -1) or name in sizes:
            raise ConfigError(f"mesh spec {spec!r}: axis {name!r} must appear once with a size >= 1 (or -1: "
                              f"the remaining devices)")
        sizes[name] = n
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh spec {spec!r}: at most one axis may be -1")
    return sizes


def make_mesh(spec: str | dict[str, int] = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a mesh over all four axes from a spec like 'tensor=4' or 'data=2,tensor=4'.

    Unnamed axes get size 1, except that one axis may be given as -1 to take the remaining devices.
    With no spec the mesh is pure data parallel over every device."""
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    devices = list(jax.devices() if devices is None else devices)
    if not sizes:
        sizes = {"data": len(devices)}
    fill = [k for k, v in sizes.items() if v == -1]
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if len(devices) % known:
            raise ConfigError(f"mesh {sizes}: {len(devices)} devices are not divisible by {known}")
        sizes[fill[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ConfigError(f"mesh {sizes} needs {total} devices, but {len(devices)} are available")
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-TPU/GPU topologies (fake CPU devices): plain row-major order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """A mesh plus the logical-axis rules table (hashable: usable as a static jit argument)."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...] = DEFAULT_RULES

    def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> P:
        """PartitionSpec for logical names; drops mesh axes that do not divide the dim or are reused."""
        table = dict(self.rules)
        used: set[str] = set()
        out = []
        for i, name in enumerate(names):
            axes = table.get(name) if name is not None else None
            if axes is None:
                out.append(None)
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            axes = tuple(a for a in axes if a not in used and self.mesh.shape.get(a, 1) > 1)
            if shape is not None:
                kept, size = [], 1
                for a in axes:
                    if shape[i] % (size * self.mesh.shape[a]) == 0:
                        kept.append(a)
                        size *= self.mesh.shape[a]
                axes = tuple(kept)
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*out)

    def sharding(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))


def constrain(x: jax.Array, rules: ShardingRules | None, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op without rules (single device)."""
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, rules.sharding(names, x.shape))


def tree_shardings(logical_tree, shapes_tree, rules: ShardingRules):
    """NamedSharding for every leaf, from a tree of logical-name tuples and a matching tree of shapes."""
    return jax.tree.map(
        lambda names, s: rules.sharding(names, s.shape),
        logical_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple) and all(
            isinstance(n, (str, type(None))) for n in x))
