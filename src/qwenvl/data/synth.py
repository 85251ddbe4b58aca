"""Synthetic pictures (shapes in named colours, sometimes a word) with exact ground truth, written as
conversations in the fine-tuning format (SPEC section 9) for training and scoring.

    qwenvl data synth --out DIR --n 1000 --seed 0 [--split train|test] [--image-size 448] [--lang en,zh]

writes DIR/<split>.json (a JSON list of {"id", "conversations", "meta"}) and DIR/images/<split>_*.png; image
paths in the text are relative to the JSON file. `meta` (ignored by the training loader) holds the task of
every assistant turn, its exact answer and each picture's objects with their boxes in pixels and in the
model's 0-1000 space. The same arguments always give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..boxes import LATIN_FONT_PATHS, find_font_path

# Saturated colours far from every background and from each other (drawn without anti-aliasing, so a
# shape's pixels are exactly its colour).
COLOURS = {"red": (230, 25, 25), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (245, 210, 20),
           "orange": (245, 130, 20), "purple": (140, 50, 180), "pink": (240, 110, 190), "brown": (130, 80, 30),
           "black": (0, 0, 0), "white": (255, 255, 255)}
COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "orange": "橙色", "purple": "紫色",
              "pink": "粉色", "brown": "棕色", "black": "黑色", "white": "白色"}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "五角星", "hexagon": "六边形",
             "diamond": "菱形"}
# Pale backgrounds stay <= 246 per channel so noise never reaches pure white; one dark one for white shapes.
BACKGROUNDS = ((244, 244, 238), (225, 234, 244), (232, 244, 226), (246, 234, 220), (236, 230, 244), (60, 62, 72))
NOISE = 8  # +- per channel
SIZES = {"small": (0.10, 0.15), "medium": (0.17, 0.24), "large": (0.27, 0.34)}  # side / image side
MIN_CONTRAST = 120  # Euclidean RGB distance between a shape colour and its background
GAP = 6  # pixels kept free between objects
WORDS_EN = ("apple", "river", "cloud", "house", "music", "tiger", "paper", "train", "smile", "ocean",
            "bread", "chair", "light", "stone", "dream", "plant")
WORDS_ZH = ("苹果", "河流", "云朵", "房子", "音乐", "老虎", "火车", "海洋", "面包", "椅子", "星星", "花园")

HORIZONTAL_ZH = {"left": "左边", "center": "中间", "right": "右边"}
VERTICAL_ZH = {"top": "上方", "middle": "中间", "bottom": "下方"}


# ---- picture model ----------------------------------------------------------------------------------


@dataclass
class Thing:
    """One shape: its names, size class, position words and tight box (pixels, right/bottom exclusive)."""
    shape: str
    colour: str
    size: str
    horizontal: str  # left / center / right of its box centre
    vertical: str  # top / middle / bottom
    pixel_box: tuple[int, int, int, int]
    box: tuple[int, int, int, int]  # 0-1000 space


@dataclass
class Word:
    text: str
    lang: str
    colour: tuple[int, int, int]
    pixel_box: tuple[int, int, int, int]
    box: tuple[int, int, int, int]


@dataclass
class Picture:
    width: int
    height: int
    background: dict
    things: list[Thing] = field(default_factory=list)
    word: Word | None = None


def to_thousandths(pixel_box, width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = pixel_box
    return (round(x1 / width * 1000), round(y1 / height * 1000), round(x2 / width * 1000), round(y2 / height * 1000))


def _position(pixel_box, width: int, height: int) -> tuple[str, str]:
    cx, cy = (pixel_box[0] + pixel_box[2]) / 2 / width, (pixel_box[1] + pixel_box[3]) / 2 / height
    return (("left", "center", "right")[min(2, int(cx * 3))], ("top", "middle", "bottom")[min(2, int(cy * 3))])


# ---- rendering --------------------------------------------------------------------------------------


def _background(rng: random.Random, size: int) -> tuple[np.ndarray, dict, list[tuple[int, int, int]]]:
    """(H x W x 3 uint8 pixels, description, the colours shapes must stand out from)."""
    kind = rng.choice(("plain", "plain", "gradient", "noise"))
    pale = [c for c in BACKGROUNDS if min(c) > 128]
    if kind == "plain":
        colour = rng.choice(BACKGROUNDS)
        return np.full((size, size, 3), colour, np.uint8), {"kind": kind, "colour": colour}, [colour]
    if kind == "gradient":
        start, end = rng.sample(pale, 2)
        vertical = rng.random() < 0.5
        ramp = np.linspace(np.array(start, float), np.array(end, float), size).round().astype(np.uint8)
        pixels = np.repeat(ramp[:, None], size, 1) if vertical else np.repeat(ramp[None, :], size, 0)
        return pixels, {"kind": kind, "start": start, "end": end, "vertical": vertical}, [start, end]
    base = rng.choice(pale)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-NOISE, NOISE + 1, (size, size, 3))
    pixels = np.clip(np.array(base) + noise, 0, 255).astype(np.uint8)
    return pixels, {"kind": kind, "colour": base}, [base]


def _outline(shape: str, x: int, y: int, side: int) -> list[tuple[float, float]] | None:
    """The polygon of `shape` in the square (x, y, side); None for the circle (an ellipse)."""
    cx, cy, r = x + side / 2, y + side / 2, side / 2
    if shape == "triangle":
        return [(cx, y), (x + side - 1, y + side - 1), (x, y + side - 1)]
    if shape == "diamond":
        return [(cx, y), (x + side - 1, cy), (cx, y + side - 1), (x, cy)]
    if shape == "hexagon":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else r * 0.45) * np.sin(k * np.pi / 5),
                 cy - (r if k % 2 == 0 else r * 0.45) * np.cos(k * np.pi / 5)) for k in range(10)]
    return None


def _shape_mask(shape: str, x: int, y: int, side: int, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((x, y, x + side - 1, y + side - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=255)
    else:
        draw.polygon(_outline(shape, x, y, side), fill=255)
    return mask


def _overlaps(box, others) -> bool:
    return any(box[0] < o[2] + GAP and o[0] < box[2] + GAP and box[1] < o[3] + GAP and o[1] < box[3] + GAP
               for o in others)


def _free_spot(rng: random.Random, width: int, height: int, size: int, taken, tries: int = 50):
    """(x, y) of a width x height rectangle inside the picture clear of `taken`, or None."""
    for _ in range(tries):
        x, y = rng.randint(2, size - width - 2), rng.randint(2, size - height - 2)
        if not _overlaps((x, y, x + width, y + height), taken):
            return x, y
    return None


def fonts() -> dict[str, str]:
    """Font files by word language: 'en' with any TrueType font, 'zh' too when it covers Chinese."""
    path = find_font_path()
    if path is None:
        return {}
    return {"en": path} if path in LATIN_FONT_PATHS or "DejaVu" in Path(path).name else {"en": path, "zh": path}


def draw_picture(rng: random.Random, size: int, word_fonts: dict[str, str], count: int | None = None,
                 word: bool | None = None) -> tuple[Picture, Image.Image]:
    """A random picture of `count` (default 1-4) shapes, with a word when `word` (default: by chance, and
    only with a font), and its exact ground truth. Shapes that find no free spot are left out."""
    pixels, background, avoid = _background(rng, size)
    image = Image.fromarray(pixels, "RGB")
    picture = Picture(size, size, background)
    colours = [c for c, rgb in COLOURS.items()
               if all(np.linalg.norm(np.subtract(rgb, b)) >= MIN_CONTRAST for b in avoid)]
    taken, used = [], set()
    for _ in range(count or rng.randint(1, 4)):
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        if (shape, colour) in used:  # keep "the red circle" unambiguous
            continue
        size_class = rng.choice(tuple(SIZES))
        low, high = SIZES[size_class]
        side = rng.randint(round(low * size), round(high * size))
        spot = _free_spot(rng, side, side, size, taken)
        if spot is None:
            continue
        mask = _shape_mask(shape, *spot, side, size)
        pixel_box = mask.getbbox()
        image.paste(COLOURS[colour], mask=mask)
        taken.append(pixel_box)
        used.add((shape, colour))
        picture.things.append(Thing(shape, colour, size_class, *_position(pixel_box, size, size), pixel_box,
                                    to_thousandths(pixel_box, size, size)))
    picture.things.sort(key=lambda t: t.pixel_box[:2])  # left to right: captions list them in reading order
    if word is None:
        word = rng.random() < 0.35
    if word and word_fonts:
        lang = rng.choice(sorted(word_fonts))
        text = rng.choice(WORDS_ZH if lang == "zh" else WORDS_EN)
        font = ImageFont.truetype(word_fonts[lang], rng.randint(round(size * 0.1), round(size * 0.14)))
        left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), text, font=font)
        spot = _free_spot(rng, right - left, bottom - top, size, taken)
        if spot is not None:
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).text((spot[0] - left, spot[1] - top), text, fill=255, font=font)
            pixel_box = mask.getbbox()
            colour = (40, 40, 40) if min(avoid[0]) > 128 else (235, 235, 225)
            image.paste(colour, mask=mask)
            picture.word = Word(text, lang, colour, pixel_box, to_thousandths(pixel_box, size, size))
    return picture, image


# ---- tasks ------------------------------------------------------------------------------------------


def _box_text(box) -> str:
    return f"<box>({box[0]},{box[1]}),({box[2]},{box[3]})</box>"


def phrase(thing: Thing, lang: str, article: str = "the") -> str:
    if lang == "zh":
        return f"{COLOURS_ZH[thing.colour]}的{SHAPES_ZH[thing.shape]}"
    if article == "a" and thing.colour[0] in "aeiou":
        article = "an"
    return f"{article} {thing.colour} {thing.shape}"


def where(horizontal: str, vertical: str, lang: str) -> str:
    if lang == "zh":
        if vertical == "middle":
            return HORIZONTAL_ZH[horizontal]
        return VERTICAL_ZH[vertical] if horizontal == "center" else HORIZONTAL_ZH[horizontal][0] + VERTICAL_ZH[vertical]
    if vertical == "middle":
        return "in the center" if horizontal == "center" else f"on the {horizontal}"
    return f"at the {vertical}" if horizontal == "center" else f"at the {vertical} {horizontal}"


def caption(picture: Picture, lang: str, grounded: bool = False) -> str:
    """Every shape with its position (and box, if `grounded`), then the word if there is one."""
    def name(thing):
        text = phrase(thing, lang, "a")
        return f"<ref>{text}</ref>{_box_text(thing.box)}" if grounded else text

    word = picture.word
    if lang == "zh":
        parts = [f"{where(t.horizontal, t.vertical, lang)}有一个{name(t)}" for t in picture.things]
        text = "，".join(parts) + "。" if parts else "图中没有图形。"
        if word:
            quoted = f"“{word.text}”"
            ref = f"<ref>{quoted}</ref>{_box_text(word.box)}" if grounded else quoted
            text += f"图中写着{ref}。"
        return text
    parts = [f"{name(t)} {where(t.horizontal, t.vertical, lang)}" for t in picture.things]
    text = (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) if parts else "no shapes"
    start = len("<ref>") if grounded and parts else 0  # capitalize the sentence, not the tag
    text = text[:start] + text[start].upper() + text[start + 1:] + "."
    if word:
        quoted = f'"{word.text}"'
        ref = f"<ref>{quoted}</ref>{_box_text(word.box)}" if grounded else quoted
        text += f" The word {ref} is written {where(*_position(word.pixel_box, picture.width, picture.height), lang)}."
    return text


def _unique(things: list[Thing], key: str) -> list[Thing]:
    values = [getattr(t, key) for t in things]
    return [t for t in things if values.count(getattr(t, key)) == 1]


def question_kinds(picture: Picture, about: list[Thing] | None = None) -> list[str]:
    """The short-answer questions that can be asked about one of `about` (default: every thing)."""
    about = picture.things if about is None else about
    return ["count"] + ["colour"] * any(t in about for t in _unique(picture.things, "shape")) + \
        ["shape"] * any(t in about for t in _unique(picture.things, "colour")) + ["position"] * bool(about)


def question(rng: random.Random, picture: Picture, lang: str, kind: str | None = None,
             about: list[Thing] | None = None) -> tuple[str, str, dict]:
    """One short-answer question: (question, exact answer, meta) about colour, shape, count or position, of a
    random kind (or `kind`) and about one of `about` (default: any thing); meta["thing"] is its index."""
    zh = lang == "zh"
    about = picture.things if about is None else about
    kind = kind or rng.choice(question_kinds(picture, about))
    if kind == "count":
        n = str(len(picture.things))
        return ("图中有几个图形？" if zh else "How many shapes are there in the image?"), n, {"task": "count"}
    if kind == "colour":
        thing = rng.choice([t for t in _unique(picture.things, "shape") if t in about])
        info = {"task": "colour", "thing": picture.things.index(thing)}
        if zh:
            return f"图中的{SHAPES_ZH[thing.shape]}是什么颜色？", COLOURS_ZH[thing.colour], info
        return f"What color is the {thing.shape}?", thing.colour, info
    if kind == "shape":
        thing = rng.choice([t for t in _unique(picture.things, "colour") if t in about])
        info = {"task": "shape", "thing": picture.things.index(thing)}
        if zh:
            return f"{COLOURS_ZH[thing.colour]}的图形是什么形状？", SHAPES_ZH[thing.shape], info
        return f"What shape is the {thing.colour} object?", thing.shape, info
    thing = rng.choice(about)
    ref = phrase(thing, lang)
    if rng.random() < 0.5:
        answer = HORIZONTAL_ZH[thing.horizontal] if zh else thing.horizontal
        q = f"{ref}在图的左边、中间还是右边？" if zh else f"Is {ref} on the left, in the center, or on the right?"
    else:
        answer = VERTICAL_ZH[thing.vertical] if zh else thing.vertical
        q = f"{ref}在图的上方、中间还是下方？" if zh else f"Is {ref} at the top, in the middle, or at the bottom?"
    return q, answer, {"task": "position", "thing": picture.things.index(thing)}


def grounding(thing: Thing, lang: str) -> tuple[str, str, dict]:
    ref = phrase(thing, lang)
    q = f"框出图中{ref}" if lang == "zh" else f"Output the bounding box of {ref}."
    return q, f"<ref>{ref}</ref>{_box_text(thing.box)}", {"task": "grounding", "ref": ref, "box": thing.box,
                                                           "pixel_box": thing.pixel_box}


def referring(thing: Thing, lang: str) -> tuple[str, str, dict]:
    ref = phrase(thing, lang)
    q = f"{_box_text(thing.box)}中是什么？" if lang == "zh" else f"What is in the region {_box_text(thing.box)}?"
    return q, ref, {"task": "referring", "box": thing.box}


def turns_for(rng: random.Random, task: str, picture: Picture, lang: str) -> list[tuple[str, str, dict]]:
    """The (question, answer, meta) turns of a one-picture record."""
    zh = lang == "zh"
    if task == "caption":
        return [("描述这张图片。" if zh else "Describe the image.", caption(picture, lang), {"task": "caption"})]
    if task == "grounded_caption":
        q = "描述这张图片，并框出每个物体。" if zh else "Describe the image and locate each object with a box."
        return [(q, caption(picture, lang, grounded=True), {"task": "grounded_caption"})]
    if task == "ocr":
        q = "图中写的是什么字？" if zh else "What word is written in the image?"
        return [(q, picture.word.text, {"task": "ocr", "box": picture.word.box, "pixel_box": picture.word.pixel_box})]
    if task in ("grounding", "referring"):
        build = grounding if task == "grounding" else referring
        chosen = rng.sample(picture.things, min(len(picture.things), rng.randint(1, 2)))
        return [build(thing, lang) for thing in chosen]
    if task == "multi":
        return multi_turns(rng, picture, lang)
    turns = {}
    for _ in range(rng.randint(1, 3)):
        q, answer, info = question(rng, picture, lang)
        turns.setdefault(q, (q, answer, info))  # no question twice
    return list(turns.values())


def multi_turns(rng: random.Random, picture: Picture, lang: str) -> list[tuple[str, str, dict]]:
    """Several questions about one picture in one conversation, none answerable from the earlier turns: each
    shape is asked about once (a question or answer naming a shape or its box gives that shape away), the count
    and the word at most once each, and a caption (which gives everything away) only as the last turn."""
    fresh, turns = list(picture.things), []
    kinds = ["count"] + ["ocr"] * (picture.word is not None)
    for _ in range(rng.randint(2, 6)):
        kinds_now = kinds + ["thing"] * bool(fresh)
        if not kinds_now:
            break
        kind = rng.choice(kinds_now)
        if kind == "thing":
            task = rng.choice(["grounding", "referring"] + [k for k in question_kinds(picture, fresh) if k != "count"])
            thing = rng.choice([t for t in fresh if task in ("grounding", "referring", "position")
                                or t in _unique(picture.things, "shape" if task == "colour" else "colour")])
            if task in ("grounding", "referring"):
                q, answer, info = (grounding if task == "grounding" else referring)(thing, lang)
                info = {**info, "thing": picture.things.index(thing)}
            else:
                q, answer, info = question(rng, picture, lang, task, [thing])
            fresh.remove(thing)
        elif kind == "count":
            q, answer, info = question(rng, picture, lang, "count")
        else:
            [(q, answer, info)] = turns_for(rng, "ocr", picture, lang)
        kinds = [k for k in kinds if k != kind]
        turns.append((q, answer, info))
    if rng.random() < 0.4:
        turns += turns_for(rng, rng.choice(["caption", "grounded_caption"]), picture, lang)
    return turns


def compare_turns(rng: random.Random, first: Picture, second: Picture, lang: str) -> list[tuple[str, str, dict]]:
    counts = len(first.things), len(second.things)
    zh = lang == "zh"
    if rng.random() < 0.5 and counts[0] != counts[1]:
        more = 1 if counts[0] > counts[1] else 2
        q = "哪张图中的图形更多？" if zh else "Which picture has more shapes?"
        return [(q, f"图{more}" if zh else f"Picture {more}", {"task": "compare_more"})]
    q = "两张图中一共有几个图形？" if zh else "How many shapes are there in the two pictures altogether?"
    return [(q, str(sum(counts)), {"task": "compare_total"})]


# ---- writer -----------------------------------------------------------------------------------------

TASKS = ("caption", "vqa", "grounding", "referring", "grounded_caption", "ocr", "compare")
EXTRA_TASKS = ("multi",)  # several tasks about one picture in one conversation (asked for by name)


def make_record(seed: int, split: str, index: int, image_size: int, langs: tuple[str, ...],
                word_fonts: dict[str, str], out: Path, tasks: tuple[str, ...] = TASKS) -> dict:
    """Record `index`, its pictures saved under out/images; it depends only on (seed, split, index, tasks).
    A task named twice in `tasks` is drawn twice as often."""
    rng = random.Random(f"qwenvl-synth/{seed}/{split}/{index}")
    lang = rng.choice(langs)
    word_fonts = {k: v for k, v in word_fonts.items() if k == "en" or k in langs}
    task = rng.choice([t for t in tasks if t != "ocr" or word_fonts])
    record_id = f"synth-{split}-{index:06d}"
    if task == "compare":
        first = draw_picture(rng, image_size, word_fonts, count=rng.randint(1, 4))
        for _ in range(20):  # "more shapes" needs different counts
            second = draw_picture(rng, image_size, word_fonts, count=rng.randint(1, 4))
            if len(second[0].things) != len(first[0].things):
                break
        pictures = [first, second]
        turns = compare_turns(rng, first[0], second[0], lang)
    else:
        word = True if task == "ocr" else (rng.random() < 0.5) if task == "multi" else None
        pictures = [draw_picture(rng, image_size, word_fonts, word=word)]
        if task == "ocr" and pictures[0][0].word is None:
            task = "caption"  # no room left for the word
        if task in ("grounding", "referring") and not pictures[0][0].things:
            task = "caption"
        turns = turns_for(rng, task, pictures[0][0], lang)
    files = []
    for k, (_, image) in enumerate(pictures, start=1):
        name = f"images/{record_id}.png" if len(pictures) == 1 else f"images/{record_id}_{k}.png"
        image.save(out / name, format="PNG")
        files.append(name)
    head = "".join(f"Picture {k}: <img>{name}</img>\n" for k, name in enumerate(files, start=1))
    conversations = []
    for j, (q, answer, _) in enumerate(turns):
        conversations += [{"from": "user", "value": head + q if j == 0 else q},
                          {"from": "assistant", "value": answer}]
    images = [{"file": name, **asdict(picture)} for name, (picture, _) in zip(files, pictures)]
    meta = {"task": task, "lang": lang, "images": images,
            "answers": [{**info, "answer": answer} for _, answer, info in turns]}
    return {"id": record_id, "conversations": conversations, "meta": meta}


def generate(out, n: int, seed: int = 0, split: str = "train", image_size: int = 448,
             langs=("en",), progress: bool = False, tasks: tuple[str, ...] = TASKS) -> Path:
    """Write n records to out/<split>.json and their pictures to out/images; returns the JSON file's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    word_fonts = fonts()
    records = []
    for index in range(n):
        records.append(make_record(seed, split, index, image_size, tuple(langs), word_fonts, out, tuple(tasks)))
        if progress and ((index + 1) % 100 == 0 or index + 1 == n):
            print(f"\r{index + 1}/{n} records", end="" if index + 1 < n else "\n", file=sys.stderr, flush=True)
    path = out / f"{split}.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


# ---- command line -----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder: <split>.json and images/")
    parser.add_argument("--n", type=int, required=True, help="number of records")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--image-size", type=int, default=448, help="picture side in pixels (default 448)")
    parser.add_argument("--lang", default="en", help="prompt languages, comma-separated: en, zh or en,zh")


def run(args, parser: argparse.ArgumentParser | None = None) -> int:
    langs = tuple(dict.fromkeys(part.strip() for part in args.lang.split(",") if part.strip()))
    problem = (f"--n must be at least 1, not {args.n}" if args.n < 1 else
               f"--image-size must be at least 64, not {args.image_size}" if args.image_size < 64 else
               f"--lang takes en, zh or en,zh, not {args.lang!r}" if not langs or set(langs) - {"en", "zh"} else None)
    if problem:
        if parser is not None:
            parser.error(problem)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if "zh" in langs and "zh" not in fonts():
        print("note: no CJK font found, so no Chinese words are drawn (prompts are still Chinese)", file=sys.stderr)
    path = generate(args.out, args.n, args.seed, args.split, args.image_size, langs, progress=True)
    print(f"wrote {args.n} records to {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qwenvl data synth", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
