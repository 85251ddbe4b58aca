"""Token generation: HF-compatible `generate` over a preallocated KV cache.

The sampling pipeline follows transformers' order: repetition penalty, then temperature, top-k, top-p.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import processor
from .config import GenerationConfig
from .errors import OptionsError, RequestError, UnknownOptionError

_UNSET = object()
OPTIONS = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
           "stop_words_ids", "pad_token_id", "seed"}
# transformers options that official examples pass and that change nothing here
NO_OPS = {"use_cache", "return_dict_in_generate", "output_scores", "output_attentions", "output_hidden_states",
          "num_beams", "num_return_sequences", "bos_token_id", "logits_processor", "synced_gpus",
          "length_penalty"}  # length_penalty only acts in beam search
MIN_SCALE, MAX_SCALE = 1e-4, 1e4  # temperature and repetition_penalty: float32 logits stay finite within


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
            raise UnknownOptionError(f"unknown generation option(s): {', '.join(unknown)}; "
                                     f"supported: {', '.join(sorted(OPTIONS))}")
        if overrides.get("num_beams", 1) not in (1, None) or overrides.get("num_return_sequences", 1) not in (1, None):
            raise OptionsError("beam search and several sequences per prompt are not supported: "
                               "use num_beams=1, num_return_sequences=1")
        if overrides.get("logits_processor"):
            raise OptionsError("custom logits_processor lists are not supported; use the sampling options")
        get = lambda name, default: default if overrides.get(name, _UNSET) is _UNSET or overrides[name] is None \
            else overrides[name]
        eos = overrides.get("eos_token_id", _UNSET)
        eos = generation_config.eos_token_id if eos is _UNSET else eos
        eos = [] if eos is None else [eos] if _is_integer(eos) else _id_list("eos_token_id", eos)
        stops = overrides.get("stop_words_ids") or []
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in stops):
            raise OptionsError(f"stop_words_ids must be a list of token id lists (e.g. [[151645]]), got {stops!r}")
        seed = overrides.get("seed")
        params = cls(
            max_new_tokens=_integer("max_new_tokens", get("max_new_tokens", generation_config.max_new_tokens)),
            min_new_tokens=_integer("min_new_tokens", get("min_new_tokens", 0)),
            do_sample=_flag("do_sample", get("do_sample", generation_config.do_sample)),
            temperature=_real("temperature", get("temperature", generation_config.temperature)),
            top_k=_integer("top_k", get("top_k", generation_config.top_k)),
            top_p=_real("top_p", get("top_p", generation_config.top_p)),
            repetition_penalty=_real("repetition_penalty",
                                     get("repetition_penalty", generation_config.repetition_penalty)),
            eos_token_id=eos,
            stop_words_ids=[_id_list("stop_words_ids", s) for s in stops if len(s)],
            pad_token_id=_integer("pad_token_id", get("pad_token_id", generation_config.pad_token_id)),
            seed=None if seed is None else _integer("seed", seed),
        )
        params.validate()
        return params

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise OptionsError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise OptionsError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        # float32 logits divided by a smaller temperature (or penalty) overflow to inf, and sampling breaks
        if self.do_sample and not MIN_SCALE <= self.temperature <= MAX_SCALE:
            raise OptionsError(f"temperature must be in [{MIN_SCALE:g}, {MAX_SCALE:g}] when sampling, got "
                               f"{self.temperature} (for deterministic answers use do_sample=False / --greedy)")
        if not 0 < self.top_p <= 1:
            raise OptionsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise OptionsError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not MIN_SCALE <= self.repetition_penalty <= MAX_SCALE:
            raise OptionsError(f"repetition_penalty must be in [{MIN_SCALE:g}, {MAX_SCALE:g}] (1 = off), "
                               f"got {self.repetition_penalty}")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:
            raise OptionsError(f"seed must fit in 64 bits (-2**63 <= seed < 2**64), got {self.seed}")


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _integer(name: str, value) -> int:
    if isinstance(value, (bool, str)) or isinstance(value, float):
        raise OptionsError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise OptionsError(f"{name} must be an integer, got {value!r}") from None


def _real(name: str, value) -> float:
    if isinstance(value, (bool, str)):
        raise OptionsError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OptionsError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise OptionsError(f"{name} must be a finite number, got {value!r}")
    return number


def _flag(name: str, value) -> bool:
    if isinstance(value, str) or value not in (True, False):  # bool("False") is True: refuse strings
        raise OptionsError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _id_list(name: str, ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or not all(map(_is_integer, ids)):
        raise OptionsError(f"{name} must hold lists of integer token ids, got {ids!r}")
    return [int(i) for i in ids]


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


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary (the first of equal maxima, as argmax). On CPU, several rows of logits go
    through `_blocked_argmax` (for [32, 151936] bfloat16 about 2.5 ms here against 9-14 ms for `max` and more
    for `argmax`, whose multi-row reductions run far slower than one row's); one row, and other devices, use
    max's indices (3.6x faster than argmax for float32). bfloat16 logits are compared as they are (widening is
    exact and keeps the order, so the indices are the same without copying 4.9M values)."""
    if logits.dtype not in (torch.float32, torch.bfloat16):
        logits = logits.float()
    if logits.dim() == 2 and logits.shape[0] > 1 and logits.device.type == "cpu":
        found = _blocked_argmax(logits)
        if found is not None:
            return found
    return logits.max(-1).indices


ARGMAX_BLOCK = 128


def _blocked_argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """argmax of [R, V] through block maxima: amax over blocks of 128 columns (a reduction that runs at
    memory speed), the first block that holds the row's maximum, and the first column inside it that equals
    it, so ties resolve as argmax's. None where V is not a multiple of the block or a row holds NaN."""
    rows, vocab = logits.shape
    if vocab % ARGMAX_BLOCK:
        return None
    blocks = logits.view(rows, vocab // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block_max = blocks.amax(-1)
    best = block_max.amax(-1, keepdim=True)
    if bool(best.isnan().any()):  # argmax's answer is the first NaN; equality cannot find it
        return None
    first = (block_max == best).to(torch.uint8).argmax(-1)
    inside = blocks[torch.arange(rows, device=logits.device), first]
    return first * ARGMAX_BLOCK + (inside == best).to(torch.uint8).argmax(-1)


def next_tokens(logits: torch.Tensor, sequences: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None, step: int = 0) -> torch.Tensor:
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, sequences, params.repetition_penalty)
    if step < params.min_new_tokens and params.eos_token_id:
        logits[:, params.eos_token_id] = float("-inf")
    if not params.do_sample:
        return greedy(logits)
    probs = warp(logits, params).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _ends_with_stop(sequence: list[int], stop_words: list[list[int]]) -> bool:
    return any(len(sequence) >= len(s) and sequence[-len(s):] == s for s in stop_words)


def iter_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: list | None = None, params: SamplingParams | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B], step by step; finished rows get pad_token_id."""
    params = params or SamplingParams()
    check_positions(model.config, input_ids.shape[-1], params.max_new_tokens)
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= model.config.vocab_size:
        raise RequestError(f"input_ids hold ids outside the vocabulary [0, {model.config.vocab_size}): "
                           f"{int(input_ids.min())} to {int(input_ids.max())}")
    images = processor.prompt_pixels(model.config, input_ids, images)  # each picture loaded once, here
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
            tokens = model.agree(next_tokens(logits, sequences, params, generator, step))
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


def check_positions(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse, before any cache is allocated, a prompt or an answer longer than the model's positions."""
    limit = config.max_position_embeddings
    if prompt_tokens < 1:
        raise RequestError("the prompt is empty: generation needs at least one prompt token")
    if prompt_tokens > limit:
        raise RequestError(f"the prompt has {prompt_tokens} tokens, more than the model's {limit} positions "
                           "(max_position_embeddings): shorten it")
    if prompt_tokens + max_new_tokens > limit:
        raise RequestError(f"the prompt's {prompt_tokens} tokens plus max_new_tokens={max_new_tokens} exceed the "
                           f"model's {limit} positions (max_position_embeddings): ask for at most "
                           f"{limit - prompt_tokens} new tokens or shorten the prompt")


def generate(model, input_ids=None, attention_mask=None, images=None, generation_config=None, **kwargs) -> torch.Tensor:
    """Prompt + new tokens [B, T + n], like transformers' generate (rows that finish early are padded)."""
    if input_ids is None:
        raise RequestError("generate needs input_ids")
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.tensor(input_ids, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as e:
            raise RequestError(f"input_ids must be token ids, one list per row of equal length ({e})") from None
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8, torch.int8):
        raise RequestError(f"input_ids must be integer token ids of shape [batch, length], "
                           f"got {input_ids.dtype} {tuple(input_ids.shape)}")
    params = SamplingParams.build(generation_config or model.generation_config, **kwargs)
    new = list(iter_tokens(model, input_ids, attention_mask, images, params))
    return torch.cat([input_ids.to(model.device), torch.stack(new, dim=1)], dim=1)
