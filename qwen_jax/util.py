"""Small arithmetic helpers shared across packages."""


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers: how many b-sized pieces hold a."""
    return -(-a // b)
