"""The original's launch form on `qwenvl finetune`: the flags of its `finetune.py` as `finetune/*.sh` pass them
(HF TrainingArguments spelling, `--bf16 True`), each mapped to the native option.

    torchrun --nproc_per_node 2 -m qwenvl.cli finetune --model_name_or_path Qwen/Qwen-VL-Chat \\
        --data_path data.json --bf16 True --fix_vit True --output_dir output_qwen --num_train_epochs 5 \\
        --per_device_train_batch_size 1 --gradient_accumulation_steps 8 --learning_rate 1e-5 \\
        --lr_scheduler_type cosine --model_max_length 2048 --use_lora --deepspeed finetune/ds_config_zero2.json

Plain renames (`--learning_rate` is `--lr`) pass silently; a flag whose meaning changes on the way (`--fix_vit`,
`--deepspeed`, `--save_total_limit`, ...) prints one line saying what it became; a flag or value with no
meaning here is refused by name with the nearest option. README's fine-tuning section has the table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import OptionsError

# original flag -> (native dest, type, the native option as a user writes it)
RENAMED = {
    "model_name_or_path": ("model", str, "-m/--model"),
    "data_path": ("data", str, "--data"),
    "eval_data_path": ("eval_data", str, "--eval-data"),
    "output_dir": ("output", str, "--output"),
    "num_train_epochs": ("epochs", float, "--epochs"),
    "per_device_train_batch_size": ("batch_size", int, "--batch-size"),
    "gradient_accumulation_steps": ("grad_accum", int, "--grad-accum"),
    "learning_rate": ("lr", float, "--lr"),
    "weight_decay": ("weight_decay", float, "--weight-decay"),
    "adam_beta1": ("adam_beta1", float, "--adam-beta1"),
    "adam_beta2": ("adam_beta2", float, "--adam-beta2"),
    "warmup_ratio": ("warmup_ratio", float, "--warmup-ratio"),
    "max_grad_norm": ("max_grad_norm", float, "--max-grad-norm"),
    "model_max_length": ("max_len", int, "--max-len"),
    "logging_steps": ("log_every", int, "--log-every"),
    "save_steps": ("save_every", int, "--save-every"),
    "eval_steps": ("eval_every", int, "--eval-every"),
    "lora_r": ("lora_r", int, "--lora-r"),
    "lora_alpha": ("lora_alpha", int, "--lora-alpha"),
    "lora_dropout": ("lora_dropout", float, "--lora-dropout"),
    "dataloader_num_workers": ("num_workers", int, "--num-workers"),
}
SWITCHES = ("use_lora", "q_lora", "fix_vit", "bf16", "fp16", "gradient_checkpointing", "lazy_preprocess")
VALUED = {  # flags whose value is checked or translated
    "max_steps": int, "lr_scheduler_type": str, "save_strategy": str, "evaluation_strategy": str,
    "eval_strategy": str, "save_total_limit": int, "per_device_eval_batch_size": int, "report_to": str,
    "optim": str, "lora_bias": str, "deepspeed": str,
}
# flags with no meaning here -> the nearest option
REFUSED = {
    "cache_dir": "-m/--model takes a local checkpoint folder (no download cache)",
    "warmup_steps": "--warmup-ratio",
    "lora_weight_path": "merge that adapter first (qwenvl merge) and fine-tune the merged checkpoint",
    "local_rank": "launch with torchrun (it sets LOCAL_RANK), not the deepspeed launcher",
    "fsdp": "--sharding (FSDP is always used under torchrun)",
    "tf32": "--precision",
    "resume_from_checkpoint": "--resume (continues from OUTPUT/train_state)",
}
DEFAULT_LORA_TARGETS = ("c_attn", "attn.c_proj", "w1", "w2")


def _bool(text: str) -> bool:
    """transformers' string_to_bool: `--flag`, `--flag True`, `--flag false`, ..."""
    if isinstance(text, bool):
        return text
    lowered = text.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "the original finetune.py's flags", "accepted as finetune/*.sh passes them, each mapped to an option "
        "above (README: fine-tuning has the table)")
    for name, (_, kind, native) in RENAMED.items():
        group.add_argument(f"--{name}", dest=f"original_{name}", type=kind, default=None, help=f"= {native}",
                           metavar={int: "N", float: "X", str: "VALUE"}[kind])
    for name in SWITCHES:
        group.add_argument(f"--{name}", dest=f"original_{name}", type=_bool, nargs="?", const=True, default=None,
                           metavar="BOOL", help=argparse.SUPPRESS)
    for name, kind in VALUED.items():
        group.add_argument(f"--{name}", dest=f"original_{name}", type=kind, default=None, help=argparse.SUPPRESS)
    group.add_argument("--lora_target_modules", dest="original_lora_target_modules", nargs="+", default=None,
                       help=argparse.SUPPRESS)
    for name in REFUSED:
        group.add_argument(f"--{name}", dest=f"original_{name}", nargs="?", const=True, default=None,
                           help=argparse.SUPPRESS)


class FlagError(OptionsError):
    """An original flag or value with no meaning here; the message names it and the nearest option."""


def apply(args: argparse.Namespace) -> list[str]:
    """Move the original flags given in `args` onto the native options (in place). Returns one line for each
    flag whose meaning changed on the way; raises FlagError for one with no meaning here."""
    given = {k[len("original_"):]: v for k, v in vars(args).items() if k.startswith("original_") and v is not None}
    notes = []
    for name, nearest in REFUSED.items():
        if name in given:
            raise FlagError(f"--{name} has no meaning in qwenvl finetune; nearest: {nearest}")
    for name, (dest, _, _) in RENAMED.items():
        if name in given:
            setattr(args, dest, given[name])
    if given.get("max_steps") is not None:
        args.max_steps = given["max_steps"] if given["max_steps"] > 0 else None  # HF: -1 = by epochs

    if given.get("q_lora"):
        if not _is_int4(args.model):
            raise FlagError(f"--q_lora trains LoRA over an Int4 checkpoint (as Qwen-VL-Chat-Int4); {args.model} is not "
                            "quantized: drop --q_lora for LoRA on it, or pass the Int4 checkpoint")
        args.lora = True
        if args.lora_embeddings is None:
            args.lora_embeddings = False  # the original's Q-LoRA never trains wte / lm_head
        notes.append("--q_lora -> --lora on the Int4 checkpoint (Q-LoRA: the quantized weights stay frozen)")
    if given.get("use_lora"):
        args.lora = True
    if "fix_vit" in given:
        if args.lora:
            notes.append("--fix_vit has no effect with --use_lora (as in the original: the LoRA weights train)")
        elif args.train is None:
            args.train = "resampler,llm" if given["fix_vit"] else "vit,resampler,llm"
            notes.append(f"--fix_vit {given['fix_vit']} -> --train {args.train}"
                         + (" (the ViT frozen, the resampler trained)" if given["fix_vit"] else ""))
    if given.get("bf16") and given.get("fp16"):
        raise FlagError("--bf16 and --fp16 both set; nearest: --precision bf16 or --precision fp16")
    if given.get("bf16") or given.get("fp16"):
        args.precision = "bf16" if given.get("bf16") else "fp16"
        notes.append(f"--{args.precision} True -> --precision {args.precision} (autocast; weights and optimizer "
                     "state stay fp32, the saved model in config.json's dtype)")
    if given.get("gradient_checkpointing"):
        args.gradient_checkpointing = True
    if "lazy_preprocess" in given:
        notes.append("--lazy_preprocess: nothing to choose (samples are encoded once up front, images loaded "
                     "lazily by the workers)")

    schedule = given.get("lr_scheduler_type")
    if schedule is not None and schedule != "cosine":
        raise FlagError(f"--lr_scheduler_type {schedule} is not available; the schedule is cosine with warmup "
                        "(nearest: --warmup-ratio)")
    optim = given.get("optim")
    if optim is not None and not optim.startswith("adamw"):
        raise FlagError(f"--optim {optim} is not available; the optimizer is AdamW (nearest: --adam-beta1, "
                        "--adam-beta2, --weight-decay)")
    report = given.get("report_to")
    if report is not None and report != "none":
        raise FlagError(f"--report_to {report} is not available; progress goes to stderr and every step's record "
                        "to OUTPUT/history.json (nearest: --log-every)")
    if given.get("lora_bias") not in (None, "none"):
        raise FlagError(f"--lora_bias {given['lora_bias']} is not available; LoRA trains no biases "
                        "(nearest: --lora-extra for more targets)")

    strategy = given.get("save_strategy")
    if strategy == "no":
        args.save_every = 0
    elif strategy not in (None, "steps"):
        raise FlagError(f"--save_strategy {strategy} is not available; nearest: --save-every N (steps)")
    if strategy == "steps" and "save_steps" not in given:
        args.save_every = 500  # transformers' default save_steps
        notes.append("--save_strategy steps without --save_steps -> --save-every 500 (transformers' default)")
    for flag in ("evaluation_strategy", "eval_strategy"):
        strategy = given.get(flag)
        if strategy == "no":
            args.eval_every = 0
        elif strategy not in (None, "steps"):
            raise FlagError(f"--{flag} {strategy} is not available; nearest: --eval-every N (steps)")
    if "save_total_limit" in given:
        notes.append(f"--save_total_limit {given['save_total_limit']}: one resumable state is kept, the newest "
                     "(OUTPUT/train_state, replaced whole at each save), and the final model in OUTPUT/model")
    if "per_device_eval_batch_size" in given:
        notes.append(f"--per_device_eval_batch_size {given['per_device_eval_batch_size']}: the held-out loss "
                     f"runs at --batch-size ({args.batch_size})")

    targets = given.get("lora_target_modules")
    if targets is not None:
        missing = [t for t in DEFAULT_LORA_TARGETS if t not in targets]
        if missing:
            raise FlagError(f"--lora_target_modules without {', '.join(missing)}: LoRA always wraps "
                            f"{', '.join(DEFAULT_LORA_TARGETS)}; nearest: --lora-extra for more targets")
        extra = [t for t in targets if t not in DEFAULT_LORA_TARGETS]
        if extra:
            args.lora_extra = ",".join(filter(None, [args.lora_extra, *extra]))
            notes.append(f"--lora_target_modules -> --lora-extra {args.lora_extra}")

    if "deepspeed" in given:
        args.sharding, note = _sharding_of(given["deepspeed"])
        notes.append(note)
    return notes


def _is_int4(model: str | None) -> bool:
    try:
        with open(os.path.join(model or "", "config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("quantization_config"))
    except (OSError, ValueError):
        return False  # the loader names a missing or broken checkpoint itself


def _sharding_of(path: str) -> tuple[str, str]:
    """A DeepSpeed config's ZeRO stage -> the FSDP sharding that keeps the same things sharded."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise FlagError(f"--deepspeed {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise FlagError(f"--deepspeed {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    offload = [k for k in ("offload_optimizer", "offload_param")
               if isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"]
    tail = f"; its {' and '.join(offload)} is not done (states stay on the GPU)" if offload else ""
    if stage == 3:
        return "full", (f"--deepspeed {path} (ZeRO-3) -> --sharding full: FSDP shards parameters, gradients and "
                        f"optimizer state over the torchrun processes{tail}")
    return "grad-op", (f"--deepspeed {path} (ZeRO-{stage}) -> --sharding grad-op: FSDP shards gradients and optimizer "
                       f"state, parameters stay gathered between forward and backward{tail}")


def print_notes(notes: list[str]) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"original flag: {note}", file=sys.stderr)
