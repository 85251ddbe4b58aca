"""`qwenvl chat`, `qwenvl generate`, `qwenvl bench`: the command line.

A user's mistake (a missing file, a bad image, an unknown option value), that is a `QwenVLError`,
ends in one line on stderr and exit status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import images
from .boxes import draw_boxes, latest_image, parse_boxes, to_pixels
from .errors import OptionsError, QwenVLError
from .images import load_image, short_label

USER_ERRORS = (QwenVLError,)


class UsageError(OptionsError):
    """A command-line mistake; its message is shown as is."""


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="checkpoint folder (official Qwen-VL layout; default: the bundled demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights and compute precision (auto: config.json's flag, else the best for the device)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize a float checkpoint's decoder linears while loading (round-to-nearest, GPTQ format)")


def _add_parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N processes (one GPU each, or CPU cores with gloo); "
                   "the ranks are started here, or by torchrun --nproc_per_node N")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default="You are a helpful assistant.", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: generation_config.json (512)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the checkpoint's sampling")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--max-image-bytes", type=int, default=None,
                   help="largest image file, data URI or download in bytes (default 32 MiB)")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="largest image in width x height, read from its header (default 25,000,000)")
    p.add_argument("--image-timeout", type=float, default=None,
                   help="seconds one image download may take in all (default 30)")


def _set_image_limits(args) -> None:
    changes = {"max_bytes": args.max_image_bytes, "max_pixels": args.max_image_pixels, "timeout_s": args.image_timeout}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        images.set_limits(**changes)


def _sampling_kwargs(args) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    if args.greedy:
        kwargs["do_sample"] = False
    return {k: v for k, v in kwargs.items() if v is not None}


def default_model() -> str:
    """The bundled demo model (see `qwenvl demo`), used when no -m is given."""
    from .demo import DEMO_MODEL

    if not (DEMO_MODEL / "config.json").exists():
        raise UsageError(f"no -m given and the bundled demo model is missing from {DEMO_MODEL}")
    return str(DEMO_MODEL)


def _load(args, quantize: str | None = None):
    """The model and tokenizer the command's options name; `quantize` (default: --quantize) as from_pretrained's."""
    from . import AutoModelForCausalLM, AutoTokenizer

    args.model = args.model or default_model()
    dtype = {"auto": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}, "fp32": {"fp32": True}}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, device_map=args.device, **dtype,
                                                 tensor_parallel=getattr(args, "tensor_parallel_size", 1) > 1,
                                                 quantize=quantize or getattr(args, "quantize", None))
    return model, tokenizer


def _launch_ranks(args) -> int | None:
    """With --tensor-parallel-size N > 1 outside torchrun: run this command as N ranks, return its status."""
    from .model.parallel import under_torchrun

    size = args.tensor_parallel_size
    if size < 1:
        raise UsageError(f"--tensor-parallel-size must be at least 1, got {size}")
    if size == 1:
        return None
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != size:
            raise UsageError(f"--tensor-parallel-size {size} but torchrun started {os.environ['WORLD_SIZE']} ranks")
        return None
    from .launch import relaunch
    return relaunch(args.argv, size)


def _is_follower(model) -> bool:
    """A tensor-parallel rank other than 0: it computes along but prints nothing."""
    return model.tp is not None and model.tp.rank != 0


def _draw(response: str, history, out: str) -> tuple[bool, str]:
    """Save the boxes of `response` on the newest image of the conversation; returns (saved, status line)."""
    boxes = parse_boxes(response)
    if not boxes:
        return False, "the answer has no boxes to draw"
    image_ref = latest_image(response, history)
    if image_ref is None:
        return False, "there is no image in the conversation to draw on"
    picture = draw_boxes(load_image(image_ref).convert("RGB"), boxes)
    tmp = out + ".tmp" + os.path.splitext(out)[1]
    try:
        picture.save(tmp)  # then rename: a failed save never leaves a half-written file under the real name
        os.replace(tmp, out)
    except (OSError, ValueError) as e:  # a folder that is not there, an extension Pillow cannot write
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UsageError(f"cannot save the drawing to {out}: {e}") from None
    return True, f"saved {len(boxes)} box(es) on {short_label(image_ref, 60)} to {out}"


def _check_images(images: list[str]) -> None:
    for image in images:  # fail early, with the file's name, before loading a model
        load_image(image)


def _query(tokenizer, images: list[str], prompt: str) -> str:
    return tokenizer.from_list_format([{"image": i} for i in images] + [{"text": prompt}])


def cmd_generate(args) -> int:
    if not args.prompt.strip() and not args.image:
        raise UsageError("--prompt is empty")
    _set_image_limits(args)
    _check_images(args.image)
    status = _launch_ranks(args)
    if status is not None:
        return status
    model, tokenizer = _load(args)
    query = _query(tokenizer, args.image, args.prompt)
    response, history = model.chat(tokenizer, query, history=[], system=args.system, **_sampling_kwargs(args))
    if _is_follower(model):
        return 0
    drawn, status = _draw(response, history, args.draw) if args.draw else (False, None)
    if args.json:
        boxes = parse_boxes(response)
        image_ref = latest_image(response, history)
        if boxes and image_ref is not None:
            width, height = load_image(image_ref).size
            for b in boxes:
                b["pixels"] = to_pixels(b["box"], width, height)
        print(json.dumps({"response": response, "boxes": boxes, "images": args.image,
                          "drawn": args.draw if drawn else None}, ensure_ascii=False))
    else:
        print(response)
    if status:
        print(status, file=sys.stderr)
    return 0


CHAT_HELP = """Type a message and press Enter. Commands:
  :image PATH_OR_URL   attach an image to your next message (repeat for several)
  :draw FILE.png       save the boxes of the last answer drawn on its image
  :history             show the conversation so far
  :clear               forget the conversation and attached images
  :help                this text
  :quit                leave (Ctrl-D works too)"""


def cmd_chat(args) -> int:
    _set_image_limits(args)
    _check_images(args.image or [])
    model, tokenizer = _load(args)
    history: list = []
    pending: list[str] = list(args.image or [])
    print(f"qwenvl chat: {args.model}. Type :help for commands.", file=sys.stderr)
    while True:
        try:
            line = input("User> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        try:
            if command in (":quit", ":exit", ":q"):
                return 0
            if command == ":help":
                print(CHAT_HELP)
            elif command == ":clear":
                history, pending = [], []
                print("(conversation cleared)")
            elif command == ":history":
                for i, (q, r) in enumerate(history, 1):
                    print(f"[{i}] User: {q}\n[{i}] Assistant: {r}")
                if not history:
                    print("(no turns yet)")
            elif command == ":image":
                if not rest:
                    raise UsageError(":image needs a path or URL")
                load_image(rest)
                pending.append(rest)
                print(f"(attached {short_label(rest, 60)}; it goes with your next message)")
            elif command == ":draw":
                if not history:
                    raise UsageError("there is no answer to draw yet")
                print(_draw(history[-1][1], history, rest or "boxes.png")[1])
            elif command.startswith(":"):
                raise UsageError(f"unknown command {command}; type :help")
            else:
                query = _query(tokenizer, pending, line)
                print("Assistant> ", end="", flush=True)
                shown = ""
                try:
                    for text in model.chat_stream(tokenizer, query, history=history, system=args.system,
                                                  **_sampling_kwargs(args)):
                        print(text[len(shown):] if text.startswith(shown) else "\n" + text, end="", flush=True)
                        shown = text
                except KeyboardInterrupt:
                    print(" [interrupted]", end="")
                print()
                history.append((query, shown))
                pending = []
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)


def cmd_bench(args) -> int:
    import torch

    from . import bench

    for name in ("prompt_tokens", "decode_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise UsageError(f"--threads must be 0 (torch's choice) or more, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model and args.random_config:
        raise UsageError("give either -m/--model or --random-config, not both")
    status = _launch_ranks(args)
    if status is not None:
        return status
    modes = bench.parse_modes(args.quant) if args.quant else []
    if args.quant_lm_head and not modes:
        raise UsageError("--quant-lm-head goes with --quant")
    if modes and args.tensor_parallel_size > 1:
        raise UsageError("--quant runs in one process: drop --tensor-parallel-size")
    if args.model:
        if args.quant_lm_head:
            raise UsageError("--quant-lm-head goes with --random-config (checkpoints keep lm_head in float)")
        model, _ = _load(args)
        if modes:  # each mode quantized while loading, as --quantize does
            models = {bench.dtype_label(model.dtype): model}
            models.update((mode, _load(args, quantize=mode)[0]) for mode in modes)
            bench.compare(models, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                          repeats=args.repeats)
            return 0
    else:
        from .loading import resolve_device
        device = resolve_device(args.device)
        default = torch.bfloat16 if device.type == "cuda" or modes else torch.float32  # --quant: against bf16
        dtype = {"auto": default, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        config = bench.random_config(args.random_config or "0.5b")

        def build():  # the same seed each time: the same weights
            return bench.random_model(config, dtype, device, tensor_parallel=args.tensor_parallel_size > 1)
        model = build()
        if modes:
            models = {bench.dtype_label(dtype): model}
            for mode in modes:
                models[mode] = bench.quantize_random(build(), mode, lm_head=args.quant_lm_head)
            bench.compare(models, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                          repeats=args.repeats)
            return 0
    report = (lambda *a, **k: None) if _is_follower(model) else print
    bench.run(model, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats,
              report=report)
    return 0


def cmd_finetune(args) -> int:
    from .train import original_flags
    from .train.data import DataError
    from .train.loop import TrainArgs, TrainingInterrupted, train

    original_flags.print_notes(original_flags.apply(args))
    for dest, flags in (("model", "-m/--model (or --model_name_or_path)"), ("data", "--data (or --data_path)"),
                        ("output", "--output (or --output_dir)")):
        if getattr(args, dest) is None:
            raise UsageError(f"qwenvl finetune needs {flags}")
    groups = tuple(g for g in args.train.split(",") if g) if args.train is not None else \
        (() if args.lora else ("resampler", "llm"))
    try:
        train(TrainArgs(
            model=args.model, data=args.data, output=args.output, eval_data=args.eval_data, train=groups,
            stage=args.stage, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout, lora_extra=tuple(e for e in args.lora_extra.split(",") if e),
            lora_embeddings=args.lora_embeddings, image_size=args.image_size, max_len=args.max_len, pack=args.pack,
            batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
            lr=args.lr, weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
            warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm, precision=args.precision,
            gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
            save_every=args.save_every, log_every=args.log_every, seed=args.seed, num_workers=args.num_workers,
            resume=args.resume, device=args.device, sharding=args.sharding, save_dtype=args.save_dtype))
    except DataError as e:  # every problem, each with its record's position and id
        print(f"qwenvl: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"qwenvl finetune: {e}", file=sys.stderr)
        return 130
    return 0


def cmd_bench_train(args) -> int:
    from .loading import resolve_device
    from .train import bench as train_bench

    train_bench.main(args.modes.split(","), args.random_config, args.seq_len, args.steps, args.precision,
                     str(resolve_device(args.device)))
    return 0


def cmd_quantize(args) -> int:
    import torch

    from .quantize import quantize_checkpoint

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    quantize_checkpoint(args.model, args.out, group_size=args.group_size, dtype=dtype, bits=args.bits)
    print(f"wrote the int{args.bits} checkpoint {args.out}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from .train.adapters import merge_adapter

    import torch

    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    merge_adapter(args.base, args.adapter, args.out, dtype=dtype)
    print(f"merged {args.adapter} into {args.base}: {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .serve.cli import add_bench_options as bench_serve_options, add_options as serve_options, add_web_options

    parser = argparse.ArgumentParser(prog="qwenvl", description="Run Qwen-VL models: chat, one-shot generation, benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="interactive multi-turn chat with images, streaming")
    _add_model_options(p)
    _add_sampling_options(p)
    p.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one question about zero or more images")
    _add_model_options(p)
    _add_sampling_options(p)
    p.add_argument("--image", action="append", default=[], help="image path, URL or data: URI (repeatable)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--draw", metavar="OUT.png", help="save the answer's boxes drawn on the (last) image")
    p.add_argument("--json", action="store_true", help="print the answer and its boxes as JSON")
    _add_parallel_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat with images, streaming) on the engine")
    _add_model_options(p)
    serve_options(p)
    _add_parallel_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("web", help="the chat page in the browser: pictures, streaming answers, boxes drawn")
    _add_model_options(p)
    add_web_options(p)
    _add_parallel_option(p)
    p.set_defaults(func=cmd_web)

    p = sub.add_parser("bench-serve", help="serving throughput and latency: batching server vs one at a time")
    _add_model_options(p)
    bench_serve_options(p)
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("bench", help="speed: image encode, prefill, decode tokens/s vs the memory-bandwidth ceiling")
    p.add_argument("-m", "--model", help="checkpoint folder")
    p.add_argument("--random-config", choices=["tiny", "0.5b", "9.6b"], help="random weights of this shape")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens after the image (default 64)")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="runs per figure; medians are reported")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--quant", "--quantize", default=None, metavar="int4,int8",
                   help="also measure these quantized modes (round-to-nearest, as qwenvl quantize) in the same run, "
                   "each against the float model (default bf16)")
    p.add_argument("--quant-lm-head", action="store_true", help="with --quant, quantize lm_head too")
    _add_parallel_option(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("finetune", help="fine-tune on conversations in the official JSON/JSONL format")
    p.add_argument("-m", "--model", help="checkpoint folder to start from (required)")
    p.add_argument("--data", help="training data (JSON list or JSONL of conversations; required)")
    p.add_argument("--output", help="folder for the result (model/ or adapter/) and train_state/ (required)")
    p.add_argument("--eval-data", help="held-out conversations; the loss on them is logged every --eval-every steps")
    p.add_argument("--train", default=None, help="groups trained in full: any of vit,resampler,llm "
                   "(default resampler,llm; with --lora default none)")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], help="the paper's presets: 1 = vit,resampler at 224; "
                   "2 = all at 448; 3 = resampler,llm at 448")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the LLM (c_attn, attn.c_proj, w1, w2)")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-extra", default="", help="more LoRA targets: any of mlp.c_proj,vit,resampler")
    p.add_argument("--lora-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="with --lora, also train wte and lm_head in full (the original's modules_to_save); "
                   "default: on for a base checkpoint (no 'chat' in its folder name), off for a chat one")
    p.add_argument("--image-size", type=int, help="ViT input size (default: the checkpoint's, 448)")
    p.add_argument("--max-len", type=int, default=2048, help="longest sample in tokens (cut at turn boundaries)")
    p.add_argument("--pack", action="store_true", help="pack several samples per row, each isolated")
    p.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--warmup-ratio", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="autocast precision; weights and optimizer state stay fp32 (fp16 uses loss scaling)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="save a resumable state every N steps")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-workers", type=int, default=2, help="image-loading worker processes")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/train_state")
    p.add_argument("--device", default="auto")
    p.add_argument("--sharding", default="full", choices=["full", "grad-op"],
                   help="under torchrun, FSDP shards parameters, gradients and optimizer state (full, like ZeRO-3) "
                   "or gradients and optimizer state only (grad-op, like ZeRO-2)")
    p.add_argument("--save-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="precision of the saved full model (auto: the dtype the checkpoint's config.json declares)")
    from .train import original_flags
    original_flags.add_arguments(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("bench-train", help="training tokens/s and peak memory per mode on random weights")
    p.add_argument("--random-config", default="0.5b", choices=["tiny", "0.5b", "9.6b"])
    p.add_argument("--modes", default="full,lora,qlora,stage1", help="comma list of full, lora, qlora, stage1")
    p.add_argument("--seq-len", type=int, default=384, help="tokens per sample (one image + text)")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps (after one warm-up)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("quantize", help="write an int4 or int8 (GPTQ-format, round-to-nearest) copy of a checkpoint")
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group-size", type=int, default=None, help="inputs per scale (default 128 for int4, "
                   "-1 = one scale per output for int8)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="precision of the unquantized parts")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("data", help="datasets: generate synthetic pictures and conversations")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    from .data import synth
    q = data_sub.add_parser("synth", help="pictures of shapes and words, with conversations in the fine-tuning format")
    synth.add_arguments(q)
    q.set_defaults(func=lambda args, q=q: synth.run(args, parser=q))
    from .data import bench as bench_data
    q = data_sub.add_parser("bench", help="synthetic files in every benchmark's format, for qwenvl eval")
    bench_data.add_arguments(q)
    q.set_defaults(func=lambda args, q=q: bench_data.run(args, parser=q))

    from .eval import tasks as eval_tasks
    p = sub.add_parser("eval", help="run a benchmark with the original protocol and score it",
                       description="Benchmarks: " + ", ".join(eval_tasks.TASKS))
    p.add_argument("task", choices=list(eval_tasks.TASKS), metavar="TASK", help="one of: " + ", ".join(eval_tasks.TASKS))
    p.add_argument("-m", "--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    p.add_argument("--data", required=True, help="the benchmark file in the original's format (MME: its folder)")
    p.add_argument("--images", help="folder that relative image paths are resolved against")
    p.add_argument("--annotations", help="official annotation JSON (VQA answers, DocVQA answers, COCO captions)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--limit", type=int, help="only the first N items")
    p.add_argument("--out", help="folder for predictions and metrics (default: eval_results/TASK)")
    p.add_argument("--scorer", default="fixed", choices=["fixed", "compat"],
                   help="fixed: the documented metrics; compat: the original scripts' quirks (see docs)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap the answer length (default: the benchmark's protocol, e.g. 512 for MME)")
    p.add_argument("--few-shot", type=int, default=0, help="solved examples before each prompt (caption, VQA)")
    p.add_argument("--few-shot-data", help="where examples come from (default: the evaluated file itself)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-table", help="one table of the metrics.json files under the given folders")
    p.add_argument("folders", nargs="+")
    p.set_defaults(func=cmd_eval_table)

    p = sub.add_parser("demo", help="the bundled demo model: train it from scratch, measure its quality")
    from . import demo
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base: a full official-layout checkpoint")
    p.add_argument("--base", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="precision of the merged weights (auto: the base's config.json)")
    p.set_defaults(func=cmd_merge)
    return parser


def cmd_serve(args, web: bool = False) -> int:
    from .serve.cli import follow, serve

    status = _launch_ranks(args)
    if status is not None:
        return status
    model, tokenizer = _load(args)
    if _is_follower(model):  # rank 0 serves; this rank runs its engine's steps beside it
        return follow(model, args)
    return serve(model, tokenizer, args, web=web)


def cmd_web(args) -> int:
    return cmd_serve(args, web=True)


def cmd_bench_serve(args) -> int:
    from .serve.cli import bench

    args.load = _load
    return bench(args)


def cmd_eval(args) -> int:
    from .eval.runner import EvalArgs, evaluate, summary_table

    result = evaluate(EvalArgs(task=args.task, model=args.model or default_model(), data=args.data,
                               images=args.images, annotations=args.annotations, batch_size=args.batch_size,
                               limit=args.limit, out=args.out, scorer=args.scorer, few_shot=args.few_shot,
                               few_shot_data=args.few_shot_data, seed=args.seed, dtype=args.dtype,
                               device=args.device, max_new_tokens=args.max_new_tokens))
    if result is not None:
        print(summary_table([result]))
        print(f"metrics: {os.path.join(args.out or os.path.join('eval_results', args.task), 'metrics.json')}")
        if "submission" in result:
            scored = result.get(result["metric"]) is not None
            print(f"submission ({'also ' if scored else 'no answers to score: '}for the benchmark's server"
                  f"{', calculation.py --results_dir' if args.task == 'mme' else ''}): {result['submission']}")
    return 0


def cmd_eval_table(args) -> int:
    from .eval.runner import summary_table

    found = []
    for folder in args.folders:
        for root, _, files in sorted(os.walk(folder)):
            if "metrics.json" in files:
                with open(os.path.join(root, "metrics.json"), encoding="utf-8") as f:
                    found.append({**json.load(f), "folder": root})
    if not found:
        raise UsageError(f"no metrics.json under {', '.join(args.folders)}")
    print(summary_table(found))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --tensor-parallel-size runs the same command again as each rank
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 locale: show '?' for what it cannot encode
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"qwenvl: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
