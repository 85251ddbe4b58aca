"""The bundled demo model: a small Qwen-VL (the real architecture and vocabulary, 224-pixel pictures) trained
from scratch on `qwenvl data synth` pictures with the paper's three stages, shipped in the package so that
`qwenvl chat` and `qwenvl generate` work offline with no `-m`. The released model starts from a pretrained
ViT and LLM; here a stage 0 pretrains the vision tower on the generator's per-cell labels first.

    qwenvl demo build --out DIR      # synthesize data, init, stage 0 -> 1 -> 2 -> 3, write DIR (official layout)
    qwenvl demo quality [-m DIR]     # the quality table on a held-out synthetic test set

Every token id the training data never contains gets the same embedding row and the same lm_head row at
initialization, and training keeps them identical (`TrainArgs.keep_tied_rows`), so those ~150k rows
compress to almost nothing in git and in wheels while the checkpoint stays an ordinary one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import GenerationConfig, QWenConfig, VisualConfig
from .data import synth
from .errors import OptionsError
from .loading import TOKENIZER_FILES, save_pretrained

DEMO_MODEL = Path(__file__).parent / "demo_model"

DEMO_CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, kv_channels=64,
                   intermediate_size=1536, seq_length=2048, bf16=True,
                   visual=dict(image_size=224, patch_size=14, width=256, layers=4, heads=4, mlp_ratio=4.0,
                               output_dim=256))

# (stage, share of the optimizer steps, peak learning rate, tasks of its data): the paper's recipe in small.
# Stage 1 trains ViT + resampler on captions with the LLM frozen; stage 2 trains everything on the
# multi-task mixture; stage 3 is supervised fine-tuning on the same mixture with the ViT frozen.
STAGES = ((1, 0.02, 1e-4, ("caption",)), (2, 0.83, 1e-3, None), (3, 0.15, 2e-4, None))


# Training records: the seven tasks, plus as many again of multi-turn conversations about one picture (several
# supervised answers for one picture's cost).
TRAIN_TASKS = ("caption", "vqa", "grounding", "referring", "grounded_caption", "ocr", "compare") + \
    ("multi",) * 7


# After stage 0 the vision tower stays as pretrained; only its output adapter (ln_post and proj) trains with
# the LLM. Measured on this recipe: with a random LLM, gradients through the LLM make the image features the
# same for every picture (a constant prefix is all a random LLM can use): 40 steps of stage 1 at lr 1e-4
# brought the cosine between two pictures' features from 0.46 to 0.9997, and so did 40 steps of stage 2 at
# 1e-3 with the resampler frozen; the model then never learned to look.
FROZEN = ("transformer.visual.conv1", "transformer.visual.positional_embedding", "transformer.visual.ln_pre",
          "transformer.visual.transformer", "transformer.visual.attn_pool")


def demo_config(spec: dict = DEMO_CONFIG) -> QWenConfig:
    """The model's shape from a DEMO_CONFIG-like dict (a smaller one builds the same recipe faster)."""
    spec = dict(spec)
    visual = VisualConfig(**spec.pop("visual"))
    return QWenConfig(**spec, visual=visual, extra={"model_type": "qwen", "architectures": ["QWenLMHeadModel"],
                                                    "torch_dtype": "bfloat16"})


# The resampler starts as a one-to-one map from the 16 x 16 ViT tokens to its 256 outputs (see init_model).
POSITION_GAIN = 7.0  # scale of the sin-cos positions in the query/key projections: 99.9% of a query on its own cell
KEY_CONTENT = 0.05  # ln_kv's initial weight: picture content stays a small part of the keys (values rescale it)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """The resampler's fixed 2-D sin-cos position table, [grid * grid, dim], as the original builds it."""
    import numpy as np

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    table = np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)
    return torch.from_numpy(table).float()


def init_model(config: QWenConfig, seen_ids, seed: int = 0):
    """A freshly initialized model (the original's scheme: normal(0, 0.02), output projections scaled by
    1/sqrt(2 * layers), norms 1, biases 0); rows of ids not in `seen_ids` share one embedding row and one
    lm_head row."""
    from .model import QWenLMHeadModel

    torch.manual_seed(seed)
    model = QWenLMHeadModel(config)
    std = 0.02
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("pos_embed") or name == "transformer.visual.positional_embedding":
                p.copy_(sincos_2d(p.shape[1], int(math.isqrt(p.shape[0]))))
            elif "ln" in name.split(".")[-2] or name.split(".")[-2].startswith("ln_"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("c_proj.weight", "w2.weight")) and not name.startswith("transformer.visual"):
                p.normal_(0.0, std / math.sqrt(2 * config.num_hidden_layers))
            else:
                p.normal_(0.0, std)
    route_resampler(model.transformer.visual.attn_pool)
    unseen = torch.ones(config.vocab_size, dtype=torch.bool)
    unseen[torch.tensor(sorted(seen_ids), dtype=torch.long)] = False
    with torch.no_grad():
        for table in (model.transformer.wte.weight, model.lm_head.weight):
            table[unseen] = table[unseen.nonzero()[0, 0]].clone()
    return model


def route_resampler(resampler) -> None:
    """Start the resampler as a one-to-one map: output (r, c) is the ViT token of cell (r, c) (first head) next
    to the average of all tokens (second head).

    The query/key projections pick, for each head, sine/cosine pairs of both axes from the fixed sin-cos
    table (head 0 the fast frequencies, which single out one cell; head 1 the slow ones, near-constant over 16
    cells, hence a plain average); the learned queries fade in from zero through ln_q's weight. Keys also carry
    the picture's content, so ln_kv starts small and the value projection scales it back; the output projection
    starts as the identity. Measured: with random projections every query attends uniformly and all 256
    outputs (and every picture's) are nearly the same average, which nothing downstream can learn to see from.
    """
    dim = resampler.query.shape[1]
    heads = max(1, dim // 128)
    quarter, chunk = dim // 4, dim // 4 // heads  # table: [x sin | x cos | y sin | y cos], frequencies fast to slow
    order = [part * quarter + i for _ in range(heads) for part in range(4) for i in range(chunk)]
    pick = torch.eye(dim)[torch.tensor(order)] * POSITION_GAIN
    with torch.no_grad():
        resampler.ln_q.weight.zero_()
        resampler.ln_kv.weight.fill_(KEY_CONTENT)
        resampler.attn.in_proj_weight.copy_(torch.cat([pick, pick, torch.eye(dim) / KEY_CONTENT]))
        resampler.attn.out_proj.weight.copy_(torch.eye(dim))


def tokens_of(records: list[dict], tokenizer) -> set[int]:
    """Every id the training pipeline feeds the model for these records."""
    from .train.data import DEFAULT_SYSTEM, encode_record

    ids = set()
    for record in records:
        ids.update(encode_record(tokenizer, record, DEFAULT_SYSTEM)[0])
    return ids


# ---- stage 0: the vision tower's own pretraining ---------------------------------------------------------

# The released Qwen-VL starts from a pretrained ViT (OpenCLIP's) and a pretrained LLM. The demo's ViT is
# pretrained first on what the generator knows exactly for each of the 16 x 16 output cells: the colour, shape
# and word under the cell's centre (classes) and the box of that object in thousandths (regression). Heads
# read the resampler's outputs (the resampler itself stays the one-to-one map, as in the later stages) and are
# dropped afterwards; the checkpoint keeps only the tower. Measured: the same tower trained only through a
# random LLM learns nothing about the picture (see FROZEN).
# Measured with a 300-step probe (32 pictures a step): a per-cell label of the picture's shape count stopped
# shape learning altogether (0.27 after 300 steps, against 0.34 without it), and so did the box as 12 digit
# classes; the box as 4 numbers costs nothing (mean error 48/1000 after 300 steps).
CELL_HEADS = (("colour", 1 + len(synth.COLOURS)), ("shape", 1 + len(synth.SHAPES)),
              ("word", 1 + len(synth.WORDS_EN) + len(synth.WORDS_ZH)))
BOX_WEIGHT = 1.0  # the smooth-L1 box loss next to the three cross-entropies
VISION_STEPS, VISION_BATCH, VISION_LR = 3000, 32, 1e-3


def cell_labels(image: dict, grid: int = 16) -> np.ndarray:
    """[grid * grid, 3 + 4] for one picture's meta: colour, shape and word class ids (0 for nothing), then the
    covering object's box in thousandths (-1 where no object covers the cell's centre)."""
    names = (["none", *synth.COLOURS], ["none", *synth.SHAPES], ["none", *synth.WORDS_EN, *synth.WORDS_ZH])
    labels = np.zeros((grid * grid, len(CELL_HEADS) + 4), dtype=np.int64)
    labels[:, 3:] = -1
    objects = [(t["pixel_box"], t["box"], (names[0].index(t["colour"]), names[1].index(t["shape"]), 0))
               for t in image["things"]]
    if image.get("word"):
        word = image["word"]
        objects.append((word["pixel_box"], word["box"], (0, 0, names[2].index(word["text"]))))
    cell_w, cell_h = image["width"] / grid, image["height"] / grid
    for pixel_box, box, classes in objects:
        x0, y0, x1, y1 = pixel_box
        for r in range(grid):
            for c in range(grid):
                x, y = (c + 0.5) * cell_w, (r + 0.5) * cell_h
                if x0 <= x < x1 and y0 <= y < y1:
                    labels[r * grid + c] = (*classes, *box)
    return labels


def pretrain_vision(visual, pictures: list[tuple[str, dict]], steps: int = VISION_STEPS,
                    batch_size: int = VISION_BATCH, lr: float = VISION_LR, seed: int = 0, log_every: int = 50,
                    state_path: Path | None = None, deadline: float | None = None) -> tuple[list[dict], bool]:
    """Train `visual`'s ViT and output adapter (in place; the resampler stays fixed) on `cell_labels` of
    (image file, meta) pairs; returns (the log, whether all `steps` ran). Past `deadline` (a time.time()) it
    saves its state to `state_path` and stops at the next step; given an existing `state_path` it continues
    from there exactly (tensors and plain data only, loaded with weights_only)."""
    from .images import load_image, preprocess

    size = visual.config.image_size
    grid = int(math.isqrt(visual.attn_pool.query.shape[0]))
    sizes = [n for _, n in CELL_HEADS]
    torch.manual_seed(seed)
    heads = torch.nn.Linear(visual.config.output_dim, sum(sizes) + 4)
    params = [p for name, p in visual.named_parameters() if p.requires_grad and not name.startswith("attn_pool.")]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.dim() < 2] + list(heads.parameters()), "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    order = torch.Generator().manual_seed(seed)
    visual.train()
    log, started, warmup, first = [], time.time(), max(1, steps // 25), 0
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        visual.load_state_dict(state["visual"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        order.set_state(state["order"])
        torch.set_rng_state(state["rng"])
        first, log = state["step"], json.loads(state["log"])
    for step in range(first, steps):
        if deadline is not None and time.time() >= deadline and step > first and state_path is not None:
            tmp = state_path.with_name(state_path.name + ".tmp")
            torch.save({"visual": visual.state_dict(), "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                        "order": order.get_state(), "rng": torch.get_rng_state(), "step": step,
                        "log": json.dumps(log)}, tmp)
            os.replace(tmp, state_path)
            print(f"stage 0 stopped at step {step} of {steps} (time limit); the state is in {state_path}",
                  file=sys.stderr, flush=True)
            visual.eval()
            return log, False
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        chosen = torch.randint(len(pictures), (batch_size,), generator=order).tolist()
        pixels = torch.stack([preprocess(load_image(pictures[i][0]), size) for i in chosen])
        labels = torch.from_numpy(np.stack([cell_labels(pictures[i][1], grid) for i in chosen]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = visual(pixels)
        *logits, box = heads(features.float()).split(sizes + [4], dim=-1)
        losses = [F.cross_entropy(lg.reshape(-1, n), labels[..., k].reshape(-1)) for k, (lg, n) in enumerate(zip(logits, sizes))]
        covered = labels[..., 3] >= 0
        box_error = (box[covered] - labels[..., 3:][covered] / 1000).abs()
        losses.append(BOX_WEIGHT * F.smooth_l1_loss(box[covered], labels[..., 3:][covered] / 1000, beta=0.05))
        loss = sum(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + list(heads.parameters()), 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "loss": round(loss.item(), 4), "seconds": round(time.time() - started)}
            for k, (name, _) in enumerate(CELL_HEADS):  # which one, on the cells an object covers
                y = labels[..., k]
                hit = (logits[k][..., 1:].argmax(-1) + 1 == y) & (y > 0)
                record[name] = round(float(hit.sum() / (y > 0).sum().clamp(min=1)), 3)
            record["box_error"] = round(float(box_error.detach().mean()) * 1000, 1) if covered.any() else None
            log.append(record)
            print("stage 0 " + "  ".join(f"{k} {v}" for k, v in record.items()), file=sys.stderr, flush=True)
    visual.eval()
    return log, True


def write_init(out: Path, records: list[dict], data_dir: Path, tokenizer_dir: Path, seed: int, config: QWenConfig,
               vision_steps: int = VISION_STEPS, deadline: float | None = None) -> bool:
    """The initial checkpoint: fresh weights (init_model) of shape `config`, then stage 0 for the vision tower;
    False when the deadline stopped stage 0 (its state is kept next to `out` for the next call)."""
    from .tokenizer import QWenTokenizer

    tokenizer = QWenTokenizer.from_pretrained(str(tokenizer_dir))
    model = init_model(config, tokens_of(records, tokenizer), seed)  # the same weights every call (seeded)
    pictures = [(str(data_dir / image["file"]), image) for record in records for image in record["meta"]["images"]]
    state_path = out.with_name(out.name + ".stage0.pt")
    log, finished = pretrain_vision(model.transformer.visual, pictures, steps=vision_steps, seed=seed,
                                    state_path=state_path, deadline=deadline)
    if not finished:
        return False
    model.generation_config = demo_generation_config(tokenizer_dir)
    tmp = out.with_name(out.name + ".tmp")
    save_pretrained(model, str(tmp))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, tmp / name)
    (tmp / "stage0_log.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    state_path.unlink(missing_ok=True)
    return True


def demo_generation_config(tokenizer_dir: Path) -> GenerationConfig:
    path = tokenizer_dir / "generation_config.json"
    return GenerationConfig.from_json(str(path)) if path.exists() else GenerationConfig()


SHARD_BYTES = 64 << 20  # shards stay well under the 100 MB per-file limit of common git hosts


def to_bf16(src: Path, dst: Path) -> None:
    """The final checkpoint in bfloat16 (as the official ones), sharded, written aside and renamed into place."""
    from .loading import from_pretrained

    model = from_pretrained(str(src), bf16=True, device_map="cpu")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, str(tmp), max_shard_bytes=SHARD_BYTES)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


# A build is a plan of parts kept in WORK/build.json (init with stage 0, stages 1-3; or continuation rounds),
# each resumable and each done once its checkpoint exists; the seconds spent on each add up over chunks.
MORE_STEPS, MORE_LR = 700, 5e-4  # a continuation round (stage-2 settings): run 5 + 700 such steps raised grounding 0.12 -> 0.20
# Continuation round k trains on fresh pictures (data seed + k) with grounding drawn as often as all the other
# single tasks together (v1 learned every row but grounding). They keep the embedding and lm_head tables as they
# are: those are 2 x 78 MB shards of the shipped checkpoint, and a submission's diffs are capped at 256 MiB
# (removed + added bytes), so a round that changes them could never ship; the 14.5 MB shard of everything else
# carries what the round learns.
MORE_TASKS = TRAIN_TASKS + ("grounding",) * 6
MORE_FROZEN = ("transformer.wte", "lm_head")


def scratch_plan(steps: int, vision_steps: int) -> list[dict]:
    plan, previous = [{"name": "init", "vision_steps": vision_steps}], "init"
    for stage, share, lr, tasks in STAGES:
        plan.append({"name": f"stage{stage}", "stage": stage, "steps": max(1, round(steps * share)), "lr": lr,
                     "data": f"stage{stage}.json" if tasks else "train.json", "from": previous})
        previous = f"stage{stage}/model"
    return plan


def more_part(plan: list[dict], start: str, steps: int) -> dict:
    """One continuation round from checkpoint `start`: fresh optimizer, short warm-up, stage-2 settings."""
    k = 1 + sum(part["name"].startswith("more") for part in plan)
    return {"name": f"more{k}", "stage": 2, "steps": steps, "lr": MORE_LR, "data": f"more{k}.json", "from": start,
            "frozen": list(MORE_FROZEN)}


def write_more_data(data_dir: Path, part: dict, n: int, seed: int, image_size: int) -> None:
    """A continuation round's records (MORE_TASKS, fresh pictures of `seed`) as data_dir / part["data"]."""
    folder = part["data"].removesuffix(".json")
    path = synth.generate(data_dir / folder, n, seed=seed, split="train", image_size=image_size,
                          langs=("en", "zh"), progress=True, tasks=MORE_TASKS)
    records = json.loads(path.read_text(encoding="utf-8"))
    for item in records:  # image paths relative to the data folder, as train.json's
        for turn in item["conversations"]:
            turn["value"] = turn["value"].replace("<img>images/", f"<img>{folder}/images/")
        for image in item["meta"]["images"]:
            image["file"] = f"{folder}/{image['file']}"
    tmp = data_dir / (part["data"] + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, data_dir / part["data"])


def part_model(work: Path, part: dict) -> Path:
    return work / "init" if part["name"] == "init" else work / part["name"] / "model"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def build(out: str, work: str, n_train: int = 16000, steps: int = 1200, batch_size: int = 16, seed: int = 0,
          num_workers: int = 1, vision_steps: int = VISION_STEPS, minutes: float | None = None,
          resume: bool = False, more_steps: int = MORE_STEPS, base: str | None = None,
          config: QWenConfig | None = None) -> dict:
    """Train the demo model into `out` (bf16, official layout) through the work folder `work`.

    Without `resume`: a build from scratch (synthesize data, init with stage 0, stages 1 -> 2 -> 3). With it:
    the work folder's build continues where it stopped; a finished one (or none, as on a new machine) gets a
    continuation round of `more_steps` from its last model (or from `base`, default the shipped model). With
    `minutes`, training stops cleanly at a step boundary once they have passed, its state saved in `work`;
    returns {"finished": bool, "seconds": per part, "total_seconds": cumulative training time, "device"}.
    `config` is the model's shape from scratch (default demo_config(); a resume passes the same one)."""
    from .train.loop import TrainArgs, train

    for name, value in (("--steps", steps), ("--vision-steps", vision_steps), ("--more-steps", more_steps),
                        ("--batch-size", batch_size), ("--n-train", n_train)):
        if value < 1:
            raise OptionsError(f"{name} must be at least 1, got {value}")
    if minutes is not None and not minutes >= 0:
        raise OptionsError(f"--minutes must be 0 or more, got {minutes}")
    out, work = Path(out), Path(work)
    deadline = time.time() + 60 * minutes if minutes is not None else None
    record_path = work / "build.json"
    if record_path.exists() and not resume:
        raise OptionsError(f"{work} holds a demo build already; pass --resume to continue it, or another --work")
    if resume and record_path.exists():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if all(part_model(work, part).joinpath("config.json").exists() for part in record["plan"]):
            last = part_model(work, record["plan"][-1]).relative_to(work)
            record["plan"].append(more_part(record["plan"], str(last), more_steps))
    elif resume:  # nothing here: warm-start from a trained checkpoint
        start = Path(base or DEMO_MODEL)
        if not (start / "config.json").exists():
            raise OptionsError(f"--resume: {work} has no build and {start} no checkpoint to warm-start from")
        earlier = start / "build.json"
        base_build = json.loads(earlier.read_text(encoding="utf-8")) if earlier.exists() else None
        record = {"plan": [], "seconds": {}, "devices": [], "base": base_build,
                  "base_seconds": base_build["total_seconds"] if base_build else 0}
        record["plan"].append(more_part(record["plan"], str(start.resolve()), more_steps))
    else:
        record = {"plan": scratch_plan(steps, vision_steps), "seconds": {}, "devices": [], "base_seconds": 0}
    record.update(n_train=record.get("n_train", n_train), seed=record.get("seed", seed),
                  batch_size=record.get("batch_size", batch_size))
    if device_name() not in record["devices"]:
        record["devices"].append(device_name())
    work.mkdir(parents=True, exist_ok=True)

    def save_record():
        tmp = record_path.with_name("build.json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, record_path)

    save_record()
    config = config or demo_config()
    size = config.visual.image_size
    data_dir = work / "data"
    records = None
    if any(not part.get("data", "train.json").startswith("more") for part in record["plan"]):  # a build from scratch
        if not (data_dir / "train.json").exists():  # deterministic: a new machine regenerates the same records
            synth.generate(data_dir, record["n_train"], seed=record["seed"], split="train", image_size=size,
                           langs=("en", "zh"), progress=True, tasks=TRAIN_TASKS)
        records = json.loads((data_dir / "train.json").read_text(encoding="utf-8"))
        for stage, _, _, tasks in STAGES:
            if tasks and not (data_dir / f"stage{stage}.json").exists():
                chosen = [r for r in records if r["meta"]["task"] in tasks]
                (data_dir / f"stage{stage}.json").write_text(json.dumps(chosen, ensure_ascii=False), encoding="utf-8")
    for part in record["plan"]:
        if part.get("data", "").startswith("more") and not (data_dir / part["data"]).exists() and \
                not part_model(work, part).joinpath("config.json").exists():
            write_more_data(data_dir, part, record["n_train"], record["seed"] + int(part["name"][4:]), size)
    finished = True
    for part in record["plan"]:
        if part_model(work, part).joinpath("config.json").exists():
            continue
        t0 = time.time()
        if part["name"] == "init":
            finished = write_init(work / "init", records, data_dir, DEMO_MODEL, record["seed"], config,
                                  part["vision_steps"], deadline)
        else:
            source = Path(part["from"]) if Path(part["from"]).is_absolute() else work / part["from"]
            args = TrainArgs(model=str(source), data=str(data_dir / part["data"]), output=str(work / part["name"]),
                             stage=part["stage"], image_size=size, max_len=1024, batch_size=record["batch_size"],
                             max_steps=part["steps"], lr=part["lr"], warmup_ratio=0.03, weight_decay=0.01,
                             precision="bf16", log_every=20, seed=record["seed"] + part["stage"],
                             num_workers=num_workers, keep_tied_rows=True, save_every=200,
                             frozen=FROZEN + tuple(part.get("frozen", ())),
                             resume=True, deadline=deadline, save_dtype="fp32")  # bf16 only at the end
            finished = not train(args)["stopped"]
        record["seconds"][part["name"]] = record["seconds"].get(part["name"], 0) + time.time() - t0
        save_record()
        if not finished:
            break
    total = record["base_seconds"] + sum(record["seconds"].values())
    if finished:
        to_bf16(part_model(work, record["plan"][-1]), out)
        (out / "build.json").write_text(json.dumps({
            "parts": record["plan"], "seconds": {k: round(v) for k, v in record["seconds"].items()},
            "total_seconds": round(total), "devices": record["devices"], "n_train": record["n_train"],
            "seed": record["seed"], "batch_size": record["batch_size"],
            **({"base": record["base"]} if record.get("base") else {})}, indent=1) + "\n", encoding="utf-8")
    return {"finished": finished, "seconds": record["seconds"], "total_seconds": total, "devices": record["devices"]}


# ---- quality -----------------------------------------------------------------------------------------

# (row name, meta task, target): the bars the demo model is built to clear on held-out pictures.
QUALITY_ROWS = (("grounding", "grounding", 0.85), ("colour", "colour", 0.90), ("shape", "shape", 0.90),
                ("count", "count", 0.90), ("ocr (single word)", "ocr", 0.80), ("caption names every object", "caption", 0.80),
                ("position", "position", None), ("referring", "referring", None),
                ("grounded caption (all boxes)", "grounded_caption", None), ("two-picture compare", "compare_more", None),
                ("two-picture total", "compare_total", None))


def quality_items(records: list[dict]) -> list[tuple[dict, str, str, dict]]:
    """(record, language, single-turn query, answer meta) for every assistant turn of the held-out records."""
    out = []
    for record in records:
        head = "".join(f"Picture {k}: <img>{im['file']}</img>\n" for k, im in enumerate(record["meta"]["images"], 1))
        questions = [c["value"] for c in record["conversations"] if c["from"] == "user"]
        for j, (question, answer) in enumerate(zip(questions, record["meta"]["answers"])):
            out.append((record, record["meta"]["lang"], question if j == 0 else head + question, answer))
    return out


def judge(record: dict, lang: str, reply: str, answer: dict) -> bool:
    """Whether `reply` is right: boxes by IoU >= 0.5 (0-1000 space), captions by naming every object,
    everything else exactly."""
    from .boxes import parse_boxes
    from .eval.metrics import box_iou

    task = answer["task"]
    if task == "grounding":
        boxes = parse_boxes(reply)
        return bool(boxes) and box_iou(boxes[0]["box"], answer["box"]) >= 0.5
    if task == "caption":
        things = record["meta"]["images"][0]["things"]
        names = [f"{t['colour']} {t['shape']}" if lang == "en" else
                 f"{synth.COLOURS_ZH[t['colour']]}的{synth.SHAPES_ZH[t['shape']]}" for t in things]
        return all(name in reply.lower() for name in names)
    if task == "grounded_caption":
        boxes = parse_boxes(reply)
        want = [t["box"] for t in record["meta"]["images"][0]["things"]]
        return len(boxes) >= len(want) and all(any(box_iou(b["box"], w) >= 0.5 for b in boxes) for w in want)
    return reply.strip() == answer["answer"]


def quality(model_path: str, work: str, n: int = 400, seed: int = 1234, batch_size: int = 8,
            progress: bool = True, replies_path: str | None = None) -> dict:
    """Accuracy per task and language on `n` held-out synthetic records (a seed the build never uses);
    `replies_path` also gets every question, reply, expected answer and verdict (JSONL)."""
    from .eval.runner import chat_replies
    from .loading import from_pretrained
    from .tokenizer import QWenTokenizer

    folder = Path(work) / f"quality-{seed}-{n}"
    path = folder / "test.json"
    if not path.exists():
        synth.generate(folder, n, seed=seed, split="test", image_size=DEMO_CONFIG["visual"]["image_size"],
                       langs=("en", "zh"))
    records = json.loads(path.read_text(encoding="utf-8"))
    for record in records:  # image paths relative to the test file
        for turn in record["conversations"]:
            turn["value"] = turn["value"].replace("<img>images/", f"<img>{folder}/images/")
        for image in record["meta"]["images"]:
            image["file"] = f"{folder}/{image['file']}"
    model = from_pretrained(model_path, device_map="cpu")
    tokenizer = QWenTokenizer.from_pretrained(model_path)
    items = quality_items(records)
    counts: dict = {}
    seen = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        # special tokens kept: the replies as `qwenvl chat` shows them, <ref>/<box> tags and all
        replies = chat_replies(model, tokenizer, [q for _, _, q, _ in chunk], max_new_tokens=160,
                               skip_special_tokens=False)
        for (record, lang, query, answer), reply in zip(chunk, replies):
            key = (answer["task"], lang)
            right, total = counts.get(key, (0, 0))
            verdict = judge(record, lang, reply, answer)
            counts[key] = (right + verdict, total + 1)
            seen.append({"id": record["id"], "task": answer["task"], "lang": lang, "query": query, "reply": reply,
                         "expected": answer["answer"], "right": verdict})
        if progress:
            print(f"\r{min(start + batch_size, len(items))}/{len(items)} questions", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if replies_path:
        tmp = f"{replies_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in seen)
        os.replace(tmp, replies_path)
    return {f"{t}/{lang}": {"right": r, "total": n_} for (t, lang), (r, n_) in sorted(counts.items())}


def quality_table(results: dict) -> str:
    rows = [("task", "English", "Chinese", "all", "target")]
    for name, task, target in QUALITY_ROWS:
        cells = []
        for lang in ("en", "zh", None):
            keys = [k for k in results if k.split("/")[0] == task and (lang is None or k.endswith("/" + lang))]
            right = sum(results[k]["right"] for k in keys)
            total = sum(results[k]["total"] for k in keys)
            cells.append(f"{right / total:.3f} ({total})" if total else "-")
        rows.append((name, *cells, f">= {target:.2f}" if target else ""))
    from .eval.runner import format_table

    return format_table(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo_command", required=True)
    b = sub.add_parser("build", help="train the demo model from scratch (stage 1 -> 2 -> 3)")
    b.add_argument("--out", required=True, help="folder for the finished checkpoint")
    b.add_argument("--work", help="folder for data, stage checkpoints and resumable state (default: OUT.work)")
    b.add_argument("--n-train", type=int, default=16000, help="synthetic training records")
    b.add_argument("--vision-steps", type=int, default=VISION_STEPS, help="stage 0 steps (the vision tower alone)")
    b.add_argument("--steps", type=int, default=1200, help="optimizer steps over the three stages")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--num-workers", type=int, default=1)
    b.add_argument("--minutes", type=float, help="stop cleanly after this many minutes (state kept in --work)")
    b.add_argument("--resume", action="store_true",
                   help="continue the --work build where it stopped; a finished one, or none (a new machine), gets "
                        "--more-steps more from its last model (or from --base)")
    b.add_argument("--more-steps", type=int, default=MORE_STEPS, help="steps of a continuation round")
    b.add_argument("--base", help="checkpoint a --resume without a work folder starts from (default: the bundled one)")
    q = sub.add_parser("quality", help="the quality table on held-out synthetic pictures")
    q.add_argument("-m", "--model", default=str(DEMO_MODEL), help="checkpoint (default: the bundled demo model)")
    q.add_argument("--work", default="demo_quality", help="folder for the held-out pictures (default demo_quality)")
    q.add_argument("--n", type=int, default=400, help="held-out records (default 400)")
    q.add_argument("--seed", type=int, default=1234, help="held-out seed (the build trains on seed 0)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--json", help="also write the counts to this JSON file")
    q.add_argument("--replies", help="also write every question, reply, expected answer and verdict (JSONL)")


def run(args) -> int:
    if args.demo_command == "build":
        work = args.work or args.out.rstrip("/") + ".work"
        result = build(args.out, work, args.n_train, args.steps, args.batch_size, args.seed, args.num_workers,
                       args.vision_steps, args.minutes, args.resume, args.more_steps, args.base)
        print(json.dumps({"out": args.out if result["finished"] else None, "finished": result["finished"],
                          "seconds": {k: round(v) for k, v in result["seconds"].items()},
                          "total_seconds": round(result["total_seconds"]), "devices": result["devices"]}))
        if not result["finished"]:
            print(f"stopped at the time limit; `qwenvl demo build --out {args.out} --work {work} --resume` continues",
                  file=sys.stderr)
        return 0
    if args.demo_command == "quality":
        results = quality(args.model, args.work, args.n, args.seed, args.batch_size, replies_path=args.replies)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(quality_table(results))
        return 0
    raise ValueError(args.demo_command)
