"""The benchmarks of the original evaluation (`eval_mm/`, SPEC section 10): how each reads its files, the
prompt, the decoding, and the score.

Every task turns its input file into `Item`s (one prompt each, with what scoring needs) and scores a
{key: prediction} map. Two scorers: "fixed" (the default) computes each benchmark's documented metric;
"compat" reproduces the original scripts' quirks so published numbers can be matched:

- chartqa: the original calls relaxed_correctness(prediction, annotation), so the 5 % tolerance is taken
  relative to the prediction instead of the target (fixed: relative to the target).
- refcoco / refcoco+ / refcocog: the original divides predicted coordinates by 999 instead of 1000, and its
  DataLoader has drop_last=True, so each process's last incomplete batch is never scored (fixed: / 1000,
  every item scored).
- few-shot (captioning, VQA): the original samples examples from the "train" file, which for Flickr30K is
  the test file itself, so an item can be shown its own answer (fixed: an item's own image is never
  one of its examples).
- mmbench: the original's OpenCompass-style score (mmbench_evaluation_tricky.py) takes a majority vote
  over the rotations with a random tie-break (fixed: CircularEval, every rotation must be right; compat
  seeds the tie-break with --seed so a run is repeatable).
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import json
import os
import random
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from . import metrics
from .. import errors

OPTION_LETTERS = "ABCDE"
VQA_PROMPT = "<img>{}</img>{} Answer:"
CAPTION_PROMPT = "<img>{}</img>Describe the image in English:"
CHOICE_PROMPT = "<img>{}</img>Context: {}\nQuestion: {}\nOptions: {}\nAnswer:"
GROUNDING_PROMPT = "<img>{}</img><ref>{}</ref><box>"


class EvalDataError(errors.DataError):
    """A benchmark file that cannot be read as its task's format; the message names the file and line."""


@dataclass
class Item:
    key: str  # unique within the task's file; predictions are stored and resumed by it
    prompt: str  # text with <img>path</img>; for "chat" tasks the user's query
    info: dict = field(default_factory=dict)  # what scoring needs (answers, boxes, option count, ...)
    options: int = 0  # choice tasks: the continuations " A", " B", ... scored by likelihood


@dataclass
class Task:
    name: str
    kind: str  # "generate", "choice" or "chat"
    reader: str  # which reader parses its file
    metric: str
    max_new_tokens: int = 10
    min_new_tokens: int = 1
    reported: str | None = None  # Qwen-VL (7B) as published, where SPEC lists it

    @property
    def headline(self) -> str:
        return HEADLINES[self.metric]


HEADLINES = {"caption": "CIDEr", "vqa": "vqa_accuracy", "anls": "anls", "relaxed": "relaxed_accuracy",
             "exact": "accuracy", "gqa": "accuracy", "choice": "accuracy", "circular": "accuracy",
             "grounding": "accuracy", "mme": "total_score"}

TASKS = {t.name: t for t in [
    Task("flickr30k", "generate", "coco_caption", "caption", 30, 8, "85.8"),
    Task("nocaps", "generate", "coco_caption", "caption", 30, 8, "121.4"),
    Task("vqav2", "generate", "vqa", "vqa", 10, 1, "78.8"),
    Task("okvqa", "generate", "vqa", "vqa", 10, 1, "58.6"),
    Task("textvqa", "generate", "vqa", "vqa", 10, 1, "63.8"),
    Task("vizwiz", "generate", "vqa", "vqa", 10, 1, "35.2"),
    Task("docvqa", "generate", "vqa", "anls", 100, 1, "65.1"),
    Task("infographicsvqa", "generate", "vqa", "anls", 100, 1),
    Task("chartqa", "generate", "vqa", "relaxed", 100, 1, "65.7"),
    Task("gqa", "generate", "vqa", "gqa", 10, 1, "59.3"),
    Task("ocrvqa", "generate", "vqa", "exact", 100, 1, "75.7"),
    Task("ai2d", "generate", "vqa", "exact", 10, 1, "62.3"),
    Task("scienceqa_img", "choice", "choice", "choice", reported="67.1"),
    Task("mmbench", "choice", "mmbench", "circular"),
    Task("seed_bench", "choice", "seed", "choice"),
    Task("refcoco", "generate", "refcoco", "grounding", 28, 10, "89.36 / 92.26 / 85.34 (val / testA / testB)"),
    Task("refcoco+", "generate", "refcoco", "grounding", 28, 10),
    Task("refcocog", "generate", "refcoco", "grounding", 28, 10),
    Task("mme", "chat", "mme", "mme", 512, 0),
]}


# ---- reading ----------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{number}: each line must be a JSON object")
            rows.append(row)
    if not rows:
        raise EvalDataError(f"{path}: no records")
    return rows


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def need(row: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise EvalDataError(f"{where}: missing field(s) {', '.join(missing)}")


class Images:
    """Resolves image references: absolute paths and URLs as they are; relative ones against --images, else
    the working directory (as the original scripts), else the data file's folder. A missing file is an error
    that names the record, raised before any model work."""

    def __init__(self, images_dir: str | None, data_dir: str, check: bool = True):
        self.images_dir, self.data_dir, self.check = images_dir, data_dir, check

    def __call__(self, path: str, where: str) -> str:
        if not isinstance(path, str) or not path:
            raise EvalDataError(f"{where}: the image reference must be a non-empty string")
        if re.match(r"^(https?|data):", path) or os.path.isabs(path):
            resolved = path
        elif self.images_dir:
            resolved = os.path.join(self.images_dir, path)
        else:
            resolved = path if os.path.exists(path) else os.path.join(self.data_dir, path)
        if self.check and not re.match(r"^(https?|data):", resolved) and not os.path.isfile(resolved):
            raise EvalDataError(f"{where}: image {path!r} not found (looked for {resolved}); "
                                "pass --images DIR to resolve relative paths")
        return resolved


def load_items(task: Task, data: str, images: Images, annotations: str | None = None,
               work_dir: str | None = None) -> list[Item]:
    """The task's items from its benchmark file (format as the original reads it)."""
    if not os.path.exists(data):
        raise EvalDataError(f"{data}: no such file or folder")
    return READERS[task.reader](task, data, images, annotations, work_dir)


def _coco_caption(task, data, images, annotations, work_dir):
    coco = read_json(data)
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise EvalDataError(f"{data}: a COCO caption file needs an 'images' list (and 'annotations')")
    refs = defaultdict(list)
    source = read_json(annotations) if annotations else coco
    if not isinstance(source, dict) or not isinstance(source.get("annotations", []), list):
        raise EvalDataError(f"{annotations or data}: a COCO caption file's 'annotations' must be a list")
    for n, ann in enumerate(source.get("annotations", [])):
        need(ann, ("image_id", "caption"), f"{annotations or data}: annotations[{n}]")
        refs[ann["image_id"]].append(ann["caption"])
    items = []
    for n, image in enumerate(coco["images"]):
        where = f"{data}: images[{n}]"
        need(image, ("id", "image"), where)
        items.append(Item(str(image["id"]), CAPTION_PROMPT.format(images(image["image"], where)),
                          {"image_id": image["id"], "references": refs.get(image["id"], [])}))
    return items


def _vqa(task, data, images, annotations, work_dir):
    rows = read_jsonl(data)
    official = _official_answers(annotations) if annotations else {}
    items, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{data}:{n}"
        need(row, ("image", "question"), where)
        qid = row.get("question_id", row.get("questionId", row["image"] if task.name == "ai2d" else None))
        if qid is None:
            raise EvalDataError(f"{where}: missing field question_id")
        key = str(qid)
        if key in seen:
            key = f"{key}#{n}"  # some files repeat an id (ai2d keys by image); keep every row
        seen.add(key)
        answers = official.get(str(qid), row.get("answers", row.get("answer")))
        if isinstance(answers, list):
            answers = [a["answer"] if isinstance(a, dict) else a for a in answers]
        items.append(Item(key, VQA_PROMPT.format(images(row["image"], where), row["question"]),
                          {"question_id": qid, "answers": answers, "image": row["image"], "question": row["question"]}))
    unanswered = [it for it in items if not it.info["answers"]]
    if unanswered and len(unanswered) < len(items):  # all unanswered is a test split: predictions are submitted
        raise EvalDataError(f"{data}: question {unanswered[0].info['question_id']} has no answers while others do; "
                            "give every line its answers (or --annotations with the official annotation JSON), "
                            "or none of them (a test split: a submission file is written instead of a score)")
    if task.metric == "vqa" and any(not isinstance(it.info["answers"], list) for it in items if it.info["answers"]):
        raise EvalDataError(f"{data}: VQA accuracy needs the human answers of every question as an 'answers' list "
                            "in each line, or --annotations with the official annotation JSON")
    return items


def _official_answers(path: str) -> dict:
    """question id -> answers, from an official VQA annotation file ({"annotations": [{"question_id",
    "answers": [{"answer"}]}]}) or a DocVQA/InfographicsVQA one ({"data": [{"questionId", "answers"}]})."""
    content = read_json(path)
    try:
        if isinstance(content, dict) and "annotations" in content:
            return {str(a["question_id"]): [x["answer"] for x in a["answers"]] for a in content["annotations"]}
        if isinstance(content, dict) and "data" in content:
            return {str(a["questionId"]): list(a.get("answers", [])) for a in content["data"]}
    except (KeyError, TypeError) as e:
        raise EvalDataError(f"{path}: an annotation lacks {e} (question_id / answers)") from None
    raise EvalDataError(f"{path}: not a VQA annotation file (no 'annotations') nor a DocVQA one (no 'data')")


def _choice_prompt(image: str, hint, question: str, choices: list[str]) -> str:
    options = "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return CHOICE_PROMPT.format(image, hint if hint else "N/A", question, options)


def _choice(task, data, images, annotations, work_dir):
    items = []
    for n, row in enumerate(read_jsonl(data), 1):
        where = f"{data}:{n}"
        need(row, ("image", "question", "choices"), where)
        row.setdefault("answer", None)  # a test split: predictions are submitted
        choices = row["choices"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(OPTION_LETTERS):
            raise EvalDataError(f"{where}: 'choices' must be a list of 2 to {len(OPTION_LETTERS)} options")
        if row["answer"] is not None and (not isinstance(row["answer"], int) or not 0 <= row["answer"] < len(choices)):
            raise EvalDataError(f"{where}: 'answer' must be the index of the right choice (0 to {len(choices) - 1})")
        items.append(Item(str(row.get("question_id", row.get("index", n - 1))),
                          _choice_prompt(images(row["image"], where), row.get("hint"), row["question"], choices),
                          {"answer": row["answer"], "question": row["question"], "choices": choices},
                          options=len(choices)))
    return items


def _mmbench(task, data, images, annotations, work_dir):
    """MMBench's TSV (index, question, hint, A-D, answer, image as base64), or the original's converted JSONL.
    Index k * 1e6 + i is rotation k of question i (circular evaluation)."""
    if not data.endswith(".tsv"):
        items = _choice(task, data, images, annotations, work_dir)
        for item in items:
            item.info.update(index=int(item.key) % 1_000_000, rotation=int(item.key) // 1_000_000)
        return items
    csv.field_size_limit(sys.maxsize)
    with open(data, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise EvalDataError(f"{data}: no rows")
    folder = os.path.join(work_dir, "images")
    os.makedirs(folder, exist_ok=True)
    items = []
    for n, row in enumerate(rows, 2):  # line 1 is the header
        where = f"{data}:{n}"
        need(row, ("index", "question", "image", "A", "B"), where)
        try:
            index = int(float(row["index"]))
            picture = base64.b64decode(row["image"], validate=True)
        except ValueError as e:
            raise EvalDataError(f"{where}: bad index or base64 image ({e})") from None
        path = os.path.join(folder, f"{index}.jpg")
        if not os.path.exists(path):  # several ranks may decode at once: each writes its own temporary file
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as out:
                out.write(picture)
            os.replace(tmp, path)
        choices = [row[c] for c in "ABCD" if row.get(c) not in (None, "", "nan")]
        hint = row.get("hint") if row.get("hint") not in (None, "", "nan") else None
        answer = row.get("answer")
        items.append(Item(str(index), _choice_prompt(path, hint, row["question"], choices),
                          {"index": index % 1_000_000, "rotation": index // 1_000_000, "choices": choices,
                           "question": row["question"],
                           "answer": "ABCD".index(answer) if answer in tuple("ABCD") else None},
                          options=len(choices)))
    return items


def _seed(task, data, images, annotations, work_dir):
    """The original's converted SEED-Bench JSONL ({"question_id", "prompt", "answer": letter}); the image path
    inside the prompt is resolved like any other."""
    items = []
    for n, row in enumerate(read_jsonl(data), 1):
        where = f"{data}:{n}"
        need(row, ("question_id", "prompt"), where)
        answer = row.get("answer")
        if answer is not None and answer not in tuple("ABCD"):
            raise EvalDataError(f"{where}: 'answer' must be one of the letters A, B, C, D, not {answer!r}")
        prompt = re.sub(r"<img>(.*?)</img>", lambda m: f"<img>{images(m.group(1), where)}</img>", row["prompt"])
        items.append(Item(str(row["question_id"]), prompt,
                          {"question_id": row["question_id"], "answer": None if answer is None else "ABCD".index(answer)},
                          options=4))
    return items


def _refcoco(task, data, images, annotations, work_dir):
    items = []
    for n, row in enumerate(read_jsonl(data), 1):
        where = f"{data}:{n}"
        need(row, ("image", "sent", "bbox", "width", "height"), where)
        items.append(Item(str(row.get("id", n - 1)), GROUNDING_PROMPT.format(images(row["image"], where), row["sent"]),
                          {"bbox": row["bbox"], "width": row["width"], "height": row["height"]}))
    return items


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _mme(task, data, images, annotations, work_dir):
    """MME as the original's eval.py reads it: a folder of <category>.txt files ("image\\tquestion\\tYes|No" per
    line); each picture is `images/<category>/<image>` as that script names it, resolved like every task's
    relative paths (against --images, else the working folder, else the folder that holds the data folder)."""
    if not os.path.isdir(data):
        raise EvalDataError(f"{data}: MME takes the folder of <category>.txt files")
    items = []
    for name in sorted(os.listdir(data)):
        if not name.endswith(".txt"):
            continue
        category = name[:-4]
        with open(os.path.join(data, name), encoding="utf-8") as f:
            for n, line in enumerate(f.read().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) != 3:
                    raise EvalDataError(f"{os.path.join(data, name)}:{n}: expected image<TAB>question<TAB>answer")
                img, question, gt = parts
                path = images(os.path.join("images", category, img), f"{os.path.join(data, name)}:{n}")
                items.append(Item(f"{category}/{n}", f"<img>{path}</img>\n{question}",
                                  {"category": category, "image": img, "question": question, "answer": gt.strip()}))
    if not items:
        raise EvalDataError(f"{data}: no <category>.txt files with questions")
    return items


READERS = {"coco_caption": _coco_caption, "vqa": _vqa, "choice": _choice, "mmbench": _mmbench, "seed": _seed,
           "refcoco": _refcoco, "mme": _mme}


# ---- few-shot ---------------------------------------------------------------------------------------


def add_few_shot(task: Task, items: list[Item], pool: list[Item], shots: int, seed: int, compat: bool) -> list[Item]:
    """`items` with each prompt prefixed by `shots` solved examples drawn (seeded per item) from `pool`, as the
    original does for captioning and VQA; fixed mode never shows an item its own image. New items are
    returned: neither `items` nor `pool` changes, so an example is always a bare prompt, never one that
    already carries examples (the pool may be `items` itself)."""
    if task.kind != "generate" or task.metric == "grounding":
        raise errors.OptionsError(f"--few-shot applies to captioning and VQA tasks, not {task.name}")
    solved = [(p, _image_of(p), _solution(task, p)) for p in pool]
    solved = [s for s in solved if s[2]]  # a test split's items have no answer to show
    shown = []
    for index, item in enumerate(items):
        rng = random.Random(f"{seed}/{index}")
        own = _image_of(item)
        candidates = solved if compat else [s for s in solved if s[1] != own]
        if len(candidates) < shots:
            raise errors.OptionsError(f"--few-shot {shots} needs at least {shots} solved examples"
                             f"{'' if compat else ' of other images'}; the pool has {len(candidates)}")
        prefix = "".join(f"{example.prompt} {answer}" for example, _, answer in rng.sample(candidates, shots))
        shown.append(dataclasses.replace(item, prompt=prefix + item.prompt))
    return shown


def _solution(task: Task, item: Item) -> str:
    if task.metric == "caption":
        return item.info["references"][0] if item.info.get("references") else ""
    return _first(item.info.get("answers")) or ""


def _image_of(item: Item) -> str:
    """The item's own picture: the last in its prompt (examples, if any, come before it)."""
    found = re.findall(r"<img>(.*?)</img>", item.prompt)
    return found[-1] if found else ""


def _first(answers):
    if isinstance(answers, list):
        return max(set(answers), key=answers.count) if answers else ""
    return answers


# ---- scoring ----------------------------------------------------------------------------------------


def score(task: Task, items: list[Item], predictions: dict, compat: bool, seed: int = 0,
          dropped: set | None = None) -> dict:
    """Metrics of `predictions` ({key: prediction}) over `items`; `dropped` keys (compat grounding) are left out."""
    scored = [it for it in items if it.key not in (dropped or set())]
    if not scored:
        raise ValueError("nothing to score")
    preds = [predictions[it.key] for it in scored]
    m = task.metric
    if m == "caption":
        if any(not it.info["references"] for it in scored):
            raise EvalDataError("captioning needs reference captions ('annotations') for every image")
        scores = metrics.caption_scores({it.key: p for it, p in zip(scored, preds)},
                                        {it.key: it.info["references"] for it in scored})
        return {**scores, "count": len(scored)}
    if m == "vqa":
        values = [metrics.vqa_accuracy(p, it.info["answers"]) for it, p in zip(scored, preds)]
    elif m == "anls":
        values = [metrics.anls(p, _as_list(it.info["answers"])) for it, p in zip(scored, preds)]
    elif m == "relaxed":
        values = [metrics.relaxed_accuracy(p.strip(), _as_list(it.info["answers"]), compat=compat)
                  for it, p in zip(scored, preds)]
    elif m == "exact":
        values = [metrics.exact_match(p, _as_list(it.info["answers"])) for it, p in zip(scored, preds)]
    elif m == "gqa":
        values = [metrics.exact_match(metrics.gqa_clean(p), _as_list(it.info["answers"])) for it, p in zip(scored, preds)]
    elif m == "choice":
        values = [float(p["choice"] == it.info["answer"]) for it, p in zip(scored, preds)]
    elif m == "grounding":
        values = []
        for it, p in zip(scored, preds):
            box = metrics.parse_first_box(p)
            values.append(float(box is not None and metrics.grounding_correct(
                box, it.info["bbox"], it.info["width"], it.info["height"], compat=compat)))
    elif m == "circular":
        return _mmbench_score(scored, preds, compat, seed)
    elif m == "mme":
        return _mme_score(scored, preds)
    else:
        raise ValueError(m)
    return {HEADLINES[m]: sum(values) / len(values), "count": len(values)}


def _as_list(answers):
    return answers if isinstance(answers, list) else [answers]


def _mmbench_score(items, preds, compat, seed):
    if any(it.info["answer"] is None for it in items):
        raise EvalDataError("MMBench scoring needs the 'answer' column (the dev split); the test split is "
                            "scored by the MMBench server: submit submission.xlsx")
    records = [{"index": it.info["index"], "rotation": it.info["rotation"], "prediction": p["choice"],
                "answer": it.info["answer"]} for it, p in zip(items, preds)]
    strict = metrics.circular_accuracy(records)
    if not compat:
        return {"accuracy": strict, "questions": len({r["index"] for r in records}), "count": len(records)}
    rng = random.Random(seed)  # the original's vote: majority over rotations of the chosen option's text
    by_question = defaultdict(list)
    for it, p in zip(items, preds):
        by_question[it.info["index"]].append((it.info["choices"][p["choice"]], it.info["choices"][it.info["answer"]]))
    correct = 0
    for votes in by_question.values():
        texts = [v[0] for v in votes]
        counts = {t: texts.count(t) for t in dict.fromkeys(texts)}
        best = [t for t, c in counts.items() if c == max(counts.values())]
        correct += rng.choice(best) == votes[-1][1]
    return {"accuracy": correct / len(by_question), "circular_accuracy": strict, "questions": len(by_question),
            "count": len(records)}


def _mme_answer(text: str) -> str:
    """MME's calculation.py: 'yes' / 'no' when the reply is, or starts with, one of them; else 'other'."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def _mme_score(items, preds):
    per_category = defaultdict(lambda: {"right": 0, "total": 0, "images": defaultdict(list)})
    for it, p in zip(items, preds):
        c = per_category[it.info["category"]]
        right = _mme_answer(p) == it.info["answer"].lower()
        c["right"] += right
        c["total"] += 1
        c["images"][it.info["image"]].append(right)
    result, perception, cognition = {}, 0.0, 0.0
    for category, c in sorted(per_category.items()):
        acc = c["right"] / c["total"]
        acc_plus = sum(all(v) for v in c["images"].values()) / len(c["images"])
        value = 100 * (acc + acc_plus)
        result[category] = value
        perception += value if category in MME_PERCEPTION else 0.0
        cognition += value if category in MME_COGNITION else 0.0
    return {"total_score": perception + cognition, "perception": perception, "cognition": cognition,
            "categories": result, "count": len(items)}


# ---- submission files -------------------------------------------------------------------------------
# The files each benchmark's server (or, for MME, its calculation.py) takes, written next to predictions.jsonl.
# Test splits ship without answers: for them these files are the result.

EVALAI = ("vqav2", "okvqa", "textvqa", "vizwiz")  # EvalAI: [{"question_id", "answer"}]
RRC = ("docvqa", "infographicsvqa")  # the Robust Reading Competition site: [{"questionId", "answer"}]
SUBMITTED = (*EVALAI, *RRC, "mmbench", "mme", "seed_bench")


def scorable(task: Task, items: list[Item]) -> bool:
    """Whether the items carry what scoring needs (a test split carries no answers: it is only submitted)."""
    if task.metric in ("vqa", "anls", "relaxed", "exact", "gqa"):
        return bool(items[0].info["answers"])  # the readers allow all or none
    if task.kind == "choice":
        return all(it.info["answer"] is not None for it in items)
    if task.metric == "caption":
        return all(it.info["references"] for it in items)
    return True


def write_submission(task: Task, items: list[Item], predictions: dict, out: str) -> str | None:
    """Write the submission file (MME: folder) of `task` in `out`; returns its path, None for other tasks."""
    if task.name in EVALAI or task.name in RRC:
        id_key = "questionId" if task.name in RRC else "question_id"
        rows = [{id_key: it.info["question_id"], "answer": predictions[it.key]} for it in items]
        if task.name == "vizwiz":  # VizWiz's server matches answers to pictures by file name
            for row, it in zip(rows, items):
                row["image"] = os.path.basename(it.info["image"])
        path = os.path.join(out, "submission.json")
        _write_text(path, json.dumps(rows, ensure_ascii=False))
        return path
    if task.name == "seed_bench":
        path = os.path.join(out, "submission.jsonl")
        _write_text(path, "".join(json.dumps({"question_id": it.info["question_id"],
                                              "prediction": OPTION_LETTERS[predictions[it.key]["choice"]]}) + "\n"
                                  for it in items))
        return path
    if task.name == "mmbench":
        # mmbench_predict_to_submission.py's sheet: index, question, A-D, the letter chosen (and answer if known)
        header = ["index", "question", "A", "B", "C", "D", "prediction"]
        known = all(it.info["answer"] is not None for it in items)
        header += ["answer"] if known else []
        rows = []
        for it in items:
            choices = it.info["choices"] + [""] * (4 - len(it.info["choices"]))
            row = [int(it.key), it.info["question"], *choices[:4], OPTION_LETTERS[predictions[it.key]["choice"]]]
            rows.append(row + ([OPTION_LETTERS[it.info["answer"]]] if known else []))
        path = os.path.join(out, "submission.xlsx")
        write_xlsx(path, header, rows)
        return path
    if task.name == "mme":
        # eval.py's Qwen-VL-Chat/<category>.txt: image, question, ground truth, reply; calculation.py
        # --results_dir reads them, two lines (the Yes and the No question) per picture, in the source order
        folder = os.path.join(out, "mme_results")
        os.makedirs(folder, exist_ok=True)
        lines = defaultdict(list)
        for it in items:
            reply = " ".join(predictions[it.key].split())  # a tab or newline in a reply would break the columns
            lines[it.info["category"]].append("\t".join((it.info["image"], it.info["question"], it.info["answer"], reply)))
        for category, rows in lines.items():
            _write_text(os.path.join(folder, f"{category}.txt"), "\n".join(rows) + "\n")
        return folder
    return None


def _write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_xlsx(path: str, header: list[str], rows: list[list]) -> None:
    """A one-sheet .xlsx (what MMBench's server takes) without a spreadsheet library: the five XML parts of a
    minimal workbook, strings inline, integers as numbers."""
    import zipfile
    from xml.sax.saxutils import escape

    def column(n: int) -> str:
        name = ""
        while n >= 0:
            n, r = divmod(n, 26)
            name, n = chr(65 + r) + name, n - 1
        return name

    def cell(ref: str, value) -> str:
        if isinstance(value, int):
            return f'<c r="{ref}"><v>{value}</v></c>'
        text = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", str(value))  # characters XML cannot hold
        return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{escape(text)}</t></is></c>'

    sheet_rows = "".join(f'<row r="{r + 1}">' + "".join(cell(f"{column(c)}{r + 1}", v) for c, v in enumerate(row))
                         + "</row>" for r, row in enumerate([header, *rows]))
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    package = "http://schemas.openxmlformats.org/package/2006/relationships"
    parts = {
        "[Content_Types].xml": '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>',
        "_rels/.rels": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="{package}">'
        f'<Relationship Id="rId1" Type="{rel}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook xmlns="{main}" '
        f'xmlns:r="{rel}"><sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<Relationships xmlns="{package}"><Relationship Id="rId1" Type="{rel}/worksheet" '
        'Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<worksheet xmlns="{main}"><sheetData>{sheet_rows}</sheetData></worksheet>',
    }
    with zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in parts.items():
            z.writestr(name, text)
    os.replace(path + ".tmp", path)
