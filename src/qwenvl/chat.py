"""ChatML prompts and the chat surfaces (SPEC section 7)."""
from __future__ import annotations

from typing import Iterator

import torch

from .errors import OptionsError, RequestError
from .generation import SamplingParams, iter_tokens

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def make_context(tokenizer, query: str, history=None, system: str = "", max_window_size: int = 6144,
                 chat_format: str = "chatml") -> tuple[str, list[int]]:
    """The original's prompt text and ids: newest history turns first while under max_window_size."""
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise OptionsError(f"unknown chat_format {chat_format!r}; use 'chatml' or 'raw'")
    history = check_history(history)
    tags = set(tokenizer.IMAGE_ST)  # inside turns only the image/box tags are special
    nl = tokenizer.encode("\n")
    start, end = [tokenizer.im_start_id], [tokenizer.im_end_id]

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        if not isinstance(content, str):
            raise RequestError(f"a {role} turn must be text, got {type(content).__name__} "
                               "(use tokenizer.from_list_format to build text with images)")
        ids = tokenizer.encode(role, allowed_special=tags) + nl + tokenizer.encode(content, allowed_special=tags)
        return f"{IM_START}{role}\n{content}{IM_END}", start + ids + end

    system_text, system_ids = turn("system", system)
    raw_text, context = "", []
    for query_i, response_i in reversed(history):
        query_text, query_ids = turn("user", query_i)
        if response_i is not None:
            response_text, response_ids = turn("assistant", response_i)
            next_ids = nl + query_ids + nl + response_ids
            next_text = f"\n{query_text}\n{response_text}"
        else:
            next_ids, next_text = nl + query_ids + nl, f"\n{query_text}\n"
        if len(system_ids) + len(next_ids) + len(context) >= max_window_size:
            break
        context, raw_text = next_ids + context, next_text + raw_text
    query_text, query_ids = turn("user", query)
    context = system_ids + context + nl + query_ids + nl + start + tokenizer.encode("assistant") + nl
    raw_text = system_text + raw_text + f"\n{query_text}\n{IM_START}assistant\n"
    return raw_text, context


def check_history(history) -> list:
    """`history` as a list of (query, response) pairs, as `chat` returns it; a tuple becomes a list.

    OpenAI-style message dicts are refused rather than read: unpacking a dict gives its keys, so they
    would silently become the turns 'role' and 'content'."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise RequestError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    for i, turn in enumerate(history):
        if isinstance(turn, dict):
            raise RequestError(f"history item {i} is a dict (OpenAI-style messages?); history is a list of "
                               "(query, response) pairs: pair each user message with the assistant's reply")
        if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not isinstance(turn[0], str) \
                or not (turn[1] is None or isinstance(turn[1], str)):
            raise RequestError(f"history item {i} must be a (query, response) pair of strings, got "
                               f"{str(turn)[:80]!r}")
    return history if isinstance(history, list) else list(history)


def stop_words(tokenizer) -> list[list[int]]:
    return [[tokenizer.im_end_id], [tokenizer.im_start_id]]


def reply_ids(ids: list[int], tokenizer, drop_last_if_cut: bool = False) -> list[int]:
    """New ids up to (not including) the first end-of-turn or end-of-text id.

    With drop_last_if_cut, an answer cut off by max_new_tokens also loses its last token: the original's
    `_decode_chatml` does this (its search loop ends on the last index), and chat responses must match it.
    """
    ends = {tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id}
    for i, t in enumerate(ids):
        if t in ends:
            return ids[:i]
    return ids[:-1] if drop_last_if_cut else ids


def _prepare(model, tokenizer, query, history, system, kwargs):
    if query is None or (isinstance(query, str) and not query.strip()):
        raise RequestError("the query is empty")
    if isinstance(query, list):
        query = tokenizer.from_list_format(query)
    generation_config = kwargs.pop("generation_config", None) or model.generation_config
    max_window_size = kwargs.pop("max_window_size", None) or generation_config.max_window_size
    _, context = make_context(tokenizer, query, history=history, system=system, max_window_size=max_window_size,
                              chat_format=generation_config.chat_format)
    stops = [list(s) for s in (kwargs.pop("stop_words_ids", None) or [])] + stop_words(tokenizer)
    kwargs.pop("stream", None)
    params = SamplingParams.build(generation_config, stop_words_ids=stops, **kwargs)
    return query, torch.tensor([context]), params, generation_config.chat_format


def chat(model, tokenizer, query, history=None, system: str = DEFAULT_SYSTEM, append_history: bool = True,
         **kwargs) -> tuple[str, list]:
    """One chat turn: (response, history), the history extended with (query, response) when append_history."""
    history = check_history(history)
    query, input_ids, params, chat_format = _prepare(model, tokenizer, query, history, system, kwargs)
    new = [int(t) for t in iter_tokens(model, input_ids, params=params)]
    cut = chat_format == "chatml"  # only the original's ChatML decoder has the quirk
    response = tokenizer.decode(reply_ids(new, tokenizer, drop_last_if_cut=cut), errors="replace").strip()
    if append_history:
        history.append((query, response))
    return response, history


def chat_stream(model, tokenizer, query, history=None, system: str = DEFAULT_SYSTEM, **kwargs) -> Iterator[str]:
    """Yield the growing response text; `<ref>`/`<box>` tags are kept and no multi-byte character is split."""
    history = check_history(history)
    query, input_ids, params, _ = _prepare(model, tokenizer, query, history, system, kwargs)
    new: list[int] = []
    shown = ""
    for token in iter_tokens(model, input_ids, params=params):
        new.append(int(token))
        text = tokenizer.decode(reply_ids(new, tokenizer), errors="replace").strip()
        if text != shown and not text.endswith("\ufffd"):  # U+FFFD at the end: a character still incomplete
            shown = text
            yield text
    final = tokenizer.decode(reply_ids(new, tokenizer), errors="replace").strip()
    if final != shown:
        yield final
