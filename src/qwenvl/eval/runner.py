"""`qwenvl eval TASK -m PATH --data FILE`: run a benchmark as the original does and score it.

Predictions are appended to OUT/predictions.rank<R>.jsonl as each batch finishes, so an interrupted run
continues where it stopped (whatever the number of processes then). Under torchrun every rank takes a
contiguous slice of the items (the original's InferenceSampler); rank 0 gathers, scores once and writes
OUT/predictions.jsonl (in input order), OUT/metrics.json and a summary table. Benchmarks scored by a server
also get the file that server takes (see tasks.write_submission); a test split without answers gets only
that file, and metrics.json says where it is.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import processor
from ..errors import OptionsError
from . import tasks as T

RUN_FILE = "run.json"


@dataclass
class EvalArgs:
    task: str
    model: str
    data: str
    images: str | None = None
    annotations: str | None = None
    batch_size: int = 1
    limit: int | None = None
    out: str | None = None
    scorer: str = "fixed"
    few_shot: int = 0
    few_shot_data: str | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True
    max_new_tokens: int | None = None  # the task's protocol length unless set (a cap for quick runs)


def shard(total: int, world: int, rank: int) -> range:
    """The original InferenceSampler's contiguous slice of rank `rank`."""
    size, left = divmod(total, world)
    sizes = [size + int(r < left) for r in range(world)]
    begin = sum(sizes[:rank])
    return range(begin, begin + sizes[rank])


def compat_dropped(keys: list[str], world: int, batch_size: int) -> set[str]:
    """Keys the original grounding evaluation never scores: each rank's last incomplete batch (drop_last=True)."""
    dropped = set()
    for rank in range(world):
        part = shard(len(keys), world, rank)
        kept = len(part) - len(part) % batch_size
        dropped.update(keys[i] for i in part[kept:])
    return dropped


class Dist:
    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.enabled = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("gloo")  # only small objects travel; the model runs on each rank's device
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    def barrier(self):
        if self.enabled:
            self.dist.barrier()

    def broadcast(self, value):
        if not self.enabled:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


def settings(args: EvalArgs, count: int) -> dict:
    """What must match for predictions in OUT to be reused (the scorer may change between runs)."""
    return {"task": args.task, "model": os.path.abspath(args.model), "data": os.path.abspath(args.data),
            "images": args.images and os.path.abspath(args.images), "items": count, "few_shot": args.few_shot,
            "few_shot_data": args.few_shot_data and os.path.abspath(args.few_shot_data), "seed": args.seed,
            "dtype": args.dtype, **({} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens})}


def read_predictions(out: str) -> dict:
    done = {}
    for path in sorted(glob.glob(os.path.join(out, "predictions.rank*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that item runs again
                done.setdefault(record["key"], record["prediction"])
    return done


def trim_partial_line(path: str) -> None:
    """Cut a line left unfinished by an interruption, so that appending starts on a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


# ---- model side -------------------------------------------------------------------------------------


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def predict_generate(model, tokenizer, task: T.Task, batch: list[T.Item]) -> list[str]:
    ids, mask = left_pad([tokenizer.encode(it.prompt) for it in batch], tokenizer.eod_id)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=task.max_new_tokens,
                         min_new_tokens=task.min_new_tokens, eos_token_id=tokenizer.eod_id,
                         pad_token_id=tokenizer.eod_id)
    texts = [tokenizer.decode(row[ids.shape[1]:].tolist(), skip_special_tokens=True) for row in out]
    # the original strips answers and captions, not grounding outputs (the box is parsed from the raw text)
    return texts if task.metric == "grounding" else [t.strip() for t in texts]


def predict_chat(model, tokenizer, task: T.Task, batch: list[T.Item]) -> list[str]:
    return chat_replies(model, tokenizer, [it.prompt for it in batch], task.max_new_tokens)


def chat_replies(model, tokenizer, queries: list[str], max_new_tokens: int, skip_special_tokens: bool = True) -> list[str]:
    """Greedy single-turn chat replies to `queries` in one left-padded batch (the default system prompt), each
    what `model.chat` gives alone; the benchmarks drop special tokens (as the original's scripts do), keeping
    them keeps the <ref>/<box> tags."""
    from ..chat import DEFAULT_SYSTEM, make_context, reply_ids, stop_words

    rows = [make_context(tokenizer, query, system=DEFAULT_SYSTEM)[1] for query in queries]
    ids, mask = left_pad(rows, tokenizer.eod_id)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         stop_words_ids=stop_words(tokenizer), eos_token_id=tokenizer.eod_id,
                         pad_token_id=tokenizer.eod_id)
    return [tokenizer.decode(reply_ids(row[ids.shape[1]:].tolist(), tokenizer), skip_special_tokens=skip_special_tokens,
                             errors="replace").strip() for row in out]


def predict_choice(model, tokenizer, task: T.Task, batch: list[T.Item]) -> list[dict]:
    """The original's likelihood ranking: prompt + " A", " B", ... scored together (left padded); the option
    whose tokens have the lowest mean loss wins (first one on a tie, as argmin)."""
    rows, spans = [], []
    for it in batch:
        prompt = tokenizer.encode(it.prompt)
        for letter in T.OPTION_LETTERS[:it.options]:
            target = tokenizer.encode(" " + letter)
            rows.append(prompt + target)
            spans.append(len(target))
    full, full_mask = left_pad(rows, tokenizer.eod_id)
    ids, mask, targets = full[:, :-1], full_mask[:, :-1], full[:, 1:]  # the original feeds input_tokens[:, :-1]
    with torch.inference_mode():
        step = model.full_step(ids.to(model.device), mask, None, None)
        pixels = processor.prompt_pixels(model.config, ids)
        hidden = model.transformer.run_blocks(model.embed(ids.to(model.device), pixels), step)
        losses = []
        for r, n in enumerate(spans):
            logits = model.lm_head(hidden[r, -n:]).float()
            losses.append(float(F.cross_entropy(logits, targets[r, -n:].to(logits.device))))
    results, start = [], 0
    for it in batch:
        option_losses = losses[start:start + it.options]
        start += it.options
        results.append({"choice": min(range(it.options), key=option_losses.__getitem__), "losses": option_losses})
    return results


PREDICT = {"generate": predict_generate, "chat": predict_chat, "choice": predict_choice}


# ---- the run ----------------------------------------------------------------------------------------


def evaluate(args: EvalArgs) -> dict | None:
    """Run (or resume) a benchmark; returns the metrics on rank 0, None on the others."""
    from .. import loading
    from ..tokenizer import QWenTokenizer

    if args.task not in T.TASKS:
        raise OptionsError(f"unknown task {args.task!r}; choose from {', '.join(T.TASKS)}")
    if args.scorer not in ("fixed", "compat"):
        raise OptionsError(f"--scorer takes fixed or compat, not {args.scorer!r}")
    if args.batch_size < 1:
        raise OptionsError(f"--batch-size must be at least 1, not {args.batch_size}")
    task = T.TASKS[args.task]
    if args.max_new_tokens is not None:
        if isinstance(args.max_new_tokens, bool) or not isinstance(args.max_new_tokens, int) or args.max_new_tokens < 1:
            raise OptionsError(f"--max-new-tokens must be a positive integer, not {args.max_new_tokens!r}")
        task = dataclasses.replace(task, max_new_tokens=args.max_new_tokens)
    dist_ = Dist()
    out = args.out or os.path.join("eval_results", args.task)
    os.makedirs(out, exist_ok=True)
    data_dir = os.path.dirname(os.path.abspath(args.data))
    images = T.Images(args.images, data_dir)
    items = T.load_items(task, args.data, images, args.annotations, work_dir=out)
    if args.limit is not None:
        items = items[:max(0, args.limit)]
    if not items:
        raise T.EvalDataError(f"{args.data}: no items to evaluate")
    if not T.scorable(task, items) and task.name not in T.SUBMITTED:
        raise T.EvalDataError(f"{args.data}: the items have no answers to score {args.task} with, and {args.task} "
                              "has no server to submit predictions to")
    if args.few_shot:
        pool = T.load_items(task, args.few_shot_data, T.Images(args.images, os.path.dirname(
            os.path.abspath(args.few_shot_data))), None, out) if args.few_shot_data else items
        items = T.add_few_shot(task, items, pool, args.few_shot, args.seed, compat=args.scorer == "compat")

    run = settings(args, len(items))
    run_path = os.path.join(out, RUN_FILE)
    if dist_.rank == 0:
        if os.path.exists(run_path):
            previous = T.read_json(run_path)
            if previous.get("settings") != run:
                changed = sorted(k for k in run if previous.get("settings", {}).get(k) != run[k])
                raise OptionsError(f"{out} holds predictions of a different run ({', '.join(changed)} differ): "
                                 "use another --out or delete it")
        with open(run_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"settings": run, "world_size": dist_.world, "batch_size": args.batch_size}, f, indent=1)
        os.replace(run_path + ".tmp", run_path)
    dist_.barrier()

    done = read_predictions(out)
    mine = [items[i] for i in shard(len(items), dist_.world, dist_.rank)]
    todo = [it for it in mine if it.key not in done]
    if todo:
        tokenizer = QWenTokenizer.from_pretrained(args.model)
        kwargs = {"bf16": args.dtype == "bf16", "fp16": args.dtype == "fp16", "fp32": args.dtype == "fp32"}
        device = args.device
        if device == "auto":  # under torchrun each rank takes its own GPU
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
        model = loading.from_pretrained(args.model, device_map=device, progress=False, **kwargs)
        predict = PREDICT[task.kind]
        started, finished = time.time(), 0
        part = os.path.join(out, f"predictions.rank{dist_.rank}.jsonl")
        trim_partial_line(part)
        with open(part, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start:start + args.batch_size]
                for item, prediction in zip(batch, predict(model, tokenizer, task, batch)):
                    f.write(json.dumps({"key": item.key, "prediction": prediction}, ensure_ascii=False) + "\n")
                f.flush()
                finished += len(batch)
                if args.progress:
                    _progress(dist_.rank, finished, len(todo), len(mine) - len(todo), started)
    dist_.barrier()
    if dist_.rank != 0:
        return None

    predictions = read_predictions(out)
    missing = [it.key for it in items if it.key not in predictions]
    if missing:
        raise RuntimeError(f"{len(missing)} item(s) have no prediction (first: {missing[0]}); run again to resume")
    compat = args.scorer == "compat"
    dropped = None
    if compat and task.metric == "grounding":
        meta = T.read_json(run_path)
        dropped = compat_dropped([it.key for it in items], meta["world_size"], meta["batch_size"])
    _write(os.path.join(out, "predictions.jsonl"),
           "".join(json.dumps({"key": it.key, "prediction": predictions[it.key]}, ensure_ascii=False) + "\n"
                   for it in items))
    submission = T.write_submission(task, items, predictions, out)
    if T.scorable(task, items):
        result = T.score(task, items, predictions, compat, args.seed, dropped)
    else:  # a test split: the benchmark's server scores the submission
        result = {"count": len(items)}
    result = {"task": args.task, "scorer": args.scorer, "metric": task.headline, **result}
    if submission:
        result["submission"] = submission
    _write(os.path.join(out, "metrics.json"), json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _progress(rank: int, finished: int, total: int, resumed: int, started: float) -> None:
    elapsed = time.time() - started
    rate = finished / max(elapsed, 1e-9)
    bar = "#" * int(30 * finished / total)
    end = "\n" if finished == total else ""
    note = f" ({resumed} resumed)" if resumed else ""
    print(f"\r[rank {rank}] [{bar:<30}] {finished}/{total}{note} {rate:.2f} items/s, "
          f"~{(total - finished) / max(rate, 1e-9):.0f}s left", end=end, file=sys.stderr, flush=True)


def summary_table(results: list[dict]) -> str:
    """A readable table: task, metric, our score ("submit" for a test split), the published Qwen-VL (7B) score
    where known, items, and the run's folder when the results carry one (`qwenvl eval-table`)."""
    folders = any("folder" in r for r in results)
    rows = [("task", "scorer", "metric", "ours", "Qwen-VL reported", "items") + (("folder",) if folders else ())]
    for r in results:
        task = T.TASKS[r["task"]]
        value = r.get(r["metric"])
        shown = "submit" if value is None else f"{value:.2f}" if task.metric in ("mme",) else f"{100 * value:.2f}"
        rows.append((r["task"], r["scorer"], r["metric"], shown, task.reported or "-", str(r["count"]))
                    + ((r.get("folder", "-"),) if folders else ()))
    return format_table(rows)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
