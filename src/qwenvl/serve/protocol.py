"""The OpenAI API's request shapes, field by field (as the official SDK sends them), with the engine's
extras (`top_k`, `repetition_penalty`, `ignore_eos`) beside them; unknown fields are ignored, as OpenAI does."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(Base):
    url: str
    detail: str | None = None


class TextPart(Base):
    type: Literal["text"]
    text: str


class ImagePart(Base):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Union[TextPart, ImagePart]


class Message(Base):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(Base):
    include_usage: bool = False


class SamplingFields(Base):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = Field(default=None, ge=0)  # extra
    repetition_penalty: float | None = Field(default=None, gt=0)  # extra
    ignore_eos: bool = False  # extra (vLLM's name): no end-of-text / end-of-turn stop, only max_tokens and `stop`


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: str | list  # or a list of strings, token ids, or token-id lists: checked by completion_prompts
    images: list[str] = Field(default_factory=list)  # extra: image URLs, shown before the prompt
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class TokenizeRequest(Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None


def error_body(message: str, kind: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
