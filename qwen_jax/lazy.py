"""Package attributes loaded on first use (PEP 562): `import qwen_jax.cli` (or `python -m infer.generate`)
stays light, so a CLI installs its signal handlers before jax and transformers are imported, and a Ctrl-C
during those imports is handled like any other."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, list[str]], namespace: dict) -> tuple[list[str], Callable]:
    """-> (__all__, __getattr__) for a package whose `exports` maps module -> names; a loaded name is cached
    in the package's `namespace`."""
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        namespace[name] = value
        return value

    return sorted(where), __getattr__
