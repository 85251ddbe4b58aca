"""Qwen-VL: the decoder with the vision tower's output spliced into the image spans (SPEC section 5).

`QWenLMHeadModel` keeps the checkpoint's module names (`transformer.h.{i}...`, `transformer.visual...`,
`lm_head`) and the original's call surfaces (`model(input_ids=...).logits`, `generate`, `chat`,
`chat_stream`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import processor
from ..config import GenerationConfig, QWenConfig
from ..errors import RequestError
from .language import Block, KVCache, Linear, RMSNorm, Rotary, Step, logn_scale, ntk_alpha
from .vision import VisionTower

IMAGE_FEATURE_BATCH = 8  # images through the ViT at once


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Softmax precision: half-precision logits go to float32, float64 ones stay."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class SharedRows:
    """lm_head rows known to be equal (ids a training set never has, tied at initialization and kept so):
    `rows` are the ids whose rows can differ, the last of them standing for `count` ids that share its row.

    The training loss then scores len(rows) columns instead of the whole vocabulary, exactly: the shared row's
    logit enters the softmax with weight `count` (+ log count), and its gradient is that of one of the rows,
    which is what each of them would get. `lookup` maps an id to its column (-1: one of the shared)."""
    rows: torch.Tensor
    count: int
    lookup: torch.Tensor

    @classmethod
    def from_shared(cls, shared: torch.Tensor, vocab_size: int) -> "SharedRows":
        """From the ids that share one row (the first of them kept as its column)."""
        keep = torch.ones(vocab_size, dtype=torch.bool)
        keep[shared] = False
        rows = torch.cat([keep.nonzero().flatten(), shared[:1]])
        lookup = torch.full((vocab_size,), -1, dtype=torch.long)
        lookup[rows] = torch.arange(len(rows))
        return cls(rows, len(shared), lookup)

    def loss(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        columns = self.lookup.to(targets.device)[targets]
        if bool((columns < 0).any()) or bool((columns == len(self.rows) - 1).any()):
            raise ValueError("a target id is one of the shared lm_head rows; the shared set does not fit the data")
        rows = self.rows.to(weight.device)
        shared = weight[rows[-1:]]
        shared = shared.detach() + (shared - shared.detach()) / self.count  # same value, 1/count of the gradient
        logits = _at_least_float32(F.linear(hidden, torch.cat([weight[rows[:-1]], shared])))
        logits = torch.cat([logits[:, :-1], logits[:, -1:] + math.log(self.count)], dim=1)
        return F.cross_entropy(logits, columns, reduction=reduction)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    num_tokens: int | None = None  # supervised tokens behind `loss`


@dataclass
class Rows:
    """Per-row facts of a left-padded batch, fixed at prefill."""

    pads: torch.Tensor  # [B] left-pad columns of each row
    alphas: list[float]  # dynamic-NTK alpha of each row
    padded: bool  # any row has padding (then masks are needed)


class QWenModel(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTower(config.visual)
        self.rotary = Rotary(config.rotary_dim, config.rotary_emb_base)
        self.gradient_checkpointing = False
        self.layer_devices: list[torch.device] | None = None  # each block's device under a device_map (placement.py)

    def run_blocks(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        devices = self.layer_devices
        for i, block in enumerate(self.h):
            if devices is not None and (i == 0 or devices[i] != devices[i - 1]):
                x, step = x.to(devices[i]), step.to(devices[i])
            step.layer = i
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, step, use_reentrant=False)
            else:
                x = block(x, step)
        return self.ln_f(x.to(self.ln_f.weight.device))


class QWenLMHeadModel(nn.Module):
    def __init__(self, config: QWenConfig, generation_config: GenerationConfig | None = None):
        super().__init__()
        self.config = config
        self.generation_config = generation_config or GenerationConfig()
        self.transformer = QWenModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # Set when the model is sharded (FSDP): every rank must run the vision tower, once, in every forward.
        self.sync_vision = False
        self.tp = None  # the tensor-parallel group (model/parallel.py) when this is one rank's share
        self.local_heads = config.num_attention_heads  # attention heads (and KV cache heads) on this rank

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype  # the embedding stays float when lm_head is quantized

    # ---- images -----------------------------------------------------------------------------------

    def encode_images(self, images) -> torch.Tensor:
        """Pictures -> features [n, 256, hidden]: pixel tensors [n, 3, S, S] (or a list of [3, S, S]); other
        kinds (paths, URLs, data URIs, bytes, PIL images) are loaded by the processor first."""
        if not isinstance(images, torch.Tensor):
            images = [processor.picture_of(im, self.config.visual.image_size).pixels for im in images]
            if not images:
                return torch.empty(0, self.config.visual.n_queries, self.config.visual.output_dim,
                                   dtype=self.dtype, device=self.device)
            images = torch.stack(images)
        chunk = len(images) if self.sync_vision else IMAGE_FEATURE_BATCH
        return torch.cat([self.transformer.visual(images[i:i + chunk].to(self.device))
                          for i in range(0, len(images), chunk)])

    def image_spans(self, input_ids: torch.Tensor) -> list[tuple[int, int]]:
        """(row, column of <img>) of every image span, row-major; checks each span is 258 tokens."""
        return processor.image_spans(self.config, input_ids)

    def embed(self, input_ids: torch.Tensor, images: list | None = None) -> torch.Tensor:
        """Token embeddings with each image span's 256 positions replaced by its picture's features.

        `images`: one entry per span, pixels [3, S, S] or features [256, hidden], as the processor gives
        them (`processor.prompt_pixels`); the model reads no files."""
        x = self.transformer.wte(input_ids)
        spans = self.image_spans(input_ids)
        if not spans:
            if images:
                raise RequestError(f"{len(images)} images were given but the prompt has no <img></img> span")
            if self.sync_vision:  # the original's "fake image": keeps sharded ranks in step, gradients defined
                size = self.config.visual.image_size
                x = x + self.encode_images(torch.zeros(1, 3, size, size, device=self.device)).mean() * 0
            return x
        if images is None or len(images) != len(spans):
            raise RequestError(f"{0 if images is None else len(images)} images were given for {len(spans)} "
                               "<img></img> spans in the prompt (processor.prompt_pixels gives one per span)")
        if isinstance(images, torch.Tensor):  # a stack of pixels [n, 3, S, S], one per span (training batches)
            features = list(self.encode_images(images))
        elif all(isinstance(im, torch.Tensor) for im in images):
            pixels = {id(im): im for im in images if not processor.is_features(im)}  # a repeated picture: once
            encoded = dict(zip(pixels, self.encode_images(torch.stack(list(pixels.values()))))) if pixels else {}
            features = [im if processor.is_features(im) else encoded[id(im)] for im in images]
        else:
            raise RequestError("embed takes pixel or feature tensors; load pictures with qwenvl.processor")
        x = x.clone()
        for (r, a), f in zip(spans, features):
            x[r, a + 1:a + 1 + f.shape[0]] = f.to(x.device, x.dtype)
        return x

    # ---- decoder ----------------------------------------------------------------------------------

    def rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Rows:
        b, t = input_ids.shape
        if attention_mask is None:
            pads = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        else:
            attention_mask = attention_mask.to(input_ids.device)
            pads = t - attention_mask.long().sum(1)
            expected = torch.arange(t, device=input_ids.device)[None, :] >= pads[:, None]
            if not torch.equal(attention_mask.bool(), expected):
                raise RequestError("attention_mask must describe left padding (zeros, then ones, in every row); "
                                 "set tokenizer.padding_side = 'left'")
            if bool((pads == t).any()):
                raise RequestError("a row of the batch is all padding")
        lengths = (t - pads).tolist()
        use_ntk = self.config.use_dynamic_ntk and not self.training
        alphas = [ntk_alpha(n, self.config.seq_length) if use_ntk else 1.0 for n in lengths]
        return Rows(pads=pads, alphas=alphas, padded=bool((pads > 0).any()))

    def step(self, rows: Rows, start: int, length: int, cache: KVCache | None) -> Step:
        """Rotary tables, log-n scale and mask for columns [start, start + length) of every row."""
        device = rows.pads.device
        columns = torch.arange(start, start + length, device=device)
        positions = (columns[None, :] - rows.pads[:, None]).clamp(min=0)
        cos, sin = self.transformer.rotary.tables(positions, rows.alphas)
        logn = logn_scale(positions, self.config.seq_length) if self.config.use_logn_attn and not self.training else None
        mask = None
        if rows.padded:
            keys = torch.arange(start + length, device=device)
            mask = (keys[None, None, :] <= columns[None, :, None]) & (keys[None, None, :] >= rows.pads[:, None, None])
            # a pad query attends to itself, so no row of the softmax is empty (that would give NaN)
            mask |= keys[None, None, :] == columns[None, :, None]
            mask = mask[:, None]
        return Step(cos=cos, sin=sin, logn=logn, mask=mask, start=start, cache=cache)

    def full_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, segment_ids: torch.Tensor | None) -> Step:
        """Tables and mask for a whole batch without cache: any padding side, packed rows isolated."""
        b, t = input_ids.shape
        device = input_ids.device
        valid = None if attention_mask is None else attention_mask.to(device).bool()
        if position_ids is None:
            position_ids = (valid.long().cumsum(1) - 1).clamp(min=0) if valid is not None else \
                torch.arange(t, device=device).expand(b, t)
        position_ids = position_ids.to(device)
        inference = not self.training
        lengths = (position_ids.max(1).values + 1).tolist()  # a row's length; a packed row's longest sample
        alphas = [ntk_alpha(n, self.config.seq_length) if self.config.use_dynamic_ntk and inference else 1.0
                  for n in lengths]
        cos, sin = self.transformer.rotary.tables(position_ids, alphas)
        logn = logn_scale(position_ids, self.config.seq_length) if self.config.use_logn_attn and inference else None
        mask = None
        if segment_ids is not None or (valid is not None and not bool(valid.all())):
            index = torch.arange(t, device=device)
            mask = (index[None, :] <= index[:, None])[None]
            if valid is not None:
                mask = mask & valid[:, None, :]
            if segment_ids is not None:
                segments = segment_ids.to(device)
                mask = mask & (segments[:, :, None] == segments[:, None, :])
            mask = (mask | torch.eye(t, dtype=torch.bool, device=device))[:, None]  # pads attend to themselves
        return Step(cos=cos, sin=sin, logn=logn, mask=mask, start=0, cache=None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: list | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                reduction: str = "mean", shared_rows: SharedRows | None = None, **ignored) -> CausalLMOutput:
        """Every position at once (no cache), for scoring and training; any padding side.

        `segment_ids` (0 = padding, 1, 2, ... per sample) with `position_ids` restarting per sample isolate
        samples packed into one row. With `labels` (unshifted, -100 = ignored), only the supervised positions
        go through lm_head: the result has the loss (`reduction` "mean" or "sum") and no logits; `shared_rows`
        computes the same loss without the lm_head rows it knows are equal (see SharedRows).
        """
        input_ids = input_ids.to(self.device)
        images = processor.prompt_pixels(self.config, input_ids, images)
        step = self.full_step(input_ids, attention_mask, position_ids, segment_ids)
        hidden = self.transformer.run_blocks(self.embed(input_ids, images), step)
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden))
        targets = labels[:, 1:].to(self.device)
        supervised = targets != -100
        if segment_ids is not None:  # a sample's last token does not predict the next sample's first
            segments = segment_ids.to(self.device)
            supervised &= segments[:, 1:] == segments[:, :-1]
        count = int(supervised.sum())
        if count == 0:  # keeps the graph (and the gradient, zero) when a batch has nothing to learn
            return CausalLMOutput(logits=None, loss=hidden.sum() * 0.0, num_tokens=0)
        if shared_rows is not None:
            loss = shared_rows.loss(hidden[:, :-1][supervised], self.lm_head.weight, targets[supervised], reduction)
            return CausalLMOutput(logits=None, loss=loss, num_tokens=count)
        logits = self.lm_head(hidden[:, :-1][supervised])
        loss = F.cross_entropy(_at_least_float32(logits), targets[supervised], reduction=reduction)
        return CausalLMOutput(logits=None, loss=loss, num_tokens=count)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, images: list | None,
                max_new_tokens: int) -> tuple[torch.Tensor, KVCache, Rows]:
        """Run the prompt into a fresh cache sized for `max_new_tokens` more; return the last logits [B, V]."""
        b, t = input_ids.shape
        rows = self.rows(input_ids, attention_mask)
        cache = KVCache.allocate(self.config, b, t + max_new_tokens, self.dtype, self.device, heads=self.local_heads,
                                 layer_devices=self.transformer.layer_devices)
        hidden = self.transformer.run_blocks(self.embed(input_ids, images), self.step(rows, 0, t, cache))
        cache.length = t
        return self.lm_head(hidden[:, -1]), cache, rows

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, rows: Rows) -> torch.Tensor:
        """One new token per row [B] -> next logits [B, V]."""
        if cache.length >= cache.capacity:
            raise RuntimeError("the KV cache is full")
        x = self.transformer.wte(tokens[:, None])
        hidden = self.transformer.run_blocks(x, self.step(rows, cache.length, 1, cache))
        cache.length += 1
        return self.lm_head(hidden[:, -1])

    def agree(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's sampled tokens on every tensor-parallel rank (unseeded sampling would drift apart)."""
        return tokens if self.tp is None else self.tp.broadcast(tokens)

    # ---- generation and chat (see generation.py and chat.py) --------------------------------------

    def generate(self, input_ids=None, **kwargs):
        from ..generation import generate
        return generate(self, input_ids, **kwargs)

    def chat(self, tokenizer, query, history=None, system="You are a helpful assistant.", **kwargs):
        from ..chat import chat
        return chat(self, tokenizer, query, history=history, system=system, **kwargs)

    def chat_stream(self, tokenizer, query, history=None, system="You are a helpful assistant.", **kwargs):
        from ..chat import chat_stream
        return chat_stream(self, tokenizer, query, history=history, system=system, **kwargs)
