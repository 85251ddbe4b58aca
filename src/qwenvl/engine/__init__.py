"""Continuous batching over one model: sequence, cache pool, scheduler, model runner, engine."""
from .engine import EngineStopped, LLMEngine, QueueFull
from .sequence import Picture, Sequence, Status

__all__ = ["LLMEngine", "QueueFull", "EngineStopped", "Sequence", "Picture", "Status"]
