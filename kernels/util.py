"""Arithmetic helpers shared by every layer (kernels is the bottom one, so all may import it)."""


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers: how many b-sized pieces hold a."""
    return -(-a // b)
