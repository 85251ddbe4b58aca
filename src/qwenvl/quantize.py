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
from .errors import CheckpointError, OptionsError
from .model.quant import replace_with_quantized


def quantize_checkpoint(source, out, group_size: int | None = None, dtype: torch.dtype = torch.float16,
                        bits: int = 4) -> str:
    """Write the int4 or int8 version of checkpoint `source` to `out` (written aside, then renamed into place).
    group_size: default 128 for int4 (as Qwen-VL-Chat-Int4), -1 (one scale per output) for int8."""
    source, out = os.fspath(source), os.fspath(out)
    if bits not in (4, 8):
        raise OptionsError(f"bits must be 4 or 8, got {bits!r}")
    group_size = (128 if bits == 4 else -1) if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise OptionsError(f"group_size must be a positive integer or -1 (one group per output), got {group_size!r}")
    loading.check_output_folder(out)
    model = loading.from_pretrained(source, torch_dtype=dtype, device_map="cpu")
    if model.config.quantization_config:
        raise CheckpointError(f"{source} is already quantized")
    model.train()  # plain (unpacked) weights to quantize
    replace_with_quantized(model, group_size, quantize=True, bits=bits)
    model.config.quantization_config = {"bits": bits, "group_size": group_size, "desc_act": False, "sym": True,
                                        "quant_method": "gptq"}
    model.config.bf16, model.config.fp16, model.config.fp32 = dtype == torch.bfloat16, dtype == torch.float16, False
    return loading.write_checkpoint(model, out, tokenizer_from=source)
