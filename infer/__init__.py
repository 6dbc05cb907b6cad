"""Inference: paged KV cache, continuous batching, sampling, and `python -m infer.generate`."""

from infer.engine import LLM, RequestOutput
from infer.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
