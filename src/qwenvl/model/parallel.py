"""Tensor parallel inference on torch.distributed (NCCL with one GPU per rank, gloo on CPU), Megatron style.

Each rank holds 1/N of every decoder matrix: `c_attn` split by whole heads (this rank's rows of q, k and v),
`w1`/`w2` by rows, `attn.c_proj`/`mlp.c_proj` by columns (one all-reduce each, the bias added once after it),
`wte` and `lm_head` by vocabulary rows (one all-reduce of the embeddings, one all-gather of the logits; the
last rank's rows padded with zeros when the vocabulary does not split evenly). The vision tower, the resampler
and the norms are replicated: they cost no communication. Each rank reads only its own slices of the
checkpoint (`Shards.take` on safetensors slice objects).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QWenConfig
from ..errors import DistributedError, OptionsError
from .language import Linear

TIMEOUT_ENV = "QWENVL_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def collective_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        timeout = float(raw)
    except ValueError:
        timeout = float("nan")
    if not math.isfinite(timeout) or timeout <= 0:
        raise OptionsError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return timeout


@dataclass
class Group:
    """This process's place among the ranks, and the collectives the model runs (counted, for the tests)."""

    rank: int
    world: int
    device: torch.device
    timeout: float = DEFAULT_TIMEOUT_S
    counts: dict = field(default_factory=lambda: {"all_reduce": 0, "all_gather": 0, "broadcast": 0, "bytes": 0})

    def _run(self, name: str, tensor: torch.Tensor | None, fn):
        self.counts[name] += 1
        self.counts["bytes"] += 0 if tensor is None else tensor.numel() * tensor.element_size()
        try:
            return fn()
        except (RuntimeError, ValueError) as e:  # gloo/NCCL: a peer that closed its connection, or a timeout
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"tensor-parallel rank {self.rank} of {self.world}: {name} failed: another rank "
                                   f"died or stalled (collective timeout {self.timeout:g} s, {TIMEOUT_ENV}): "
                                   f"{detail}") from None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self._run("all_reduce", x, lambda: torch.distributed.all_reduce(x))
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, concatenated along the last dimension."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._run("all_gather", x, lambda: torch.distributed.all_gather(parts, x))
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank."""
        x = x.contiguous()
        self._run("broadcast", x, lambda: torch.distributed.broadcast(x, 0))
        return x

    def broadcast_object(self, obj=None):
        """Rank 0's picklable `obj` on every rank (the engine's new requests each step)."""
        box = [obj]
        device = self.device if self.device.type == "cuda" else None
        self._run("broadcast", None, lambda: torch.distributed.broadcast_object_list(box, 0, device=device))
        return box[0]


def join(cuda: bool) -> Group:
    """Join the ranks torchrun (or `qwenvl ... --tensor-parallel-size N`) started: NCCL on cuda:LOCAL_RANK
    when `cuda`, else gloo on the CPU."""
    if not under_torchrun():
        raise OptionsError("tensor_parallel=True needs one process per rank: launch with torchrun --nproc_per_node N, "
                           "or qwenvl generate/bench --tensor-parallel-size N")
    timeout = collective_timeout()
    import torch.distributed as dist

    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise OptionsError(f"tensor-parallel LOCAL_RANK {local} has no GPU: this machine has "
                               f"{torch.cuda.device_count()}; start at most that many ranks")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"tensor-parallel rank {os.environ['RANK']}: cannot join the other ranks "
                                   f"(MASTER_ADDR/MASTER_PORT): {e}") from None
    return Group(dist.get_rank(), dist.get_world_size(), device, timeout)


def check_sizes(config: QWenConfig, world: int) -> None:
    """Refuse a rank count that does not split the heads and the MLP evenly."""
    if world < 1:
        raise OptionsError(f"the tensor-parallel size must be at least 1, got {world}")
    if config.num_attention_heads % world:
        raise OptionsError(f"tensor-parallel size {world} does not divide the model's {config.num_attention_heads} "
                           "attention heads: choose a divisor of the head count")
    inner = config.intermediate_size // 2
    if inner % world:
        raise OptionsError(f"tensor-parallel size {world} does not divide the MLP width {inner} "
                           "(intermediate_size / 2)")


class RowParallelLinear(Linear):
    """Columns of a projection: partial sums all-reduced, then the (replicated) bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: Group):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(self.project(x, None))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding table; ids of other ranks give zeros, summed over the ranks."""

    def __init__(self, vocab_size: int, hidden: int, group: Group):
        self.per_rank = -(-vocab_size // group.world)
        super().__init__(self.per_rank, hidden)
        self.group, self.start = group, group.rank * self.per_rank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.group.all_reduce(x.masked_fill(outside[..., None], 0))


class VocabParallelHead(Linear):
    """This rank's rows of lm_head; the logits of all ranks gathered (padding cut off)."""

    def __init__(self, hidden: int, vocab_size: int, group: Group):
        super().__init__(hidden, -(-vocab_size // group.world), bias=False)
        self.group, self.vocab_size = group, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather(super().forward(x))[..., :self.vocab_size]


def shard_model(model, group: Group) -> None:
    """Turn a full model on the meta device into this rank's shapes (weights loaded after, by `Shards`)."""
    config = model.config
    check_sizes(config, group.world)
    heads = config.num_attention_heads // group.world
    width = heads * config.head_dim
    inner = config.intermediate_size // 2 // group.world
    bias = not config.no_bias
    with torch.device("meta"):
        for block in model.transformer.h:
            block.attn.heads = heads
            block.attn.c_attn = Linear(config.hidden_size, 3 * width)
            block.attn.c_proj = RowParallelLinear(width, config.hidden_size, bias, group)
            block.mlp.w1 = Linear(config.hidden_size, inner, bias=bias)
            block.mlp.w2 = Linear(config.hidden_size, inner, bias=bias)
            block.mlp.c_proj = RowParallelLinear(inner, config.hidden_size, bias, group)
        model.transformer.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        model.lm_head = VocabParallelHead(config.hidden_size, config.vocab_size, group)
    model.local_heads = heads
    model.tp = group


class Shards:
    """Which part of each checkpoint tensor a rank keeps. `take` indexes a full tensor or a safetensors
    slice object (which reads only the indexed bytes from disk)."""

    def __init__(self, config: QWenConfig, rank: int, world: int):
        check_sizes(config, world)
        self.config, self.rank, self.world = config, rank, world
        self.width = config.num_attention_heads // world * config.head_dim
        self.inner = config.intermediate_size // 2 // world
        self.per_rank = -(-config.vocab_size // world)

    def take(self, name: str, tensor) -> torch.Tensor:
        parts = name.split(".")
        if name in ("transformer.wte.weight", "lm_head.weight"):
            start = self.rank * self.per_rank
            rows = tensor[start:min(start + self.per_rank, self.config.vocab_size)]
            if rows.shape[0] < self.per_rank:  # the last rank of an uneven split: zero rows, never looked up
                rows = torch.cat([rows, rows.new_zeros(self.per_rank - rows.shape[0], *rows.shape[1:])])
            return rows.contiguous()
        if parts[:2] != ["transformer", "h"]:
            return tensor[:]
        layer = ".".join(parts[3:5])
        if layer == "attn.c_attn":  # [q; k; v] rows: this rank's heads of each
            full, a = self.config.num_attention_heads * self.config.head_dim, self.rank * self.width
            return torch.cat([tensor[i * full + a:i * full + a + self.width] for i in range(3)]).contiguous()
        if layer in ("mlp.w1", "mlp.w2"):
            a = self.rank * self.inner
            return tensor[a:a + self.inner].contiguous()
        if layer in ("attn.c_proj", "mlp.c_proj") and parts[-1] == "weight":
            n = self.width if layer == "attn.c_proj" else self.inner
            return tensor[:, self.rank * n:(self.rank + 1) * n].contiguous()
        return tensor[:]  # norms and the row-parallel biases: replicated


def decode_traffic(config: QWenConfig, world: int, element_bytes: int, batch: int = 1) -> dict:
    """Communication of one decode step (one token per row): the all-reduces (2 per block + the embedding),
    the logits all-gather, and what each rank sends with ring collectives."""
    reduces = 2 * config.num_hidden_layers + 1
    reduce_bytes = batch * config.hidden_size * element_bytes
    gather_bytes = batch * -(-config.vocab_size // world) * world * element_bytes
    sent = 2 * (world - 1) / world * reduces * reduce_bytes + (world - 1) / world * gather_bytes
    return {"all_reduces": reduces, "all_reduce_bytes": reduce_bytes, "all_gather_bytes": gather_bytes,
            "bytes_per_step": reduces * reduce_bytes + gather_bytes, "sent_per_rank": int(sent)}
