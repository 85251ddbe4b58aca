"""OpenAI messages -> ChatML token ids + the pictures' URLs, the same ids `make_context` builds for
`model.chat` (system, the newest earlier turns within max_window_size, the query, `assistant\\n`).

Text a client sends is always plain text: `<img>`, `<ref>`, `<box>` or `<|im_start|>` typed in it are
ordinary characters, never an image path or a control token. A picture is a span of `<img>` + 256 pads +
`</img>` with its pixels handed beside the ids, introduced by `Picture n:` as `from_list_format` writes
it. An assistant turn keeps the model's own `<ref>`/`<box>`/`<quad>` markup, so answers round-trip.
"""
from __future__ import annotations

from ..chat import DEFAULT_SYSTEM
from ..errors import RequestError
from ..images import IMAGE_PAD_ID, IMAGE_SPAN
from .protocol import ImagePart, Message

GROUNDING_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")


class Prompt:
    """Token ids and the image URLs of their spans, in order."""

    def __init__(self, ids: list[int], urls: list[str]):
        self.ids, self.urls = ids, urls


class PromptBuilder:
    def __init__(self, tokenizer, max_window_size: int = 6144):
        self.tokenizer = tokenizer
        self.max_window_size = max_window_size
        self.span = [tokenizer.img_start_id] + [IMAGE_PAD_ID] * IMAGE_SPAN + [tokenizer.img_end_id]
        self.nl = tokenizer.encode("\n")

    def text(self, text: str, tags=()) -> list[int]:
        return self.tokenizer.encode(text, allowed_special=set(tags), disallowed_special=()) if text else []

    def content(self, content, field: str, role: str, first: int = 0) -> Prompt:
        """A message's content: a string, or text and image_url parts (numbered from `first` + 1)."""
        if content is None:
            content = ""
        if isinstance(content, str):
            return Prompt(self.text(content, GROUNDING_TAGS if role == "assistant" else ()), [])
        ids, urls, pending = [], [], ""
        for i, part in enumerate(content):
            if isinstance(part, ImagePart):
                if role != "user":
                    raise RequestError(f"{field}[{i}]: only user messages can hold images")
                urls.append(part.image_url.url)
                ids += self.text(pending + f"Picture {first + len(urls)}:") + self.span
                pending = "\n"
            else:
                pending += part.text
        ids += self.text(pending, GROUNDING_TAGS if role == "assistant" else ())
        return Prompt(ids, urls)

    def turn(self, role: str, content: Prompt) -> Prompt:
        tk = self.tokenizer
        return Prompt([tk.im_start_id] + tk.encode(role) + self.nl + content.ids + [tk.im_end_id], content.urls)

    def chat(self, messages: list[Message], number_across_turns: bool = False) -> Prompt:
        """With number_across_turns the pictures are numbered over the whole conversation, as the original web
        demo does (old turns dropped by the window keep their numbers); else from 1 in each message."""
        system_parts, turns, seen = [], [], 0
        for i, message in enumerate(messages):
            field = f"messages[{i}]"
            role = "system" if message.role == "developer" else message.role
            if role == "system":
                if turns:
                    raise RequestError(f"{field}.role: a system message must come before the conversation")
                system_parts.append(self.content(message.content, f"{field}.content", "system"))
                continue
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise RequestError(f"{field}.role: expected {expected!r} (user and assistant messages alternate, "
                                   f"starting with user), got {role!r}")
            turns.append(self.content(message.content, f"{field}.content", role, seen if number_across_turns else 0))
            seen += len(turns[-1].urls)
        if not turns or len(turns) % 2 == 0:
            raise RequestError("messages: the last message must be from the user")
        if system_parts:
            system = Prompt(sum((p.ids for p in system_parts), []), [])
        else:
            system = Prompt(self.text(DEFAULT_SYSTEM), [])
        system = self.turn("system", system)
        context, urls = [], []
        pairs = [(turns[j], turns[j + 1]) for j in range(0, len(turns) - 1, 2)]
        for query, response in reversed(pairs):  # newest first, as long as they fit (make_context's rule)
            q, r = self.turn("user", query), self.turn("assistant", response)
            next_ids = self.nl + q.ids + self.nl + r.ids
            if len(system.ids) + len(next_ids) + len(context) >= self.max_window_size:
                break
            context, urls = next_ids + context, q.urls + urls
        query = self.turn("user", turns[-1])
        tk = self.tokenizer
        ids = system.ids + context + self.nl + query.ids + self.nl + [tk.im_start_id] + tk.encode("assistant") + self.nl
        return Prompt(ids, urls + query.urls)

    def completion(self, prompt: str | list[int], urls: list[str]) -> Prompt:
        """A base model's prompt: `Picture n:<img></img>\\n` per image, then the text (or the token ids)."""
        ids = []
        for n in range(1, len(urls) + 1):
            ids += self.text(("\n" if n > 1 else "") + f"Picture {n}:") + self.span
        if isinstance(prompt, str):
            return Prompt(ids + self.text(("\n" if urls else "") + prompt), list(urls))
        return Prompt(ids + (self.nl if urls else []) + list(prompt), list(urls))
