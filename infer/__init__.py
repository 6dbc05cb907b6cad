"""Inference: paged KV cache, continuous batching, sampling, the online engine, `python -m infer.generate` and
`python -m infer.serve`."""

from qwen_jax.lazy import lazy_exports

__all__, __getattr__ = lazy_exports("infer", {
    "infer.engine": ["CompletionOutput", "Engine", "RequestOutput", "StreamDelta"],
    "infer.llm": ["LLM"],
    "infer.sampling": ["SamplingParams"],
}, globals())  # loaded on first use: see qwen_jax/lazy.py
