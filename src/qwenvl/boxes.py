"""Grounding output: the `<ref>`/`<box>`/`<quad>` markup of prompts and responses, and drawing it.

Corners are integers in a 0-1000 space relative to the image: pixel x = x / 1000 * width.
`<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` labels a box; one ref may be followed by several boxes.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess

from PIL import Image, ImageDraw, ImageFont

from .errors import RequestError
from .images import short_label

# Closed tag pairs that split a text into elements, keyed by the element name.
TAGS = {"image": ("<img>", "</img>"), "ref": ("<ref>", "</ref>"),
        "box": ("<box>", "</box>"), "quad": ("<quad>", "</quad>")}

# Tableau 10: distinct, deterministic colours, one per ref.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")

# Fonts that cover Chinese, by platform-typical path; fc-match is asked first.
CJK_FONT_PATHS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simsun.ttc",
)
LATIN_FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
)


def split_tags(text: str, strict: bool = True) -> list[dict]:
    """Split text into `{'text'|'image'|'ref'|'box'|'quad': str}` elements, one per closed tag pair.

    Each opening tag is paired with the next closing tag of its kind (the original's rule). An opening
    tag that is never closed raises RequestError if `strict`, else it stays text and the scan goes on
    after it (so `<ref>a<box>...</box>` still yields its box).

    Linear time: the next position of every tag is remembered and searched again only once the scan has
    passed it (searching from scratch for each element made 32,000 refs take 18 s).
    """
    elements, pos, text_start = [], 0, 0
    next_open = {name: text.find(open_tag) for name, (open_tag, _) in TAGS.items()}
    next_close = dict.fromkeys(TAGS, -2)  # -2: not searched yet; -1: none left
    while True:
        for name, (open_tag, _) in TAGS.items():
            if -1 < next_open[name] < pos:
                next_open[name] = text.find(open_tag, pos)
        start, name = min(((i, n) for n, i in next_open.items() if i != -1), default=(-1, None))
        if start == -1:
            break
        open_tag, close_tag = TAGS[name]
        body = start + len(open_tag)
        if next_close[name] == -2 or -1 < next_close[name] < body:
            next_close[name] = text.find(close_tag, body)
        end = next_close[name]
        if end == -1:
            if strict:
                raise RequestError(f"unclosed {open_tag} in {short_label(text[start:])!r}: close it with {close_tag}")
            pos = body
            continue
        if start > text_start:
            elements.append({"text": text[text_start:start]})
        elements.append({name: text[body:end]})
        pos = text_start = end + len(close_tag)
    if text_start < len(text):
        elements.append({"text": text[text_start:]})
    return elements


def _parse_ints(body: str, count: int) -> tuple[int, ...] | None:
    """'(1,2),(3,4)' -> (1, 2, 3, 4) when it holds exactly `count` integers, else None."""
    try:
        numbers = tuple(int(v) for v in body.replace("(", "").replace(")", "").split(","))
    except ValueError:
        return None
    return numbers if len(numbers) == count else None


def _parse_shapes(text: str, kind: str, count: int) -> list[tuple[tuple[int, ...], str | None]]:
    """(numbers, ref) for every well-formed `kind` element; a ref labels the run of shapes right after it."""
    shapes, ref = [], None
    for element in split_tags(text, strict=False):
        if "ref" in element:
            ref = element["ref"].strip()
        elif kind in element:
            numbers = _parse_ints(element[kind], count)
            if numbers is not None:
                shapes.append((numbers, ref))
        else:
            ref = None
    return shapes


def parse_boxes(text: str) -> list[dict]:
    """Every box of a response: `{"box": (x1, y1, x2, y2), "ref": str | None}` in the 0-1000 space."""
    return [{"box": numbers, "ref": ref} for numbers, ref in _parse_shapes(text, "box", 4)]


def parse_quads(text: str) -> list[dict]:
    """Every quad of a response: `{"quad": ((x1, y1), ..., (x4, y4)), "ref": str | None}`."""
    return [{"quad": tuple(zip(numbers[::2], numbers[1::2])), "ref": ref}
            for numbers, ref in _parse_shapes(text, "quad", 8)]


def latest_image(response: str, history=None) -> str | None:
    """The newest image reference: the response's last, else the last of each history query, newest first."""
    for text in [response] + [query for query, _ in reversed(history or [])]:
        images = [e["image"] for e in split_tags(text, strict=False) if "image" in e]
        if images:
            return images[-1]
    return None


def to_pixels(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A 0-1000 box in pixel coordinates of a width x height image (the original drawing helper's /1000)."""
    x1, y1, x2, y2 = box
    return _scale(x1, width), _scale(y1, height), _scale(x2, width), _scale(y2, height)


def _scale(value: int, size: int) -> int:
    try:
        return int(value / 1000 * size)  # in float, as the original: results stay identical
    except OverflowError:  # a coordinate of hundreds of digits: exact integers, truncated toward zero
        scaled = abs(value) * size // 1000
        return scaled if value >= 0 else -scaled


def _fc_match_cjk_font() -> str | None:
    """The file of fontconfig's preferred font that covers Chinese, if fontconfig is installed."""
    if shutil.which("fc-match") is None:
        return None
    try:
        out = subprocess.run(["fc-match", "-s", "-f", "%{file}\t%{lang}\n", "sans-serif:lang=zh-cn"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        path, _, langs = line.partition("\t")
        if "zh-cn" in langs.split("|") and os.path.isfile(path):
            return path
    return None


@functools.lru_cache(maxsize=1)
def find_font_path() -> str | None:
    """A CJK-capable font if one is installed, else DejaVuSans, else None (Pillow's built-in font)."""
    candidates = (_fc_match_cjk_font(),) + CJK_FONT_PATHS + LATIN_FONT_PATHS
    return next((p for p in candidates if p and os.path.isfile(p)), None)


def load_font(size: int) -> ImageFont.ImageFont:
    path = find_font_path()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass  # an unreadable font file: fall through to the built-in font
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only a fixed-size bitmap font
        return ImageFont.load_default()


def _text_colour(fill: str) -> str:
    """Black or white, whichever reads better on `fill`."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def _draw_label(draw: ImageDraw.ImageDraw, text: str, corner: tuple[int, int], fill: str, font) -> None:
    """`text` on a filled rectangle just above `corner`, or just inside it at the image's top edge."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 2
    w, h = right - left + 2 * pad, bottom - top + 2 * pad
    x, y = corner
    y = y - h if y - h >= 0 else y
    draw.rectangle((x, y, x + w, y + h), fill=fill)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(fill), font=font)


def draw_boxes(image: Image.Image, boxes: list[dict]) -> Image.Image:
    """A copy of `image` (RGB) with each box outlined and labelled with its ref, one colour per ref."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line_width = max(1, round(min(width, height) / 200))
    font = load_font(max(10, round(min(width, height) / 30)))
    colours: dict[str | None, str] = {}
    for box in boxes:
        colour = colours.setdefault(box.get("ref"), PALETTE[len(colours) % len(PALETTE)])
        # corners far outside the picture move to just past its border (Pillow takes C-sized integers only)
        x1, y1, x2, y2 = (min(max(v, -line_width - 1), limit + line_width)
                          for v, limit in zip(to_pixels(box["box"], width, height), (width, height) * 2))
        x1, x2 = sorted((x1, x2))  # a model may emit corners in either order; PIL needs them ordered
        y1, y2 = sorted((y1, y2))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line_width)
        if box.get("ref"):
            _draw_label(draw, box["ref"], (x1, y1), colour, font)
    return canvas
