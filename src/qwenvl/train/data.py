"""Fine-tuning data (SPEC section 9): conversation files -> checked records -> ChatML ids with the original's
loss mask -> batches, with the images loaded and preprocessed in DataLoader workers.

    records = load_records("train.jsonl")                  # every problem of the file at once, or DataError
    dataset = ConversationDataset(records, tokenizer, image_size=448, max_len=2048)
    sampler = MicroBatchSampler(len(dataset), batch_size=4, grad_accum=1, seed=42, steps=100)
    for batch in make_dataloader(dataset, sampler, num_workers=2):  # input_ids, labels, attention_mask, pixel_values (+ position_ids, segment_ids packed)
        model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
              images=batch["pixel_values"], position_ids=batch.get("position_ids"),
              segment_ids=batch.get("segment_ids"))

Records and turns are numbered from 0 in messages. Labels are unshifted (the model shifts), -100 = not learned.
"""
from __future__ import annotations

import bisect
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..boxes import TAGS, split_tags
from ..chat import DEFAULT_SYSTEM
from .. import errors
from ..images import load_image, preprocess, short_label

IGNORE = -100
MAX_LISTED = 50  # problems listed in one DataError; the rest are counted
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
NOT_FILES = ("http://", "https://", "data:")  # image references that are not checked or rewritten
TAG_STRINGS = tuple(tag for pair in TAGS.values() for tag in pair)
_BROKEN_LINE = object()  # stands for a JSON Lines line that did not parse, so positions stay line-true


class DataError(errors.DataError):
    """Problems in training data; the message lists each as `record N (id ...): problem`."""

    def __init__(self, problems: list[str] | str, source=None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        if source is None and len(self.problems) == 1:
            message = self.problems[0]
        else:
            count = len(self.problems)
            lines = self.problems[:MAX_LISTED]
            if count > MAX_LISTED:
                lines.append(f"... and {count - MAX_LISTED} more")
            where = f"{source}: " if source is not None else ""
            message = (f"{where}{count} problem{'s' if count != 1 else ''} (records and turns numbered from 0); "
                       "fix them and run again:\n  " + "\n  ".join(lines))
        super().__init__(message)


# ---- files ------------------------------------------------------------------------------------------


def load_records(path) -> list[dict]:
    """Read a JSON list or JSON Lines file (told apart by content) and check every record.

    Returns the records with roles normalized (`human` -> `user`, `gpt` -> `assistant`) and local image
    references made absolute. A relative one is looked up in the working folder first (as the original's
    finetune.py opens it), then in the data file's folder; when both hold a different file of that name, the
    working folder's is used and one line on stderr says so. URLs are kept. Raises DataError listing every
    problem of the file.
    """
    path = Path(path)
    items, problems = _read_items(path)
    folder = path.resolve().parent
    records, ambiguous = [], []
    for position, item in enumerate(items):
        if item is _BROKEN_LINE:
            continue
        record, record_problems, record_ambiguous = _check_record(item, folder)
        record_id = item.get("id") if isinstance(item, dict) else None
        problems += [f"record {position} (id {record_id!r}): {p}" for p in record_problems]
        ambiguous += [f"record {position} (id {record_id!r}): {a}" for a in record_ambiguous]
        records.append(record)
    if not items and not problems:
        problems.append("the file holds no records")
    if problems:
        raise DataError(problems, source=path)
    if ambiguous:
        print(f"{path}: {len(ambiguous)} image path(s) name a file both in the working folder and beside the data "
              f"file; the working folder's was used (as the original does), e.g. {ambiguous[0]}", file=sys.stderr)
    return records


def _read_items(path: Path) -> tuple[list, list[str]]:
    if not path.is_file():
        raise DataError(f"training data file not found: {path}" if not path.exists()
                        else f"training data path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON or JSON Lines") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise DataError(f"{path} is empty: it must hold a JSON list of records or one JSON record per line")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return items, []
    items, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as e:
            items.append(_BROKEN_LINE)
            problems.append(f"line {number}: not valid JSON ({e.msg} at column {e.colno})")
    if problems:
        try:  # one pretty-printed object is not JSON Lines: say so instead of listing its lines
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            raise DataError(f"{path} holds one JSON {type(whole).__name__}, not a list of records: "
                            "use a JSON list, or JSON Lines (one record per line)")
    return items, problems


def _check_record(record, folder: Path) -> tuple[dict | None, list[str], list[str]]:
    """The normalized record, the problems found in it and its ambiguous image paths (without the `record N`
    prefix)."""
    if not isinstance(record, dict):
        return None, [f"is a JSON {type(record).__name__}, not an object with 'conversations'"], []
    problems, ambiguous = [], []
    out = dict(record)
    if "system" in record:
        if not isinstance(record["system"], str):
            problems.append(f"'system' is a {type(record['system']).__name__}, not text")
        else:
            out["system"], text_problems = _check_text(record["system"], folder, ambiguous)
            problems += [f"system: {p}" for p in text_problems]
    turns = record.get("conversations")
    if turns is None:
        return out, problems + ["has no 'conversations' list"], ambiguous
    if not isinstance(turns, list):
        return out, problems + [f"'conversations' is a {type(turns).__name__}, not a list of turns"], ambiguous
    if not turns:
        return out, problems + ["'conversations' is empty"], ambiguous
    roles, out["conversations"] = [], []
    for j, turn in enumerate(turns):
        role, value = None, None
        if not isinstance(turn, dict):
            problems.append(f"turn {j} is a {type(turn).__name__}, not an object with 'from' and 'value'")
        else:
            raw_role, value = turn.get("from"), turn.get("value")
            if raw_role is None:
                problems.append(f"turn {j} has no 'from'")
            elif not isinstance(raw_role, str) or raw_role.strip().lower() not in ROLES:
                problems.append(f"turn {j}: unknown role {raw_role!r} (use 'user' or 'assistant')")
            else:
                role = ROLES[raw_role.strip().lower()]
            if value is None:
                problems.append(f"turn {j} has no 'value'")
            elif not isinstance(value, str):
                problems.append(f"turn {j}: 'value' is a {type(value).__name__}, not text")
                value = None
            elif not value.strip():
                problems.append(f"turn {j} is empty")
            else:
                value, text_problems = _check_text(value, folder, ambiguous)
                problems += [f"turn {j}: {p}" for p in text_problems]
        roles.append(role)
        out["conversations"].append({**(turn if isinstance(turn, dict) else {}), "from": role, "value": value})
    for j, role in enumerate(roles):  # only the first break: every later turn would be off by one too
        expected = "user" if j % 2 == 0 else "assistant"
        if role is not None and role != expected:
            if j == 0:
                problems.append("starts with an assistant turn (the first turn must be the user's)")
            elif roles[j - 1] == role:
                problems.append(f"turn {j}: two {role} turns in a row (roles must alternate user, assistant, ...)")
            else:
                problems.append(f"turn {j} is from the {role}, expected the {expected} "
                                "(roles must alternate user, assistant, ...)")
            break
    if roles[-1] == "user":
        problems.append("ends with a user turn (the last turn must be the assistant's answer, which is learned)")
    return out, problems, ambiguous


def _check_text(text: str, folder: Path, ambiguous: list[str]) -> tuple[str, list[str]]:
    """`text` with local image paths made absolute, and its tag problems (unclosed, stray, nested, no file);
    image paths found both in the working folder and in `folder` are added to `ambiguous`."""
    try:
        elements = split_tags(text, strict=True)
    except ValueError as e:
        return text, [str(e)]
    problems, pieces = [], []
    for element in elements:
        (name, body), = element.items()
        stray = next((tag for tag in TAG_STRINGS if tag in body), None)
        if stray is not None:  # the tokenizer would pair tags differently from split_tags: refuse it
            problems.append(f"{stray} without its opening tag" if name == "text" else
                            f"{stray} inside {TAGS[name][0]}...{TAGS[name][1]} (tags cannot nest)")
        if name == "text":
            pieces.append(body)
            continue
        if name == "image":
            resolved, problem, other = _resolve_image(body, folder)
            if problem:
                problems.append(problem)
            if other:
                ambiguous.append(f"{body} -> {resolved}, not {other}")
            body = resolved
        pieces.append(TAGS[name][0] + body + TAGS[name][1])
    return "".join(pieces), problems


def _resolve_image(reference: str, folder: Path) -> tuple[str, str | None, str | None]:
    """(absolute path, problem, the data folder's other file when the working folder's was chosen over it)."""
    if not reference.strip():
        return reference, "empty image reference <img></img>", None
    if reference.startswith(NOT_FILES):
        return reference, None, None
    local = os.path.expanduser(reference[len("file://"):] if reference.startswith("file://") else reference)
    here, beside = os.path.abspath(local), os.path.normpath(os.path.join(folder, local))
    if os.path.isfile(here):
        other = beside if os.path.isfile(beside) and not os.path.samefile(here, beside) else None
        return here, None, other
    if os.path.isfile(beside):
        return beside, None, None
    where = here if here == beside else f"{here} (working folder) nor {beside} (beside the data file)"
    return reference, f"image file not found: {where}", None


# ---- encoding and truncation ------------------------------------------------------------------------


def encode_record(tokenizer, record: dict, default_system: str = DEFAULT_SYSTEM
                  ) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, turn_ends) in the original fine-tuning script's ChatML layout and masking.

    Each turn (system first) is `<|im_start|>` role `\\n` content `<|im_end|>` `\\n`. Labels: `<|im_start|>`,
    `<|im_end|>` and the `\\n` after it are learned in every turn, and the content of assistant turns
    (but for the inside of an image span there); the rest is IGNORE. `turn_ends[k]` is the index just after turn k.
    """
    # Only the image/box tags are special, as in qwenvl.make_context, so training and inference prompts
    # tokenize alike; the original's script allowed every special token (`<|im_end|>` typed in a turn).
    tags = set(tokenizer.IMAGE_ST)
    nl = tokenizer.encode("\n")
    system = record.get("system")
    turns = [("system", default_system if system is None else system)]
    turns += [(ROLES[turn["from"]], turn["value"]) for turn in record["conversations"]]
    input_ids, labels, turn_ends = [], [], []
    for role, content in turns:
        head = [tokenizer.im_start_id] + tokenizer.encode(role, allowed_special=tags) + nl
        body = tokenizer.encode(content, allowed_special=tags)
        tail = [tokenizer.im_end_id] + nl
        input_ids += head + body + tail
        learned = _without_image_content(body, tokenizer) if role == "assistant" else [IGNORE] * len(body)
        labels += head[:1] + [IGNORE] * (len(head) - 1) + learned + tail
        turn_ends.append(len(input_ids))
    return input_ids, labels, turn_ends


def _without_image_content(body: list[int], tokenizer) -> list[int]:
    """Assistant labels with the 256 positions inside each image span ignored: they hold image features,
    not tokens to predict (the original's script labelled the reference bytes there)."""
    labels, inside = list(body), False
    for i, t in enumerate(body):
        if t == tokenizer.img_end_id:
            inside = False
        if inside:
            labels[i] = IGNORE
        if t == tokenizer.img_start_id:
            inside = True
    return labels


def record_images(record: dict) -> list[str]:
    """The record's image references in the order of their spans in `encode_record`'s ids."""
    texts = [record.get("system") or ""] + [turn["value"] for turn in record["conversations"]]
    return [element["image"] for text in texts for element in split_tags(text) if "image" in element]


def fit(input_ids, labels, turn_ends: list[int], max_len: int):
    """(input_ids, labels) within max_len tokens, or None when even system + first exchange is too long.

    A long sample is cut after its last complete user + assistant pair that fits, never inside a turn, so
    never inside an image span or a ref/box tag (the original cut blindly at max_len).
    """
    if len(input_ids) <= max_len:
        return input_ids, labels
    cut = max((end for end in turn_ends[2::2] if end <= max_len), default=None)  # [0] is the system turn
    if cut is None:
        return None
    return input_ids[:cut], labels[:cut]


# ---- datasets ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    position: int  # in the records list
    id: object
    input_ids: np.ndarray  # int32: compact, and shared by forked workers without copying
    labels: np.ndarray
    images: list[str]  # references, in span order


class ConversationDataset(torch.utils.data.Dataset):
    """Encoded, fitted samples; `dataset[i]` loads its images (so DataLoader workers do that work).

    Item: {"input_ids": LongTensor[T], "labels": LongTensor[T], "pixel_values": FloatTensor[n_images, 3, S, S]}.
    `num_truncated` samples were cut to max_len, `num_skipped` did not fit at all.
    """

    def __init__(self, records: list[dict], tokenizer, image_size: int = 448, max_len: int = 2048,
                 default_system: str = DEFAULT_SYSTEM):
        self.image_size, self.max_len, self.pad_id = image_size, max_len, tokenizer.pad_token_id
        self.samples: list[Sample] = []
        self.num_truncated = self.num_skipped = 0
        shortest = None
        for position, record in enumerate(records):
            input_ids, labels, turn_ends = encode_record(tokenizer, record, default_system)
            images = record_images(record)
            if input_ids.count(tokenizer.img_start_id) != len(images):
                raise DataError(f"record {position} (id {record.get('id')!r}): the text has {len(images)} images "
                                f"but its ids {input_ids.count(tokenizer.img_start_id)} image spans; "
                                "were the records checked with load_records?")
            fitted = fit(input_ids, labels, turn_ends, max_len)
            if fitted is None:
                self.num_skipped += 1
                shortest = min(turn_ends[2], shortest or turn_ends[2])
                continue
            kept_ids, kept_labels = fitted
            self.num_truncated += len(kept_ids) < len(input_ids)
            self.samples.append(Sample(position, record.get("id"), np.asarray(kept_ids, dtype=np.int32),
                                       np.asarray(kept_labels, dtype=np.int32),
                                       images[:kept_ids.count(tokenizer.img_start_id)]))
        if not self.samples:
            raise DataError(f"no sample fits in max_len={max_len} tokens: "
                            f"the shortest needs {shortest} for its system turn and first exchange; raise max_len"
                            if shortest else "no records to train on")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        size = self.image_size
        pixel_values = torch.empty(len(sample.images), 3, size, size)
        for k, reference in enumerate(sample.images):
            try:
                pixel_values[k] = preprocess(load_image(reference), size)
            except (ValueError, OSError, Image.DecompressionBombError) as e:
                raise DataError(f"record {sample.position} (id {sample.id!r}): cannot load image "
                                f"{short_label(reference)}: {e}") from None
        return {"input_ids": torch.from_numpy(sample.input_ids).long(),
                "labels": torch.from_numpy(sample.labels).long(), "pixel_values": pixel_values}


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Rows of sample indices, each row's total length <= max_len; best-fit decreasing, deterministic.

    Each sample goes, longest first, into the fullest row that still has room for it (a new row if none).
    """
    free: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the tightest fit
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_len:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than a packed row's {max_len}")
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            room, row = max_len - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return [sorted(row) for row in rows]


class PackedDataset(torch.utils.data.Dataset):
    """Several samples of `dataset` per item (see `pack`), for training with little padding.

    Item: input_ids, labels, pixel_values as `ConversationDataset`'s, concatenated, plus `position_ids`
    (restarting at 0 for each sample) and `segment_ids` (1, 2, ... per sample). Each sample's first label
    is IGNORE: in a row it would be the target of the previous sample's last token (the model also drops
    targets across segments; this keeps the loss right for code that does not).
    """

    def __init__(self, dataset: ConversationDataset, max_len: int | None = None):
        self.dataset = dataset
        self.max_len = max_len or dataset.max_len
        self.pad_id, self.image_size = dataset.pad_id, dataset.image_size
        self.rows = pack(dataset.lengths, self.max_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        parts = [self.dataset[i] for i in self.rows[index]]
        labels = [p["labels"].clone() for p in parts]
        for row_labels in labels:
            row_labels[0] = IGNORE
        return {"input_ids": torch.cat([p["input_ids"] for p in parts]), "labels": torch.cat(labels),
                "position_ids": torch.cat([torch.arange(len(p["input_ids"])) for p in parts]),
                "segment_ids": torch.cat([torch.full((len(p["input_ids"]),), k + 1) for k, p in enumerate(parts)]),
                "pixel_values": torch.cat([p["pixel_values"] for p in parts])}


# ---- batches ----------------------------------------------------------------------------------------

PAD_VALUES = {"labels": IGNORE, "position_ids": 0, "segment_ids": 0}  # input_ids take pad_id


def collate(batch: list[dict], pad_id: int) -> dict:
    """Items of either dataset -> one batch, right-padded to its longest row (not to max_len).

    input_ids get pad_id, labels IGNORE, position_ids and segment_ids 0; attention_mask is 1 on real
    tokens; pixel_values are concatenated in row-major span order ([0, 3, S, S] when there are none).
    """
    keys = [k for k in ("input_ids", "labels", "position_ids", "segment_ids") if k in batch[0]]
    if any(set(keys) != {k for k in item if k in PAD_VALUES or k == "input_ids"} for item in batch):
        raise ValueError("cannot collate packed and unpacked items into one batch")
    lengths = [len(item["input_ids"]) for item in batch]
    out = {}
    for key in keys:
        out[key] = torch.full((len(batch), max(lengths)), PAD_VALUES.get(key, pad_id), dtype=torch.long)
        for row, item in enumerate(batch):
            out[key][row, :lengths[row]] = item[key]
    out["attention_mask"] = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    out["pixel_values"] = torch.cat([item["pixel_values"] for item in batch])
    return out


  # the name the training loop calls


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded sample order of one epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()


class MicroBatchSampler(torch.utils.data.Sampler):
    """One process's micro-batches (index lists), optimizer step after step, from (epoch, step) onwards.

    A step takes `batch_size * grad_accum * world` samples of the epoch's seeded order; process `rank`
    takes its contiguous share, cut into `grad_accum` micro-batches. In one process, fewer samples than that
    make one step of all of them per epoch (its last micro-batch short). Starting at a later (epoch, step)
    resumes a run without loading the samples before it.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int, steps: int, rank: int = 0,
                 world: int = 1, epoch: int = 0, step_in_epoch: int = 0):
        self.n, self.batch_size, self.grad_accum, self.seed, self.steps = n, batch_size, grad_accum, seed, steps
        self.rank, self.world, self.epoch, self.step_in_epoch = rank, world, epoch, step_in_epoch
        self.steps_per_epoch = n // (batch_size * grad_accum * world)
        if self.steps_per_epoch == 0 and world == 1 and n > 0:
            self.steps_per_epoch = 1  # one short step takes the whole epoch (the HF Trainer's way)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} samples are fewer than one global batch ({batch_size * grad_accum * world})")

    def micro_batches(self, order: list[int], step: int) -> list[list[int]]:
        per_rank = self.batch_size * self.grad_accum
        start = (step * self.world + self.rank) * per_rank
        mine = order[start:start + per_rank]
        return [mine[i:i + self.batch_size] for i in range(0, per_rank, self.batch_size)]

    def __iter__(self):
        epoch, step = self.epoch, self.step_in_epoch
        order = epoch_order(self.n, self.seed, epoch)
        for _ in range(self.steps):
            if step >= self.steps_per_epoch:
                epoch, step = epoch + 1, 0
                order = epoch_order(self.n, self.seed, epoch)
            yield from self.micro_batches(order, step)
            step += 1

    def __len__(self) -> int:
        return self.steps * self.grad_accum


def make_dataloader(dataset, sampler: MicroBatchSampler, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Collated micro-batches in the sampler's order; worker processes load and preprocess the images."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=functools.partial(collate, pad_id=dataset.pad_id))
