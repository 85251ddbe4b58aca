"""`qwenvl quantize`: a float checkpoint -> an int4 checkpoint in Qwen-VL-Chat-Int4's GPTQ layout.

The decoder's linears are quantized round-to-nearest (symmetric, 4 bits, one scale per group of 128
inputs and output); the vision tower, embeddings and lm_head stay in float, as in the official Int4
checkpoint. This is not GPTQ's error-compensating algorithm: the format is GPTQ's, so the result loads
wherever Qwen-VL-Chat-Int4 does, but its accuracy is that of plain rounding.
"""
from __future__ import annotations

import os

import torch

from . import loading
from .errors import CheckpointError, OptionsError
from .model.quant import replace_with_quantized


def quantize_checkpoint(source, out, group_size: int = 128, dtype: torch.dtype = torch.float16) -> str:
    """Write the int4 version of checkpoint `source` to `out` (written aside, then renamed into place)."""
    source, out = os.fspath(source), os.fspath(out)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise OptionsError(f"group_size must be a positive integer (128 as Qwen-VL-Chat-Int4), got {group_size!r}")
    loading.check_output_folder(out)
    model = loading.from_pretrained(source, torch_dtype=dtype, device_map="cpu")
    if model.config.quantization_config:
        raise CheckpointError(f"{source} is already quantized")
    model.train()  # plain (unpacked) weights to quantize
    replace_with_quantized(model, group_size, quantize=True)
    model.config.quantization_config = {"bits": 4, "group_size": group_size, "desc_act": False, "sym": True,
                                        "quant_method": "gptq"}
    model.config.bf16, model.config.fp16, model.config.fp32 = dtype == torch.bfloat16, dtype == torch.float16, False
    return loading.write_checkpoint(model, out, tokenizer_from=source)
