"""`qwenvl bench-train`: training tokens/s and peak memory per mode on a random-weight config.

Each mode runs in its own process, so the peak memory reported is that mode's alone. A sample is one
image (258 tokens) plus text up to --seq-len tokens, with the answer half supervised.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

MODES = {
    "full": dict(train={"resampler", "llm"}, lora=False),  # the original's full fine-tuning (ViT frozen)
    "lora": dict(train=set(), lora=True),  # LoRA on c_attn, attn.c_proj, w1, w2
    "stage1": dict(train={"vit", "resampler"}, lora=False),  # LLM frozen
    "qlora": dict(train=set(), lora=True, int4=True),  # LoRA over the int4-quantized decoder
}
# The original's published single-A100 peak memory for LoRA / Q-LoRA on the chat model (SPEC section 9).
PUBLISHED = "original, 1x A100 at 384 / 2048 tokens: LoRA 23.3 / 27.3 GB, Q-LoRA 17.0 / 19.3 GB"


def reset_peak(device: torch.device) -> None:
    """Start the peak count now: what setup allocated and freed (float weights before quantizing) is not training."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: reset VmHWM to the current resident size
            f.write("5")


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) * 1024


def run_mode(mode: str, config_name: str, seq_len: int, steps: int, precision: str, device: str) -> dict:
    """Train `steps` optimizer steps of one mode in this process; returns the measured figures."""
    from ..bench import random_config, random_model
    from . import adapters
    from .loop import PRECISIONS

    device = torch.device(device)
    model = random_model(random_config(config_name), torch.float32, device).train()
    spec = MODES[mode]
    if spec.get("int4"):
        from ..model.quant import replace_with_quantized
        replace_with_quantized(model, quantize=True)
    adapters.apply_freeze_plan(model, spec["train"])
    if spec["lora"]:
        adapters.add_lora(model)
    gc.collect()
    reset_peak(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    config = model.config
    span = config.visual.n_queries
    start = config.visual.image_start_id
    text = max(8, seq_len - span - 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([start]), torch.full((span,), 151859), torch.tensor([start + 1]),
                     torch.randint(0, 150000, (text,), generator=g)])[None].to(device)
    labels = ids.clone()
    labels[:, : span + 2 + text // 2] = -100
    pixels = torch.rand(1, 3, config.visual.image_size, config.visual.image_size, generator=g).to(device)
    dtype = PRECISIONS[precision]
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(ids, labels=labels, images=pixels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[1:])
    return {"mode": mode, "config": config_name, "seq_len": int(ids.shape[1]), "precision": precision,
            "tokens_per_s": ids.shape[1] / step_s, "step_s": step_s, "peak_gb": peak_memory(device) / 1e9,
            "trainable_m": sum(p.numel() for p in params) / 1e6, "loss": float(loss.detach())}


def main(modes: list[str], config_name: str, seq_len: int, steps: int, precision: str, device: str) -> list[dict]:
    """Each mode in a fresh process; prints a table and returns the rows."""
    rows = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        code = (f"import json, sys; from qwenvl.train.bench import run_mode; "
                f"print(json.dumps(run_mode({mode!r}, {config_name!r}, {seq_len}, {steps}, {precision!r}, {device!r})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            raise ChildProcessError(f"mode {mode} failed: {tail}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'mode':8} {'config':6} {'tokens':>6} {'precision':>9} {'trainable':>10} {'tokens/s':>9} {'peak memory':>12}")
    for r in rows:
        print(f"{r['mode']:8} {r['config']:6} {r['seq_len']:6d} {r['precision']:>9} {r['trainable_m']:9.1f}M "
              f"{r['tokens_per_s']:9.1f} {r['peak_gb']:10.2f} GB")
    print(PUBLISHED)
    return rows
