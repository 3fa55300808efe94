"""The exact asynchronous decoding engine: interpreter (no tensors), HF runner, sampler, step loop."""

from .engine import Engine, GenerateConfig, Result, scripts_for
from .interpreter import Interpreter, Limits, Status

__all__ = ["Engine", "GenerateConfig", "Interpreter", "Limits", "Result", "Status", "scripts_for"]
