"""Small helpers shared by every layer (kernels is the bottom one, so all may import it)."""

import jax


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers: how many b-sized pieces hold a."""
    return -(-a // b)


def vary_alike(*arrays):
    """The arrays, each marked as varying over every manual mesh axis that any of them varies over.

    Inside `jax.shard_map`, a jax.custom_vjp's backward must return cotangents typed like its inputs; a
    product of an array varying over ("data", "expert") with one varying over ("expert",) has a cotangent
    varying over both. Marking the inputs alike first (whose transpose JAX sums over the added axes, outside
    the custom rule) keeps the rule well typed. Outside shard_map this returns the arrays unchanged."""
    def vma(a):
        aval = jax.typeof(a)
        mat = getattr(aval, "mat", None)  # jax >= 0.10: the manual axis type; earlier: aval.vma
        return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()) or ())

    axes = frozenset().union(*(vma(a) for a in arrays))
    cast = getattr(jax.lax, "pcast", None)
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - vma(a)))
        if missing:
            a = cast(a, missing, to="varying") if cast is not None else jax.lax.pvary(a, missing)
        out.append(a)
    return tuple(out)

