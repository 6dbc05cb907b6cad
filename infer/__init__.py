"""Inference: paged KV cache, continuous batching, sampling, the online engine, `python -m infer.generate` and
`python -m infer.serve`."""

import importlib

# Loaded on first use (PEP 562): `python -m infer.generate` installs its signal handlers before jax loads.
_WHERE = {"CompletionOutput": "infer.engine", "Engine": "infer.engine", "RequestOutput": "infer.engine",
          "StreamDelta": "infer.engine", "LLM": "infer.llm", "SamplingParams": "infer.sampling"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
