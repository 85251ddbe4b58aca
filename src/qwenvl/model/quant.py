"""GPTQ 4-bit linear layers (Qwen-VL-Chat-Int4's format, SPEC section 8) in plain PyTorch.

For a layer with `in` inputs, `out` outputs and group size g:
  qweight int32 [in/8, out]   eight 4-bit codes along the input axis: row 8r+j in bits 4j..4j+3 of qweight[r]
  qzeros  int32 [in/g, out/8] zero points packed the same way along the output axis, stored as (zero - 1)
  scales  fp16  [in/g, out];  g_idx int32 [in] (= i // g without act-order);  bias fp16 [out]
  W[i, o] = scales[g_idx[i], o] * (code[i, o] - (zero[g_idx[i], o] + 1)),  y = x @ W + bias
The weight is dequantized for each call: memory stays at 4 bits per weight, compute pays the unpacking.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BITS = 4
PACK = 32 // BITS  # codes per int32
QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")  # the decoder's linears
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)


def unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> 4-bit codes (int32), eight per word, unpacked along `dim` (0 or 1)."""
    shifts = _SHIFTS.to(packed.device)
    if dim == 0:
        codes = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
        return codes.reshape(-1, packed.shape[1])
    codes = (packed[:, :, None] >> shifts[None, None, :]) & 0xF
    return codes.reshape(packed.shape[0], -1)


def pack(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `unpack`: 4-bit codes (0..15) -> int32 words along `dim`."""
    codes = codes.to(torch.int64)
    if dim == 0:
        grouped = codes.reshape(-1, PACK, codes.shape[1])
        words = (grouped << _SHIFTS.to(torch.int64)[None, :, None]).sum(1)
    else:
        grouped = codes.reshape(codes.shape[0], -1, PACK)
        words = (grouped << _SHIFTS.to(torch.int64)[None, None, :]).sum(2)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement, as int32 stores it
    return words.to(torch.int32)


class QuantLinear(nn.Module):
    """A GPTQ int4 linear; `infeatures`/`outfeatures` let PEFT put LoRA on it (Q-LoRA)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128):
        super().__init__()
        if in_features % PACK or out_features % PACK:
            raise ValueError(f"int4 layers need in and out features divisible by {PACK}, got {in_features}x{out_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.zeros(in_features // PACK, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // PACK, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))

    infeatures = property(lambda self: self.in_features)
    outfeatures = property(lambda self: self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in nn.Linear's layout [out, in]."""
        codes = unpack(self.qweight, 0)
        zeros = unpack(self.qzeros, 1) + 1
        g = self.g_idx.long()
        weight = self.scales.float()[g] * (codes - zeros[g]).float()
        return weight.t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias.to(x.dtype))

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 128) -> "QuantLinear":
        """Round-to-nearest symmetric 4-bit quantization of a float weight [out, in], in GPTQ's format
        (scale = 2 * max|w| / 15 per group and output, zero point 8)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size)
        w = weight.detach().float().t()  # [in, out]
        groups = layer.scales.shape[0]
        padded = F.pad(w, (0, 0, 0, groups * group_size - in_features)).reshape(groups, group_size, out_features)
        scale = padded.abs().amax(1) * 2 / 15
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).half()
        zero = 2 ** (BITS - 1)
        codes = torch.clamp(torch.round(w / scale.float()[layer.g_idx.long()]) + zero, 0, 15)
        layer.qweight.copy_(pack(codes, 0))
        layer.qzeros.copy_(pack(torch.full((groups, out_features), zero - 1), 1))
        layer.scales.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach().half())
        return layer


def quantized_module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()
            if name.startswith("transformer.h.") and name.endswith(QUANTIZED)]


def replace_with_quantized(model: nn.Module, group_size: int = 128, quantize: bool = False) -> None:
    """Swap the decoder's linears for QuantLinear: empty ones (to load an Int4 checkpoint into), or, with
    `quantize`, ones quantized from the current weights."""
    for name in quantized_module_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if quantize:
            new = QuantLinear.quantize(linear.weight, linear.bias, group_size)
        else:
            new = QuantLinear(linear.in_features, linear.out_features, group_size)
        setattr(parent, child, new.to(linear.weight.device) if not linear.weight.is_meta else new)


def has_float_bias(name: str, config) -> bool:
    """GPTQ stores a bias on every layer; the float architecture has one only on c_attn unless no_bias is off."""
    return name.endswith("attn.c_attn") or not config.no_bias


def to_linear(layer: QuantLinear, dtype: torch.dtype, bias: bool) -> nn.Module:
    """A float Linear holding `layer`'s dequantized weight (and its bias when the architecture has one)."""
    from .language import Linear

    linear = Linear(layer.in_features, layer.out_features, bias=bias, device=layer.qweight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(layer.dequantize(dtype))
        if bias:
            linear.bias.copy_(layer.bias.to(dtype))
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace every QuantLinear by a float Linear with its dequantized weight (to merge Q-LoRA adapters)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, to_linear(module, dtype, has_float_bias(name, model.config)))
    model.config.quantization_config = None
