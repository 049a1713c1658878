"""Running models: tokenizer and chat template, sampling, generation, the continuous-batching
engine and the OpenAI-compatible server (`moekit.inference.server`, needs fastapi + uvicorn)."""

from moekit.inference.engine import Engine, QueueFull, Request
from moekit.inference.generate import Generation, generate
from moekit.inference.load import LoadedModel, load
from moekit.inference.sampling import SamplingParams
from moekit.inference.tokenizer import TextTokenizer

__all__ = ["Engine", "Generation", "LoadedModel", "QueueFull", "Request", "SamplingParams", "TextTokenizer",
           "generate", "load"]
