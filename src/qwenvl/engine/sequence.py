"""One request inside the engine: its prompt, its pictures, its sampling rule and what it has produced."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generation import SamplingParams
from ..processor import Picture

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no cache slot yet
    RUNNING = "running"  # holds a slot: prefilling (computed < prompt length) or decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    pictures: list[Picture] = field(default_factory=list)
    spans: list[int] = field(default_factory=list)  # column of each picture's <img> in the prompt
    listener: Callable[["Sequence", list[int]], None] | None = None  # called with each step's new tokens
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: BaseException | None = None
    slot: int = -1
    computed: int = 0  # tokens whose keys and values are in the slot
    reused: int = 0  # of those, how many came from the prefix cache
    alpha: float = 1.0  # dynamic-NTK alpha, fixed by the prompt length as in a solo run
    aborted: bool = False
    generator: torch.Generator | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    token_logprobs: list = field(default_factory=list)  # (logprob, [(id, logprob), ...]) per output token
    features: list | None = None  # image features for the prefill, dropped once it is done
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def key(self, span: int) -> list:
        """The tokens as the prefix cache compares them: each picture span stands for its content hash,
        since its ids only name where the picture came from."""
        out: list = list(self.tokens)
        for column, picture in zip(self.spans, self.pictures):
            out[column + 1:column + 1 + span] = [picture.digest] + [0] * (span - 1)
        return out
