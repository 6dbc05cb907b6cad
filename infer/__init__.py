"""Inference: paged KV cache, continuous batching, sampling, the online engine, `python -m infer.generate` and
`python -m infer.serve`."""

from infer.engine import CompletionOutput, Engine, RequestOutput, StreamDelta
from infer.llm import LLM
from infer.sampling import SamplingParams

__all__ = ["CompletionOutput", "Engine", "LLM", "RequestOutput", "SamplingParams", "StreamDelta"]
