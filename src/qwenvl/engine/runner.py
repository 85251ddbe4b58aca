"""One forward pass over a step's chunks, all sequences flattened into one row of tokens: the matmuls run
batched, attention runs per sequence over its own slot. Each token gets its own sequence's position,
dynamic-NTK alpha and log-n scale, so a sequence computes what it computes alone."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from ..model.language import Step, logn_scale
from .cache_pool import CachePool
from .scheduler import Chunk
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model, pool: CachePool, image_cache_size: int):
        self.model = model
        self.config = model.config
        self.pool = pool
        self.span = model.config.visual.n_queries
        self.features: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # content hash -> [256, hidden], LRU
        self.image_cache_size = image_cache_size
        self.image_hits = self.image_misses = 0

    # ---- pictures ----------------------------------------------------------------------------------

    def encode(self, seqs: list[Sequence]) -> None:
        """Features of every picture these sequences still have to compute, the missing ones in one batch."""
        needed = [(s, i) for s in seqs for i, column in enumerate(s.spans) if column + 1 + self.span > s.computed]
        missing: dict[bytes, torch.Tensor] = {}
        for s, i in needed:
            digest = s.pictures[i].digest
            if digest in self.features:
                self.features.move_to_end(digest)
                self.image_hits += 1
            elif digest in missing:
                self.image_hits += 1
            else:
                missing[digest] = s.pictures[i].pixels
                self.image_misses += 1
        if missing:
            with torch.inference_mode():
                encoded = self.model.encode_images(list(missing.values()))
            for digest, f in zip(missing, encoded):
                self.features[digest] = f
        fresh = {d: self.features[d] for d in missing}
        for s in seqs:
            s.features = [fresh.get(p.digest, self.features.get(p.digest)) for p in s.pictures]
        while len(self.features) > self.image_cache_size:
            self.features.popitem(last=False)

    # ---- forward -----------------------------------------------------------------------------------

    def embed(self, chunks: list[Chunk]) -> torch.Tensor:
        wte = self.model.transformer.wte
        ids = torch.tensor([t for c in chunks for t in c.seq.tokens[c.start:c.start + c.length]], device=self.model.device)
        x = wte(ids)
        offset = 0
        for c in chunks:
            for column, f in zip(c.seq.spans, c.seq.features or []):
                a, b = max(column + 1, c.start), min(column + 1 + self.span, c.start + c.length)
                if a < b and f is not None:
                    x[offset + a - c.start:offset + b - c.start] = f[a - column - 1:b - column - 1].to(x.dtype)
            offset += c.length
        return x[None]

    def step(self, chunks: list[Chunk]) -> Step:
        device = self.model.device
        rotary = self.model.transformer.rotary
        positions = [torch.arange(c.start, c.start + c.length, device=device) for c in chunks]
        tables = [rotary.tables(p[None], [c.seq.alpha]) for p, c in zip(positions, chunks)]
        cos = torch.cat([t[0] for t in tables], dim=2)
        sin = torch.cat([t[1] for t in tables], dim=2)
        logn = None
        if self.config.use_logn_attn:
            logn = logn_scale(torch.cat(positions)[None], self.config.seq_length)
        segments, offset = [], 0
        for c in chunks:
            segments.append((c.seq.slot, c.start, c.length, offset))
            offset += c.length
        # where every token's keys and values go: (slot, column) per token, written in one call per layer
        slots = torch.tensor([c.seq.slot for c in chunks for _ in range(c.length)], device=device)
        columns = torch.cat(positions)
        return Step(cos=cos, sin=sin, logn=logn, mask=None, start=0, cache=None,
                    attend=lambda layer, q, k, v: self.attend(segments, (slots, columns), layer, q, k, v))

    def attend(self, segments, where, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]
        slots, columns = where
        pool_k[slots, :, columns] = k[0].transpose(0, 1)
        pool_v[slots, :, columns] = v[0].transpose(0, 1)
        pieces = []
        for slot, start, length, offset in segments:
            end = start + length
            keys, values = pool_k[slot, None, :, :end], pool_v[slot, None, :, :end]
            query = q[:, :, offset:offset + length]
            if length == 1:
                o = F.scaled_dot_product_attention(query, keys, values)
            elif start == 0:
                o = F.scaled_dot_product_attention(query, keys, values, is_causal=True)
            else:  # a later prefill chunk: causal, shifted by the columns already in the slot
                mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
                o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)
            pieces.append(o)
        return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits [K, V] at the last column of each chunk that samples, in chunk order."""
        with torch.inference_mode():
            hidden = self.model.transformer.run_blocks(self.embed(chunks), self.step(chunks))
            ends, offset = [], 0
            for c in chunks:
                offset += c.length
                if c.sample:
                    ends.append(offset - 1)
            return self.model.lm_head(hidden[0, ends])
