"""The KV cache pool: one allocation at start, a fixed number of slots, and a prefix cache in the idle ones.

A slot holds one sequence's keys and values [layers, heads, slot_len, head_dim]. When a sequence leaves,
its slot stays filled and indexed by the tokens it holds (its `key`), least recently used first; a new
sequence whose prompt starts with those tokens, under the same dynamic-NTK alpha, takes the slot over
(or copies the prefix from a running sequence's slot) and computes only the rest. Slots are chosen over
paged blocks to keep attention one contiguous view per row; the price is that every slot is sized for
the longest sequence.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..config import QWenConfig


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CachePool:
    def __init__(self, config: QWenConfig, slots: int, slot_len: int, dtype, device, heads: int | None = None):
        shape = (config.num_hidden_layers, slots, heads or config.num_attention_heads, slot_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slot_len = slot_len
        self.free: list[int] = list(range(slots - 1, -1, -1))  # never used or evicted
        self.cached: OrderedDict[int, tuple[list, float]] = OrderedDict()  # idle slot -> (key, alpha), LRU first

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def acquire(self, key: list, alpha: float, running: list[tuple[int, list, float]], limit: int) -> tuple[int, int]:
        """A slot for a sequence whose tokens are `key`, and how many of its first tokens are already there
        (at most `limit`). `running`: (slot, key of the tokens computed, alpha) of the running sequences."""
        best_slot, best = -1, 0
        for slot, (cached_key, cached_alpha) in self.cached.items():
            n = min(common_prefix(key, cached_key), limit) if cached_alpha == alpha else 0
            if n > best:
                best_slot, best = slot, n
        if best_slot >= 0:
            del self.cached[best_slot]
            return best_slot, best
        slot = self.free.pop() if self.free else self.cached.popitem(last=False)[0]
        source, best = -1, 0
        for other, other_key, other_alpha in running:
            n = min(common_prefix(key, other_key), limit) if other_alpha == alpha else 0
            if n > best:
                source, best = other, n
        if best:
            self.k[:, slot, :, :best] = self.k[:, source, :, :best]
            self.v[:, slot, :, :best] = self.v[:, source, :, :best]
        return slot, best

    def release(self, slot: int, key: list, alpha: float) -> None:
        """An idle slot keeps its first len(key) tokens for later prompts that start with them."""
        if key:
            self.cached[slot] = (key, alpha)
        else:
            self.free.append(slot)
