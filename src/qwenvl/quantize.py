"""`qwenvl quantize`: a float checkpoint -> an int4 or int8 checkpoint in Qwen-VL-Chat-Int4's GPTQ layout.

The decoder's linears are quantized round-to-nearest (symmetric; int4: one scale per group of 128 inputs
and output; int8: one scale per output, group_size -1); the vision tower, embeddings and lm_head stay in
float, as in the official Int4 checkpoint. This is not GPTQ's error-compensating algorithm: the format is GPTQ's, so the result loads
wherever Qwen-VL-Chat-Int4 does, but its accuracy is that of plain rounding.
"""
from __future__ import annotations

import os

import torch

from . import loading
from .errors import OptionsError


def quantize_checkpoint(source, out, group_size: int | None = None, dtype: torch.dtype = torch.float16,
                        bits: int = 4) -> str:
    """Write the int4 or int8 version of checkpoint `source` to `out` (written aside, then renamed into place).
    group_size: default 128 for int4 (as Qwen-VL-Chat-Int4), -1 (one scale per output) for int8. The
    quantizing is from_pretrained(quantize=...)'s, layer by layer while loading."""
    source, out = os.fspath(source), os.fspath(out)
    if bits not in (4, 8):
        raise OptionsError(f"bits must be 4 or 8, got {bits!r}")
    loading.check_output_folder(out)
    model = loading.from_pretrained(source, torch_dtype=dtype, device_map="cpu", quantize=f"int{bits}",
                                    quantize_group_size=group_size)
    model.config.bf16, model.config.fp16, model.config.fp32 = dtype == torch.bfloat16, dtype == torch.float16, False
    return loading.write_checkpoint(model, out, tokenizer_from=source)
