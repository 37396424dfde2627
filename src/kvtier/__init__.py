"""kvtier: transformer inference that never computes the same attention keys and values twice."""

from kvtier.config import EngineConfig
from kvtier.engine.engine import Engine
from kvtier.engine.llm import LLM
from kvtier.engine.request import InvalidRequestError, RequestOutput, SamplingParams

__all__ = ["LLM", "Engine", "EngineConfig", "InvalidRequestError", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
