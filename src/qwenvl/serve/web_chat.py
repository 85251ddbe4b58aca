"""The web page's conversation, without Gradio: pictures and turns, the prompt, streaming from the engine,
the text as the page shows it and the boxes drawn.

As the original `web_demo_mm.py`, uploads join the chat at once and are numbered `Picture N:` across the
whole conversation; they belong to the next question. Each upload is checked once by the server's media
rules and kept as an engine `Picture`, so later turns reuse its cached features.
"""
from __future__ import annotations

import asyncio
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field

from PIL import Image

from .. import images as image_io
from ..boxes import draw_boxes, parse_boxes
from ..chat import DEFAULT_SYSTEM, reply_ids, stop_words
from ..engine import LLMEngine, Picture
from ..errors import ImageError, QwenVLError, RequestError
from ..generation import SamplingParams
from .media import MediaPolicy, MediaTooLarge
from .prompt import PromptBuilder
from .protocol import ImagePart, ImageURL, Message, TextPart

DRAWING_SIDE = 1024  # drawings are shown at most this many pixels wide or high
_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")


def shown(text: str, final: bool = True) -> str:
    """The answer as the page shows it: the original's `_remove_image_special` (ref phrases kept, box and quad
    bodies removed, an unclosed one to the end); while streaming, a tag still arriving is hidden too."""
    text = text.replace("<ref>", "").replace("</ref>", "")
    text = re.sub(r"<box>.*?(</box>|$)", "", text, flags=re.S)
    text = re.sub(r"<quad>.*?(</quad>|$)", "", text, flags=re.S)
    if not final:
        at = text.rfind("<")
        if at >= 0 and any(tag.startswith(text[at:]) for tag in _TAGS):
            text = text[:at]
    return text


@dataclass
class Upload:
    picture: Picture
    image: Image.Image
    name: str
    path: str  # the uploaded file, shown in the chat
    number: int  # N of `Picture N:`, counted over the whole conversation


@dataclass
class Turn:
    pictures: list[Upload]
    question: str
    answer: str = ""
    answered: bool = False  # the answer ran to its end
    drawing: str | None = None  # file of the answer's boxes drawn on its picture


@dataclass
class Settings:
    system: str = DEFAULT_SYSTEM
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.8
    max_new_tokens: int = 512
    seed: str | int | None = None  # empty: random


class Conversation:
    def __init__(self, engine: LLMEngine, tokenizer, media: MediaPolicy | None = None, max_images: int = 8,
                 folder: str | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        self.media = media or MediaPolicy()
        self.max_images = max_images
        self.builder = PromptBuilder(tokenizer, engine.model.generation_config.max_window_size)
        self.folder = folder or tempfile.mkdtemp(prefix="qwenvl-web-")
        self.turns: list[Turn] = []
        self.waiting: list[Upload] = []  # uploaded, not yet asked about

    # ---- pictures ----------------------------------------------------------------------------------

    @property
    def uploads(self) -> list[Upload]:
        return [u for t in self.turns for u in t.pictures] + self.waiting

    def add_picture(self, path: str, name: str | None = None) -> Upload:
        """Check an uploaded file by the server's media rules; refusals name the file and the limit."""
        label = image_io.short_label(name or os.path.basename(path))
        if len(self.uploads) >= self.max_images:
            raise MediaTooLarge(f"image {label}: the conversation already holds {self.max_images} pictures, the "
                                "server's limit (--max-images-per-request); clear it or undo a turn")
        size = os.path.getsize(path)
        if size > self.media.limits.max_bytes:
            raise self.media.too_large(label, size)
        with open(path, "rb") as f:
            image = self.media.decode(f.read(), label).convert("RGB")
        upload = Upload(Picture(image, self.engine.model.config.visual.image_size), image, label, path,
                        len(self.uploads) + 1)
        self.waiting.append(upload)
        return upload

    # ---- the prompt --------------------------------------------------------------------------------

    def messages(self, system: str) -> list[Message]:
        """The conversation as OpenAI messages; the last turn's question is the query."""
        def user(t: Turn) -> Message:
            parts = [ImagePart(type="image_url", image_url=ImageURL(url=str(u.number))) for u in t.pictures]
            return Message(role="user", content=parts + [TextPart(type="text", text=t.question)])

        out = [Message(role="system", content=system)] if system.strip() else []
        for t in self.turns[:-1]:
            out += [user(t), Message(role="assistant", content=t.answer)]
        return out + [user(self.turns[-1])]

    def prompt(self, system: str) -> tuple[list[int], list[Picture]]:
        """Token ids (spans as pads) and the pictures of the spans, the oldest turns dropped by the window."""
        prompt = self.builder.chat(self.messages(system), number_across_turns=True)
        by_number = {str(u.number): u.picture for u in self.uploads}
        return prompt.ids, [by_number[n] for n in prompt.urls]

    def sampling(self, settings: Settings, prompt_len: int) -> SamplingParams:
        room = self.engine.max_model_len - prompt_len
        if room < 2:
            raise RequestError(f"the conversation is {prompt_len} tokens, too long for the engine's "
                               f"{self.engine.max_model_len} tokens per conversation: clear it or undo turns")
        seed = settings.seed
        if isinstance(seed, str):
            try:
                seed = int(seed) if seed.strip() else None
            except ValueError:
                raise RequestError(f"seed: {seed!r} is not a whole number (leave it empty for a random one)") \
                    from None
        options = {"do_sample": settings.temperature > 0, "temperature": settings.temperature or 1.0,
                   "top_p": settings.top_p, "max_new_tokens": min(int(settings.max_new_tokens), room - 1),
                   "stop_words_ids": stop_words(self.tokenizer)}
        if seed is not None:
            options["seed"] = seed
        return SamplingParams.build(self.engine.model.generation_config, **options)

    # ---- answering ---------------------------------------------------------------------------------

    def ask(self, question: str) -> Turn:
        """A new turn with the waiting pictures; answer it with `answer_stream`."""
        if not question.strip():
            raise RequestError("the question is empty")
        turn = Turn(self.waiting, question)
        self.waiting = []
        self.turns.append(turn)
        return turn

    async def answer_stream(self, settings: Settings):
        """The last turn's growing answer (raw, tags kept), from the engine; the request is aborted when the
        consumer stops listening. The turn keeps the final answer and its drawing."""
        turn = self.turns[-1]
        self._forget_drawing(turn)
        turn.answer, turn.answered = "", False
        ids, pictures = self.prompt(settings.system)
        params = self.sampling(settings, len(ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq = self.engine.add_request(ids, params, images=pictures,
                                      listener=lambda s, _: loop.call_soon_threadsafe(queue.put_nowait, None))
        try:
            while not seq.finished:
                await queue.get()
                text = self.tokenizer.decode(reply_ids(seq.output, self.tokenizer), errors="replace").strip()
                if text != turn.answer and not text.endswith("\ufffd"):  # U+FFFD: a character still incomplete
                    turn.answer = text
                    yield text
            if seq.error is not None:
                raise RequestError(f"the answer failed in the engine: {seq.error}")
            final = self.tokenizer.decode(reply_ids(seq.output, self.tokenizer), errors="replace").strip()
            if final != turn.answer:
                turn.answer = final
                yield final
            turn.drawing, turn.answered = self.draw(turn), True
        finally:
            if not seq.finished:
                self.engine.abort(seq)

    def draw(self, turn: Turn) -> str | None:
        """The answer's boxes on the picture the question names (`Picture N`), else the latest one so far."""
        boxes = parse_boxes(turn.answer)
        if not boxes:
            return None
        so_far = [u for t in self.turns[:self.turns.index(turn) + 1] for u in t.pictures]
        named = {u.number: u for u in so_far}
        picked = [named[int(n)] for n in re.findall(r"Picture\s*(\d+)", turn.question) if int(n) in named]
        target = picked[-1] if picked else (so_far[-1] if so_far else None)
        if target is None:
            return None
        image = target.image.copy()
        image.thumbnail((DRAWING_SIDE, DRAWING_SIDE))
        path = os.path.join(self.folder, f"drawing-{uuid.uuid4().hex}.png")
        draw_boxes(image, boxes).save(path)
        return path

    @property
    def pending(self) -> bool:
        """The last question waits for its answer (asked, regenerated, or stopped before its end)."""
        return bool(self.turns) and not self.turns[-1].answered

    # ---- editing -----------------------------------------------------------------------------------

    def undo(self) -> str | None:
        """Take back the last thing: a picture not asked about yet, else the last turn, whose pictures wait
        again and whose question is returned (the page puts it back in the box)."""
        if self.waiting:
            self.waiting.pop()
            return None
        if not self.turns:
            return None
        turn = self.turns.pop()
        self._forget_drawing(turn)
        self.waiting = turn.pictures
        return turn.question

    def clear(self) -> None:
        for t in self.turns:
            self._forget_drawing(t)
        self.turns, self.waiting = [], []

    @staticmethod
    def _forget_drawing(turn: Turn) -> None:
        if turn.drawing and os.path.exists(turn.drawing):
            os.remove(turn.drawing)
        turn.drawing = None


def refusal(error: QwenVLError) -> str:
    """The one-line message a page shows for a refused upload or question."""
    return str(error) if isinstance(error, (ImageError, RequestError)) else f"{type(error).__name__}: {error}"
