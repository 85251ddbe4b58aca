"""The bundled demo model: a small Qwen-VL (the real architecture and vocabulary, 224-pixel pictures) trained
from scratch on `qwenvl data synth` pictures with the paper's three stages, shipped in the package so that
`qwenvl chat` and `qwenvl generate` work offline with no `-m`.

    qwenvl demo build --out DIR      # synthesize data, initialize, stage 1 -> 2 -> 3, write DIR (official layout)
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

import torch

from .config import GenerationConfig, QWenConfig, VisualConfig
from .loading import TOKENIZER_FILES, save_pretrained

DEMO_MODEL = Path(__file__).parent / "demo_model"
EXAMPLES = Path(__file__).parent / "examples"

DEMO_CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, kv_channels=64,
                   intermediate_size=1536, seq_length=2048, bf16=True,
                   visual=dict(image_size=224, patch_size=14, width=256, layers=4, heads=4, mlp_ratio=4.0,
                               output_dim=256))

# (stage, share of the optimizer steps, peak learning rate, tasks of its data): the paper's recipe in small.
# Stage 1 trains ViT + resampler on captions with the LLM frozen; stage 2 trains everything on the
# multi-task mixture; stage 3 is supervised fine-tuning on the same mixture with the ViT frozen.
STAGES = ((1, 0.10, 1e-3, ("caption",)), (2, 0.75, 1e-3, None), (3, 0.15, 2e-4, None))


# Training records: the seven tasks, plus as many again of multi-turn conversations about one picture (several
# supervised answers for one picture's cost).
TRAIN_TASKS = ("caption", "vqa", "grounding", "referring", "grounded_caption", "ocr", "compare") + \
    ("multi",) * 7


def demo_config() -> QWenConfig:
    spec = dict(DEMO_CONFIG)
    visual = VisualConfig(**spec.pop("visual"))
    return QWenConfig(**spec, visual=visual, extra={"model_type": "qwen", "architectures": ["QWenLMHeadModel"],
                                                    "torch_dtype": "bfloat16"})


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
            if name.endswith("pos_embed"):
                p.copy_(sincos_2d(p.shape[1], int(math.isqrt(p.shape[0]))))
            elif "ln" in name.split(".")[-2] or name.split(".")[-2].startswith("ln_"):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("c_proj.weight", "w2.weight")) and not name.startswith("transformer.visual"):
                p.normal_(0.0, std / math.sqrt(2 * config.num_hidden_layers))
            else:
                p.normal_(0.0, std)
    unseen = torch.ones(config.vocab_size, dtype=torch.bool)
    unseen[torch.tensor(sorted(seen_ids), dtype=torch.long)] = False
    with torch.no_grad():
        for table in (model.transformer.wte.weight, model.lm_head.weight):
            table[unseen] = table[unseen.nonzero()[0, 0]].clone()
    return model


def tokens_of(records: list[dict], tokenizer) -> set[int]:
    """Every id the training pipeline feeds the model for these records."""
    from .train.data import DEFAULT_SYSTEM, encode_record

    ids = set()
    for record in records:
        ids.update(encode_record(tokenizer, record, DEFAULT_SYSTEM)[0])
    return ids


def write_init(out: Path, records: list[dict], tokenizer_dir: Path, seed: int) -> None:
    from .tokenizer import QWenTokenizer

    tokenizer = QWenTokenizer.from_pretrained(str(tokenizer_dir))
    config = demo_config()
    model = init_model(config, tokens_of(records, tokenizer), seed)
    model.generation_config = demo_generation_config(tokenizer_dir)
    save_pretrained(model, str(out))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)


def demo_generation_config(tokenizer_dir: Path) -> GenerationConfig:
    path = tokenizer_dir / "generation_config.json"
    return GenerationConfig.from_json(str(path)) if path.exists() else GenerationConfig()


def to_bf16(src: Path, dst: Path) -> None:
    """The final checkpoint in bfloat16 (as the official ones), written aside and renamed into place."""
    from .loading import from_pretrained

    model = from_pretrained(str(src), bf16=True, device_map="cpu")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, str(tmp))
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def build(out: str, work: str, n_train: int = 24000, steps: int = 3000, batch_size: int = 16, seed: int = 0,
          num_workers: int = 1) -> dict:
    """Synthesize data, initialize, train stage 1 -> 2 -> 3, write the bf16 checkpoint to `out`."""
    from .data import synth
    from .train.loop import TrainArgs, train

    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    size = DEMO_CONFIG["visual"]["image_size"]
    data_dir = work / "data"
    if not (data_dir / "train.json").exists():
        synth.generate(data_dir, n_train, seed=seed, split="train", image_size=size, langs=("en", "zh"),
                       progress=True, tasks=TRAIN_TASKS)
    records = json.loads((data_dir / "train.json").read_text(encoding="utf-8"))
    for stage, _, _, tasks in STAGES:
        if tasks:
            chosen = [r for r in records if r["meta"]["task"] in tasks]
            (data_dir / f"stage{stage}.json").write_text(json.dumps(chosen, ensure_ascii=False), encoding="utf-8")
    previous = work / "init"
    if not (previous / "config.json").exists():
        write_init(previous, records, DEMO_MODEL, seed)
    timings = {}
    for stage, share, lr, tasks in STAGES:
        stage_out = work / f"stage{stage}"
        if not (stage_out / "model" / "config.json").exists():
            t0 = time.time()
            args = TrainArgs(model=str(previous), data=str(data_dir / (f"stage{stage}.json" if tasks else "train.json")),
                             output=str(stage_out), stage=stage, image_size=size, max_len=1024,
                             batch_size=batch_size, max_steps=max(1, round(steps * share)), lr=lr,
                             warmup_ratio=0.03, weight_decay=0.01, precision="bf16", log_every=20, seed=seed + stage,
                             num_workers=num_workers, keep_tied_rows=True, save_every=200)
            args.resume = True
            train(args)
            timings[f"stage{stage}"] = time.time() - t0
        previous = stage_out / "model"
    to_bf16(previous, out)
    timings["total"] = time.time() - started
    return timings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo_command", required=True)
    b = sub.add_parser("build", help="train the demo model from scratch (stage 1 -> 2 -> 3)")
    b.add_argument("--out", required=True, help="folder for the finished checkpoint")
    b.add_argument("--work", help="folder for data, stage checkpoints and resumable state (default: OUT.work)")
    b.add_argument("--n-train", type=int, default=24000, help="synthetic training records")
    b.add_argument("--steps", type=int, default=3000, help="optimizer steps over the three stages")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--num-workers", type=int, default=1)


def run(args) -> int:
    if args.demo_command == "build":
        timings = build(args.out, args.work or args.out.rstrip("/") + ".work", args.n_train, args.steps,
                        args.batch_size, args.seed, args.num_workers)
        print(json.dumps({"out": args.out, "seconds": {k: round(v) for k, v in timings.items()}}))
        return 0
    raise ValueError(args.demo_command)
