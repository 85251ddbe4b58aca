"""Who runs this step: admission into cache slots, one decode token per running sequence, prefill chunks
within a token budget (so a long prompt delays the running streams by a bounded amount)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .cache_pool import CachePool
from .sequence import Sequence, Status


@dataclass
class Chunk:
    """Columns [start, start + length) of one sequence, computed this step; `sample`: its last one gives
    the sequence's next token."""
    seq: Sequence
    start: int
    length: int
    sample: bool


class Scheduler:
    def __init__(self, pool: CachePool, max_num_seqs: int, max_prefill_tokens: int, span: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.span = span  # positions inside an image span
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots, first come first served; returns the admitted."""
        admitted, running = [], None
        while self.waiting and len(self.running) < self.max_num_seqs and self.pool.available:
            seq = self.waiting.popleft()
            if running is None:  # what the running sequences hold, to copy a shared prefix from
                running = [(s.slot, s.key(self.span)[:s.computed], s.alpha) for s in self.running if s.computed]
            key = seq.key(self.span)[:len(seq.prompt)]
            seq.slot, seq.reused = self.pool.acquire(key, seq.alpha, running, limit=len(seq.prompt) - 1)
            seq.computed = seq.reused
            if seq.reused:
                running.append((seq.slot, key[:seq.reused], seq.alpha))
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> list[Chunk]:
        chunks = [Chunk(s, s.computed, 1, True) for s in self.running if not s.prefilling]
        budget = self.max_prefill_tokens
        for seq in self.running:
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt) - seq.computed, budget)
                chunks.append(Chunk(seq, seq.computed, n, seq.computed + n == len(seq.prompt)))
                budget -= n
        return chunks

    def finish(self, seq: Sequence, reason: str) -> None:
        """The sequence leaves now; its slot keeps what it computed, for prompts that start the same way."""
        if seq.finished:
            return
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.pool.release(seq.slot, seq.key(self.span)[:seq.computed], seq.alpha)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.features = None
