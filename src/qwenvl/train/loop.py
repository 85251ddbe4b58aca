"""The fine-tuning loop: AdamW, cosine schedule with warmup, accumulation, clipping, mixed precision,
periodic evaluation, exact resume, and FSDP under torchrun (SPEC section 9).

One global step takes `global_batch = batch_size * grad_accum * world_size` samples in a seeded order;
the loss is normalized by the supervised tokens of the whole global batch, so a run gives the same
losses however that batch is split over processes and micro-batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from .. import loading
from ..errors import CheckpointError, OptionsError
from ..tokenizer import QWenTokenizer
from ..model.qwen_vl import SharedRows
from . import adapters, data

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class TrainArgs:
    model: str
    data: str
    output: str
    eval_data: str | None = None
    train: tuple[str, ...] = ("resampler", "llm")  # the original's full fine-tuning: ViT frozen
    stage: int | None = None  # 1, 2 or 3: the paper's presets (groups and image size)
    lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_extra: tuple[str, ...] = ()
    lora_embeddings: bool | None = None  # with LoRA, train wte and lm_head fully; None: yes on a base checkpoint
    image_size: int | None = None
    max_len: int = 2048
    pack: bool = False
    batch_size: int = 1
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    seed: int = 42
    num_workers: int = 2
    resume: bool = False
    device: str = "auto"
    sharding: str = "full"  # under torchrun: "full" (ZeRO-3-like) or "grad-op" (ZeRO-2-like: parameters kept)
    save_dtype: str = "auto"  # the saved full model: "auto" = the dtype its config.json declares
    keep_tied_rows: bool = False  # rows of wte / lm_head shared by all ids the data never has stay shared
    frozen: tuple[str, ...] = ()  # parameters (official names or their prefixes) kept frozen in any group
    deadline: float | None = None  # a time.time(): past it, save the state at the next step boundary and stop
    history: list = field(default_factory=list)  # per-step records, filled by train()


def cosine_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0 at `total` (transformers' cosine schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Distributed:
    """Rank facts; a single process is world 1."""

    def __init__(self, device_pref: str):
        self.enabled = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and device_pref != "cpu" else "gloo"
            dist.init_process_group(backend)
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device_pref == "auto":
            device_pref = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local}" if device_pref == "cuda" and self.enabled else device_pref)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def supervised_tokens(batch: dict) -> int:
    targets = batch["labels"][:, 1:] != -100
    if "segment_ids" in batch:
        targets &= batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
    return int(targets.sum())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_loss(model, batch: dict, precision: str, device: torch.device,
                 shared: SharedRows | None = None) -> torch.Tensor:
    dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    images=batch["pixel_values"] if batch["pixel_values"].shape[0] else None,
                    position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids"),
                    reduction="sum", shared_rows=shared)
    return out.loss


def shard_model(model, dist_: Distributed, sharding: str = "full") -> None:
    """FSDP2: every decoder and ViT block its own unit, then the root; gradients and optimizer state sharded,
    and parameters too ("full", like ZeRO-3) or gathered from forward to backward ("grad-op", like ZeRO-2)."""
    from torch.distributed.fsdp import fully_shard

    if sharding not in SHARDINGS:
        raise OptionsError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    for block in list(model.transformer.h) + list(model.transformer.visual.transformer.resblocks):
        fully_shard(block, reshard_after_forward=sharding == "full")
    fully_shard(model)
    model.sync_vision = True


# ---- the resumable state -----------------------------------------------------------------------------
# train_state/ holds the model and optimizer (torch.distributed.checkpoint), trainer.pt (step, history, loss
# scaler) and rng-<rank>.pt (random generators), all tensors and plain data: they are read back with
# torch.load(weights_only=True), and DCP's pickled .metadata is checked first to hold nothing but DCP's own
# records, so a planted state file is refused before anything in it runs.


class TrainStateError(CheckpointError):
    """A train_state folder that cannot be resumed from; the message names the file."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the run; the message says which step the saved state holds."""


def rng_state() -> dict:
    """The random generators' states as tensors and plain numbers (nothing that needs unpickling code)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python_version": version, "python": torch.tensor(internal),
             "python_gauss": gauss, "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_position": int(position),
             "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if isinstance(state["python"], tuple):  # a state saved before the generators were stored as tensors
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
    else:
        random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_position"],
                             state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# numpy arrays, as random generator states held them before they were stored as tensors; rebuilding an array
# runs no code of the file's choosing (torch.load's own allowlist mechanism)
_NUMPY_ARRAYS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_plain(path: str, numpy_arrays: bool = False) -> dict:
    """torch.load with weights_only=True: tensors and plain data only (and numpy arrays if asked); anything
    else is refused unrun."""
    if not os.path.isfile(path):
        raise TrainStateError(f"{path} is missing: the saved state is incomplete; delete {os.path.dirname(path)} "
                              "to start over")
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAYS if numpy_arrays else []):
            value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainStateError(f"{path} holds objects other than tensors and plain data, refused without running them "
                              f"({reason[:200]}); it was not written by qwenvl finetune: delete "
                              f"{os.path.dirname(path)} to start over") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise TrainStateError(f"{path} cannot be read ({e}); delete {os.path.dirname(path)} to start over") from None
    if not isinstance(value, dict):
        raise TrainStateError(f"{path} does not hold a training state")
    return value


# What DCP's .metadata pickle may construct: its own record classes, tensor shapes, dtypes and paths.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
_PLAIN_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                  ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                  ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PLAIN_GLOBALS or module.startswith("pathlib."):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module in _DCP_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):  # records (dataclasses, enums), never a function
                return found
        raise pickle.UnpicklingError(f"it asks for {module}.{name}")


def check_dcp_metadata(path: str) -> None:
    metadata = os.path.join(path, ".metadata")
    if not os.path.isfile(metadata):
        raise TrainStateError(f"{metadata} is missing: the saved state is incomplete; delete {path} to start over")
    try:
        with open(metadata, "rb") as f:
            _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, TypeError, ValueError) as e:
        raise TrainStateError(f"{metadata} is not a torch.distributed.checkpoint index ({e}); refused without "
                              f"running it: delete {path} to start over") from None


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C inside the block waits for its end (then raises KeyboardInterrupt): a few renames finish whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def settle_state_dir(path: str) -> None:
    """Finish or undo what an interrupted save left: a swap cut between its two renames leaves the previous
    state under .old (restored); a write cut short leaves .tmp (removed)."""
    if not os.path.exists(path) and os.path.isdir(path + ".old"):
        os.replace(path + ".old", path)
    for leftover in (path + ".tmp", path + ".old"):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)


def save_state(path: str, model, optimizer, scaler, step: int, epoch: int, step_in_epoch: int, dist_: Distributed,
               args: TrainArgs) -> None:
    """Everything an exact resume needs; model and optimizer through torch.distributed.checkpoint (sharded).
    Written to `path`.tmp, then swapped in whole: an interruption at any point leaves the previous state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path + ".tmp"
    if dist_.main:
        settle_state_dir(path)
    dist_.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng-{dist_.rank}.pt"))
    if dist_.main:
        trainer = {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "world": dist_.world,
                   "scaler": scaler.state_dict() if scaler is not None else None,
                   "history": json.loads(json.dumps(args.history))}  # plain data, nothing to unpickle
        torch.save(trainer, os.path.join(tmp, "trainer.pt"))
    dist_.barrier()
    if dist_.main:
        with interrupts_deferred():  # never left between the renames, whatever the moment of a Ctrl-C
            if os.path.exists(path):
                os.replace(path, path + ".old")
            os.replace(tmp, path)
            shutil.rmtree(path + ".old", ignore_errors=True)
    dist_.barrier()


def load_state(path: str, model, optimizer, scaler, dist_: Distributed) -> dict:
    """Resume from `path`; every file is checked before anything is applied."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer = read_plain(os.path.join(path, "trainer.pt"))
    rng = read_plain(os.path.join(path, f"rng-{dist_.rank}.pt"), numpy_arrays=True)
    check_dcp_metadata(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_rng_state(rng)
    if scaler is not None and trainer["scaler"]:
        scaler.load_state_dict(trainer["scaler"])
    return trainer


class Progress:
    """One line per logged step on stderr: step, loss, lr, tokens/s, elapsed and remaining time."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start = total, enabled, time.time()

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(1, step) * (self.total - step)
        extra = f"  eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
        print(f"step {step}/{self.total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
              f"{record['tokens_per_s']:.0f} tok/s  {elapsed:.0f}s elapsed, ~{eta:.0f}s left{extra}",
              file=sys.stderr, flush=True)


def evaluate(model, dataset, args: TrainArgs, dist_: Distributed, pad_id: int) -> float:
    """Mean loss per supervised token over the whole evaluation set (split across ranks)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    indices = list(range(dist_.rank, len(dataset), dist_.world))
    rounds = math.ceil(len(dataset) / dist_.world)
    indices += [None] * (rounds - len(indices))  # every rank runs as many forwards as the others (FSDP)
    with torch.no_grad():
        for i in range(0, len(indices), args.batch_size):
            chunk = indices[i:i + args.batch_size]
            batch = data.collate([dataset[j if j is not None else 0] for j in chunk], pad_id=pad_id)
            loss = float(forward_loss(model, to_device(batch, dist_.device), args.precision, dist_.device))
            if None not in chunk:  # a filler batch only keeps the ranks in step
                tokens += supervised_tokens(batch)
                total += loss
    model.train(was_training)
    return dist_.sum(total) / max(1.0, dist_.sum(tokens))


def build_datasets(args: TrainArgs, tokenizer, image_size: int):
    """The training set (packed if asked) and the optional evaluation set; every record is checked first."""
    dataset = data.ConversationDataset(data.load_records(args.data), tokenizer, image_size=image_size,
                                       max_len=args.max_len)
    eval_set = None
    if args.eval_data:
        eval_set = data.ConversationDataset(data.load_records(args.eval_data), tokenizer, image_size=image_size,
                                            max_len=args.max_len)
    return (data.PackedDataset(dataset, args.max_len) if args.pack else dataset), eval_set


def build_optimizer(model, args: TrainArgs):
    """AdamW over the trainable parameters; norms, biases and other vectors get no weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise OptionsError("nothing to train: the freeze plan leaves every parameter frozen")
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel: one pass over each tensor (measured on CPU: 0.17 s a step for the 39M parameters of the
    # golden shape's wte + lm_head, against 0.81 s for the default loop)
    fused = trainable[0].device.type in ("cpu", "cuda")
    return trainable, torch.optim.AdamW(groups, lr=args.lr, betas=args.betas, fused=fused)


def freeze_named(model, names) -> None:
    """Freeze every parameter whose official name is one of `names` or starts with one followed by '.'."""
    found = set()
    for name, p in model.named_parameters():
        for wanted in names:
            if name == wanted or name.startswith(wanted + "."):
                p.requires_grad_(False)
                found.add(wanted)
    missing = [n for n in names if n not in found]
    if missing:
        raise OptionsError(f"frozen names match no parameter: {', '.join(missing)}")


def keep_rows_tied(model, optimizer, dataset, dist_: Distributed) -> SharedRows | None:
    """Rows shared at the start stay exactly shared: embedding rows of ids the training data never feeds, and
    lm_head rows of ids it never asks for (never a label), that equal the row of the first never-fed id. After
    every optimizer step that row is copied over them. Their gradients are equal in exact arithmetic anyway
    (no lookups; equal logits); the copy removes the rounding drift between kernels' vector and tail paths, so
    the rows stay bit-identical and compress to nothing.

    Returns the lm_head rows so shared, for the loss to skip (SharedRows), or None when there are none."""
    if dist_.enabled:
        raise OptionsError("keep_tied_rows works in one process only")
    base = getattr(dataset, "dataset", dataset)
    never_fed = torch.ones(model.config.vocab_size, dtype=torch.bool)
    never_asked = torch.ones(model.config.vocab_size, dtype=torch.bool)
    for sample in base.samples:
        never_fed[torch.from_numpy(sample.input_ids.astype(np.int64))] = False
        never_asked[torch.from_numpy(sample.labels[sample.labels >= 0].astype(np.int64))] = False
    if not never_fed.any():
        return None
    source = int(never_fed.nonzero()[0, 0])
    tied, shared = [], None
    for table, free in ((model.transformer.wte.weight, never_fed), (model.lm_head.weight, never_asked)):
        ids = free.nonzero().flatten()
        ids = ids[(table.detach()[ids] == table.detach()[source]).all(dim=1)]
        ids = torch.cat([torch.tensor([source]), ids[ids != source]])
        if len(ids) < 2:
            continue
        if table.requires_grad:
            tied.append((table, source, ids[1:]))
        if table is model.lm_head.weight:
            shared = SharedRows.from_shared(ids, model.config.vocab_size)

    def copy_rows(*_):
        with torch.no_grad():
            for table, source_id, targets in tied:
                table[targets] = table[source_id].clone()

    optimizer.register_step_post_hook(copy_rows)
    return shared


def clip_gradients(trainable, max_norm: float, model, shared: SharedRows | None) -> torch.Tensor:
    """clip_grad_norm_, counting the shared lm_head row once for every id that shares it (as the full
    vocabulary's gradient would)."""
    grads = [p.grad for p in trainable if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    weight = model.lm_head.weight
    if shared is not None and weight.grad is not None:
        dtype = torch.promote_types(norm.dtype, torch.float32)
        row = weight.grad[shared.rows[-1]].to(dtype)
        norm = (norm.to(dtype) ** 2 + (shared.count - 1) * row.pow(2).sum()).sqrt()
    torch.nn.utils.clip_grads_with_norm_(trainable, max_norm, norm)
    return norm


def train(args: TrainArgs) -> dict:
    """Run a fine-tuning job; returns {"history": [...], "output": path, "model": the trained model (one process)}.
    Ctrl-C ends it with TrainingInterrupted, whose message says which step OUTPUT/train_state holds (a save it
    cut short leaves the previous state whole)."""
    try:
        return _train(args)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        state_dir = os.path.join(args.output, "train_state")
        saved = None
        if int(os.environ.get("RANK", "0")) == 0:
            settle_state_dir(state_dir)
            if os.path.isfile(os.path.join(state_dir, "trainer.pt")):
                saved = read_plain(os.path.join(state_dir, "trainer.pt"))["step"]
        message = (f"interrupted; {state_dir} holds step {saved}: run again with --resume to continue from there"
                   if saved is not None else "interrupted before any state was saved (--save-every N saves one "
                   "every N steps)")
        raise TrainingInterrupted(message) from None


def is_base_checkpoint(path: str, generation_config) -> bool:
    """The original's test (finetune.py): a checkpoint whose folder name lacks "chat" is a base model, which
    never saw the ChatML tokens; so is one whose generation_config.json says chat_format "raw"."""
    name = os.path.basename(os.path.normpath(os.path.abspath(path))).lower()
    return generation_config.chat_format == "raw" or "chat" not in name


EMBEDDINGS = ("transformer.wte.weight", "lm_head.weight")


def _train(args: TrainArgs) -> dict:
    dist_ = Distributed(args.device)
    if args.stage is not None:
        preset = adapters.stage_settings(args.stage)
        args.train, args.image_size = tuple(sorted(preset["train"])), args.image_size or preset["image_size"]
    if args.precision not in PRECISIONS:
        raise OptionsError(f"precision must be one of {', '.join(PRECISIONS)}, got {args.precision!r}")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    tokenizer = QWenTokenizer.from_pretrained(args.model)
    model = loading.from_pretrained(args.model, fp32=True, device_map=str(dist_.device))
    if args.image_size:
        model.config.visual.image_size = args.image_size
    image_size = model.config.visual.image_size
    dataset, eval_set = build_datasets(args, tokenizer, image_size)

    model.train()
    if args.lora:  # adapters on the LLM; groups in args.train are trained in full beside them
        adapters.add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          extra=args.lora_extra)
        if args.lora_embeddings is None:
            args.lora_embeddings = is_base_checkpoint(args.model, model.generation_config) and \
                not model.config.quantization_config  # the original's Q-LoRA never trains them
            if args.lora_embeddings and dist_.main:
                print("LoRA on a base checkpoint: wte and lm_head train in full too (the original's modules_to_save; "
                      "--no-lora-embeddings turns that off)", file=sys.stderr)
    adapters.apply_freeze_plan(model, set(args.train))
    if args.lora and args.lora_embeddings:
        for name, p in model.named_parameters():
            if name in EMBEDDINGS:
                p.requires_grad_(True)
    freeze_named(model, args.frozen)
    if args.gradient_checkpointing:
        model.transformer.gradient_checkpointing = True
        model.transformer.visual.transformer.gradient_checkpointing = True
    if dist_.enabled:
        shard_model(model, dist_, args.sharding)

    trainable, optimizer = build_optimizer(model, args)
    shared = keep_rows_tied(model, optimizer, dataset, dist_) if args.keep_tied_rows else None
    scaler = torch.amp.GradScaler(dist_.device.type) if args.precision == "fp16" else None

    global_batch = args.batch_size * args.grad_accum * dist_.world
    if len(dataset) < global_batch:
        if dist_.enabled:
            raise OptionsError(f"{len(dataset)} training samples are fewer than one global batch ({global_batch} = "
                             f"--batch-size x --grad-accum x {dist_.world} processes); lower --grad-accum")
        # the HF Trainer's way: the epoch has fewer micro-batches than --grad-accum, so its one step takes them all
        accumulated = math.ceil(len(dataset) / args.batch_size)
        print(f"{len(dataset)} samples are fewer than one global batch ({global_batch}): each step accumulates the "
              f"epoch's {accumulated} micro-batch(es), as the HF Trainer does", file=sys.stderr)
        args.grad_accum, global_batch = accumulated, len(dataset)
    steps_per_epoch = len(dataset) // global_batch
    total = args.max_steps or max(1, int(steps_per_epoch * args.epochs))
    warmup = max(1, int(total * args.warmup_ratio)) if args.warmup_ratio > 0 else 0
    state_dir = os.path.join(args.output, "train_state")
    step, epoch, step_in_epoch = 0, 0, 0
    if args.resume:
        if dist_.main:
            settle_state_dir(state_dir)
        dist_.barrier()
        if os.path.exists(os.path.join(state_dir, "trainer.pt")):
            trainer = load_state(state_dir, model, optimizer, scaler, dist_)
            step, epoch, step_in_epoch, args.history = (trainer["step"], trainer["epoch"], trainer["step_in_epoch"],
                                                        trainer["history"])
        elif dist_.main:
            print(f"--resume: nothing saved to resume from ({state_dir} "
                  f"{'holds no trainer.pt' if os.path.isdir(state_dir) else 'does not exist'}); starting at step 1",
                  file=sys.stderr)
    if dist_.main:
        os.makedirs(args.output, exist_ok=True)
        print(f"training {len(dataset)} samples ({dataset_counts(dataset)}), {total} steps of {global_batch}, "
              f"groups {sorted(args.train)}{' + LoRA' if args.lora else ''}, {dist_.world} process(es), "
              f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters", file=sys.stderr)

    progress = Progress(total, dist_.main)
    sampler = data.MicroBatchSampler(len(dataset), args.batch_size, args.grad_accum, args.seed, total - step,
                                     dist_.rank, dist_.world, epoch, step_in_epoch)
    batches = iter(data.make_dataloader(dataset, sampler, args.num_workers))
    while step < total:
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        started = time.time()
        micro = [next(batches) for _ in range(args.grad_accum)]
        tokens = dist_.sum(sum(supervised_tokens(b) for b in micro))
        lr = cosine_lr(step, total, warmup, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for batch in micro:
            loss = forward_loss(model, to_device(batch, dist_.device), args.precision, dist_.device, shared)
            loss_sum += float(loss.detach())
            scaled = loss * (dist_.world / max(1.0, tokens))  # FSDP averages gradients over ranks
            (scaler.scale(scaled) if scaler else scaled).backward()
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = clip_gradients(trainable, args.max_grad_norm, model, shared) if args.max_grad_norm else None
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, step_in_epoch = step + 1, step_in_epoch + 1
        seconds = time.time() - started
        record = {"step": step, "loss": dist_.sum(loss_sum) / max(1.0, tokens), "lr": lr, "tokens": tokens,
                  "tokens_per_s": dist_.sum(sum(int(b["attention_mask"].sum()) for b in micro)) / max(seconds, 1e-9),
                  "grad_norm": float(grad_norm) if grad_norm is not None else None}
        if eval_set is not None and args.eval_every and (step % args.eval_every == 0 or step == total):
            record["eval_loss"] = evaluate(model, eval_set, args, dist_, tokenizer.pad_token_id)
        args.history.append(record)
        if step % max(1, args.log_every) == 0 or step == total:
            progress.log(step, record)
        if args.save_every and (step % args.save_every == 0 or step == total):  # the final step too, as HF
            save_state(state_dir, model, optimizer, scaler, step, epoch, step_in_epoch, dist_, args)
        if args.deadline is not None and step < total and dist_.sum(float(time.time() >= args.deadline)) > 0:
            save_state(state_dir, model, optimizer, scaler, step, epoch, step_in_epoch, dist_, args)
            if dist_.main:
                print(f"stopped at step {step} of {total} (time limit); the state is in {state_dir}", file=sys.stderr)
            return {"history": args.history, "output": args.output, "model": None, "stopped": True}

    save_outputs(model, args, dist_)
    if dist_.main:
        with open(os.path.join(args.output, "history.json"), "w", encoding="utf-8") as f:
            json.dump(args.history, f, indent=1)
    return {"history": args.history, "output": args.output, "model": None if dist_.enabled else model, "stopped": False}


SHARDINGS = ("full", "grad-op")
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def saved_dtype(config, choice: str = "auto") -> torch.dtype:
    """The dtype a full fine-tune stores: `choice`, or with "auto" the one config.json declares (float32 if none)."""
    if choice != "auto":
        if choice not in SAVE_DTYPES:
            raise OptionsError(f"save_dtype must be auto or one of {', '.join(SAVE_DTYPES)}, got {choice!r}")
        return SAVE_DTYPES[choice]
    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32


def dataset_counts(dataset) -> str:
    base = getattr(dataset, "dataset", dataset)
    return f"{getattr(base, 'num_truncated', 0)} truncated, {getattr(base, 'num_skipped', 0)} skipped"


def save_outputs(model, args: TrainArgs, dist_: Distributed) -> None:
    """A full official-layout checkpoint (rank 0 writes the gathered weights), or the LoRA adapter alone."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist_.main:
        dist_.barrier()
        return
    final = os.path.join(args.output, "adapter" if args.lora else "model")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if args.lora:
        adapters.save_adapter(model, tmp, state_dict=state)
    else:  # trained in float32; stored as config.json declares (bf16 for the published checkpoints)
        dtype = saved_dtype(model.config, args.save_dtype)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        loading.save_state_dict(state, model.config, model.generation_config, tmp)
        QWenTokenizer.from_pretrained(args.model).save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(args.output, "train_args.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in dataclasses.asdict(args).items() if k != "history"}, f, indent=2)
    dist_.barrier()
