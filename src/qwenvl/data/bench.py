"""Synthetic benchmark files in the formats the original evaluation reads (for `qwenvl eval`):

    qwenvl data bench --out DIR [--n 50] [--seed 0] [--image-size 224] [--tasks vqav2,refcoco,...]

writes DIR/<task>/ for every benchmark of `qwenvl eval` with pictures from `qwenvl data synth` and exact
answers: COCO caption JSON (flickr30k, nocaps), VQA JSONL + official question/annotation JSON (vqav2, okvqa,
textvqa, vizwiz), JSONL with answers (docvqa, infographicsvqa, chartqa, gqa, ocrvqa, ai2d), multiple-choice
JSONL (scienceqa_img), MMBench TSV with base64 pictures and four rotations per question, SEED-Bench's
converted JSONL, RefCOCO JSONL (pixel boxes), and MME's category folders. It prints the `qwenvl eval` command
of each. The same arguments give the same files.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
from pathlib import Path

from . import synth

BENCHMARKS = ("flickr30k", "nocaps", "vqav2", "okvqa", "textvqa", "vizwiz", "docvqa", "infographicsvqa", "chartqa",
              "gqa", "ocrvqa", "ai2d", "scienceqa_img", "mmbench", "seed_bench", "refcoco", "refcoco+", "refcocog",
              "mme")
VQA_TASKS = ("vqav2", "okvqa", "textvqa", "vizwiz")
NEEDS_WORD = ("textvqa", "docvqa", "infographicsvqa", "ocrvqa")


def _picture(rng: random.Random, size: int, fonts: dict, folder: Path | None, name: str, word: bool | None = None):
    """A synthetic picture with at least one shape (and a word when asked), saved as folder/name if a folder."""
    for _ in range(50):
        picture, image = synth.draw_picture(rng, size, {"en": fonts["en"]}, word=word)
        if picture.things and (not word or picture.word is not None):
            break
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / name, format="PNG")
    return picture, image


def _question(rng, picture, task: str) -> tuple[str, str]:
    """(question, answer) in English for a one-picture QA benchmark."""
    if task in NEEDS_WORD:
        return "What word is written in the image?", picture.word.text
    if task == "chartqa":
        return "How many shapes are there in the image?", str(len(picture.things))
    if task == "ai2d":
        thing = rng.choice(picture.things)
        return f"What shape is the {thing.colour} object?", thing.shape
    question, answer, _ = synth.question(rng, picture, "en")
    return question, answer


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_benchmark(task: str, out: Path, n: int, seed: int, size: int, fonts: dict) -> str:
    """Write one benchmark under out/<task>; returns the `qwenvl eval` arguments for it."""
    rng = random.Random(f"qwenvl-bench/{seed}/{task}")
    folder = out / task
    images = folder / "images"
    rows = []
    if task in ("flickr30k", "nocaps"):
        coco = {"images": [], "annotations": []}
        for i in range(n):
            picture, _ = _picture(rng, size, fonts, images, f"{i}.png")
            coco["images"].append({"id": i, "image": f"images/{i}.png"})
            coco["annotations"].append({"id": i, "image_id": i, "caption": synth.caption(picture, "en")})
        (folder / "test.json").write_text(json.dumps(coco, indent=1), encoding="utf-8")
        return f"--data {folder}/test.json --images {folder}"
    if task in ("refcoco", "refcoco+", "refcocog"):
        for i in range(n):
            picture, _ = _picture(rng, size, fonts, images, f"{i}.png")
            thing = rng.choice(picture.things)
            rows.append({"id": i, "image": f"images/{i}.png", "sent": synth.phrase(thing, "en")[len("the "):],
                         "bbox": list(thing.pixel_box), "width": size, "height": size})
        _jsonl(folder / "val.jsonl", rows)
        return f"--data {folder}/val.jsonl --images {folder}"
    if task in ("scienceqa_img", "mmbench", "seed_bench"):
        return _choice_benchmark(task, rng, folder, images, n, size, fonts)
    if task == "mme":
        return _mme(rng, folder, n, size, fonts)
    questions, annotations = [], []
    for i in range(n):
        picture, _ = _picture(rng, size, fonts, images, f"{i}.png", word=True if task in NEEDS_WORD else None)
        question, answer = _question(rng, picture, task)
        row = {"image": f"images/{i}.png", "question": question, "question_id": i, "answer": answer}
        if task in ("docvqa", "infographicsvqa"):
            row["answer"] = [answer]
        rows.append(row)
        questions.append({"question_id": i, "image_id": i, "question": question})
        annotations.append({"question_id": i, "image_id": i, "answer_type": "other", "question_type": "what",
                            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k in range(10)]})
    _jsonl(folder / "val.jsonl", rows)
    if task in VQA_TASKS:
        (folder / "questions.json").write_text(json.dumps({"questions": questions}), encoding="utf-8")
        (folder / "annotations.json").write_text(json.dumps({"annotations": annotations}), encoding="utf-8")
        return f"--data {folder}/val.jsonl --images {folder} --annotations {folder}/annotations.json"
    return f"--data {folder}/val.jsonl --images {folder}"


def _options(rng, correct: str, pool) -> list[str]:
    options = [correct] + rng.sample([p for p in pool if p != correct], 3)
    rng.shuffle(options)
    return options


def _choice_question(rng, picture):
    thing = rng.choice(synth._unique(picture.things, "shape") or picture.things)
    if rng.random() < 0.5:
        return f"What color is the {thing.shape}?", thing.colour, list(synth.COLOURS)
    return f"What shape is the {thing.colour} object?", thing.shape, list(synth.SHAPES)


def _choice_benchmark(task, rng, folder, images, n, size, fonts) -> str:
    rows = []
    for i in range(n):
        picture, image = _picture(rng, size, fonts, None if task == "mmbench" else images, f"{i}.png")
        question, correct, pool = _choice_question(rng, picture)
        options = _options(rng, correct, pool)
        if task == "scienceqa_img":
            rows.append({"image": f"images/{i}.png", "hint": None, "question": question, "choices": options,
                         "answer": options.index(correct), "question_id": i})
        elif task == "seed_bench":
            listed = "\n".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(options))
            rows.append({"question_id": i, "answer": "ABCD"[options.index(correct)],
                         "prompt": f"<img>images/{i}.png</img>\nQuestion: {question}\nOptions: {listed}\nAnswer:"})
        else:  # MMBench: four rotations of the options, index k * 1e6 + i, the picture as base64 JPEG
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            encoded = base64.b64encode(buffer.getvalue()).decode()
            for k in range(4):
                rotated = options[k:] + options[:k]
                rows.append({"index": k * 1_000_000 + i, "question": question, "hint": "", "A": rotated[0],
                             "B": rotated[1], "C": rotated[2], "D": rotated[3],
                             "answer": "ABCD"[rotated.index(correct)], "category": "attribute_recognition",
                             "image": encoded})
    if task == "mmbench":
        folder.mkdir(parents=True, exist_ok=True)
        header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
        lines = ["\t".join(header)] + ["\t".join(str(r[h]) for h in header) for r in rows]
        (folder / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return f"--data {folder}/dev.tsv"
    _jsonl(folder / "test.jsonl", rows)
    return f"--data {folder}/test.jsonl --images {folder}"


def _mme(rng, folder, n, size, fonts) -> str:
    """MME-style yes/no pairs: per picture one question whose answer is Yes and one whose answer is No."""
    questions = folder / "questions"
    questions.mkdir(parents=True, exist_ok=True)
    for category in ("existence", "count", "color"):
        lines = []
        for i in range(n):
            picture, _ = _picture(rng, size, fonts, folder / "images" / category, f"{i}.png")
            thing = rng.choice(synth._unique(picture.things, "shape") or picture.things)
            if category == "existence" or len(synth._unique(picture.things, "shape")) == 0:
                absent = rng.choice([s for s in synth.SHAPES if s not in {t.shape for t in picture.things}])
                pair = (f"Is there a {thing.shape} in this image?", f"Is there a {absent} in this image?")
            elif category == "count":
                count = len(picture.things)
                wrong = rng.choice([c for c in range(1, 6) if c != count])
                pair = (f"Are there {count} shapes in this image?", f"Are there {wrong} shapes in this image?")
            else:
                other = rng.choice([c for c in synth.COLOURS if c != thing.colour])
                pair = (f"Is the {thing.shape} {thing.colour}?", f"Is the {thing.shape} {other}?")
            suffix = " Please answer yes or no."
            lines += [f"{i}.png\t{pair[0]}{suffix}\tYes", f"{i}.png\t{pair[1]}{suffix}\tNo"]
        (questions / f"{category}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"--data {questions} --images {folder}"


def generate(out, n: int = 50, seed: int = 0, image_size: int = 224, tasks=BENCHMARKS) -> dict[str, str]:
    out = Path(out)
    fonts = synth.fonts()
    if "en" not in fonts:
        raise RuntimeError("no TrueType font found for the words in the pictures (install fonts-dejavu-core)")
    return {task: write_benchmark(task, out, n, seed, image_size, fonts) for task in tasks}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder: one subfolder per benchmark")
    parser.add_argument("--n", type=int, default=50, help="questions per benchmark (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tasks", default=",".join(BENCHMARKS), help="comma-separated benchmarks (default: all)")


def run(args, parser=None) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in BENCHMARKS]
    problem = (f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}" if unknown else
               f"--n must be at least 1, not {args.n}" if args.n < 1 else
               f"--image-size must be at least 64, not {args.image_size}" if args.image_size < 64 else None)
    if problem:
        if parser is not None:
            parser.error(problem)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    for task, arguments in generate(args.out, args.n, args.seed, args.image_size, tasks).items():
        print(f"qwenvl eval {task} {arguments}")
    return 0
