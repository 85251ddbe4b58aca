"""Token generation: HF-compatible `generate` over a preallocated KV cache.

The sampling pipeline follows transformers' order: repetition penalty, then temperature, top-k, top-p.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .config import GenerationConfig

_UNSET = object()
OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
           "stop_words_ids", "pad_token_id", "seed"}
# transformers options that official examples pass and that change nothing here
NO_OPS = {"use_cache", "return_dict_in_generate", "output_scores", "output_attentions", "output_hidden_states",
          "num_beams", "num_return_sequences", "bos_token_id", "logits_processor", "synced_gpus",
          "length_penalty"}  # length_penalty only acts in beam search


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    min_new_tokens: int = 0  # eos is forbidden before this many new tokens (transformers' MinNewTokens rule)
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: list[int] = field(default_factory=list)  # any of these ends a row (it is kept in the output)
    stop_words_ids: list[list[int]] = field(default_factory=list)  # a row ends once it ends with one of these
    pad_token_id: int = 151643
    seed: int | None = None

    @classmethod
    def build(cls, generation_config: GenerationConfig, **overrides) -> "SamplingParams":
        """Per-call overrides on top of generation_config.json; eos_token_id=None means never stop on eos."""
        unknown = sorted(set(overrides) - OPTIONS - NO_OPS)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)}; "
                            f"supported: {', '.join(sorted(OPTIONS))}")
        if overrides.get("num_beams", 1) not in (1, None) or overrides.get("num_return_sequences", 1) not in (1, None):
            raise ValueError("beam search and several sequences per prompt are not supported: "
                             "use num_beams=1, num_return_sequences=1")
        if overrides.get("logits_processor"):
            raise ValueError("custom logits_processor lists are not supported; use the sampling options")
        get = lambda name, default: default if overrides.get(name, _UNSET) in (_UNSET, None) else overrides[name]
        eos = overrides.get("eos_token_id", _UNSET)
        eos = generation_config.eos_token_id if eos is _UNSET else eos
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        params = cls(
            max_new_tokens=int(get("max_new_tokens", generation_config.max_new_tokens)),
            min_new_tokens=int(get("min_new_tokens", 0)),
            do_sample=bool(get("do_sample", generation_config.do_sample)),
            temperature=float(get("temperature", generation_config.temperature)),
            top_k=int(get("top_k", generation_config.top_k)),
            top_p=float(get("top_p", generation_config.top_p)),
            repetition_penalty=float(get("repetition_penalty", generation_config.repetition_penalty)),
            eos_token_id=eos,
            stop_words_ids=[list(s) for s in (overrides.get("stop_words_ids") or []) if len(s)],
            pad_token_id=int(get("pad_token_id", generation_config.pad_token_id)),
            seed=overrides.get("seed"),
        )
        params.validate()
        return params

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule: every token already in the sequence gets its score divided (or multiplied) by penalty."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p (nucleus, keeping at least one token), as transformers does them."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - params.top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, sequences: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None, step: int = 0) -> torch.Tensor:
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, sequences, params.repetition_penalty)
    if step < params.min_new_tokens and params.eos_token_id:
        logits[:, params.eos_token_id] = float("-inf")
    if not params.do_sample:
        return logits.argmax(-1)
    probs = warp(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _ends_with_stop(sequence: list[int], stop_words: list[list[int]]) -> bool:
    return any(len(sequence) >= len(s) and sequence[-len(s):] == s for s in stop_words)


def iter_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: list | None = None, params: SamplingParams | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B], step by step; finished rows get pad_token_id."""
    params = params or SamplingParams()
    generator = None
    if params.do_sample and params.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(int(params.seed))
    batch = input_ids.shape[0]
    sequences = input_ids.to(model.device)
    if attention_mask is not None:  # pads are no part of a row: the repetition penalty sees the row's last token
        sequences = torch.where(attention_mask.to(model.device).bool(), sequences, sequences[:, -1:])
    eos = torch.tensor(params.eos_token_id or [-1], device=model.device)
    done = torch.zeros(batch, dtype=torch.bool, device=model.device)
    generated: list[list[int]] = [[] for _ in range(batch)]
    with torch.inference_mode():
        logits, cache, rows = model.prefill(sequences, attention_mask, images, params.max_new_tokens)
        for step in range(params.max_new_tokens):
            tokens = next_tokens(logits, sequences, params, generator, step)
            tokens = torch.where(done, torch.full_like(tokens, params.pad_token_id), tokens)
            yield tokens
            done |= torch.isin(tokens, eos)
            if params.stop_words_ids:
                for r, t in enumerate(tokens.tolist()):
                    generated[r].append(t)
                    if _ends_with_stop(generated[r], params.stop_words_ids):
                        done[r] = True
            if bool(done.all()) or step == params.max_new_tokens - 1:
                return
            if params.repetition_penalty != 1.0:
                sequences = torch.cat([sequences, tokens[:, None]], dim=1)
            logits = model.decode_step(tokens, cache, rows)


def generate(model, input_ids=None, attention_mask=None, images=None, generation_config=None, **kwargs) -> torch.Tensor:
    """Prompt + new tokens [B, T + n], like transformers' generate (rows that finish early are padded)."""
    if input_ids is None:
        raise ValueError("generate needs input_ids")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    params = SamplingParams.build(generation_config or model.generation_config, **kwargs)
    new = list(iter_tokens(model, input_ids, attention_mask, images, params))
    return torch.cat([input_ids.to(model.device), torch.stack(new, dim=1)], dim=1)
