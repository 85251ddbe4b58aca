"""GPTQ 4- and 8-bit linear layers (Qwen-VL-Chat-Int4's format, SPEC section 8) on PyTorch's packed kernels.

For a layer with `in` inputs, `out` outputs, group size g and b bits (p = 32 / b codes per int32):
  qweight int32 [in/p, out]   p codes along the input axis: row p*r+j in bits b*j..b*j+b-1 of qweight[r]
  qzeros  int32 [in/g, out/p] zero points packed the same way along the output axis, stored as (zero - 1)
  scales  fp16  [in/g, out];  g_idx int32 [in] (= i // g without act-order);  bias fp16 [out]
  W[i, o] = scales[g_idx[i], o] * (code[i, o] - (zero[g_idx[i], o] + 1)),  y = x @ W + bias
In eval mode the codes live in the device kernel's layout (quant_kernels); the dequantizing path is the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import quant_kernels as kernels

BITS = 4
PACK = 32 // BITS  # codes per int32 (4 bits)
QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")  # the decoder's linears
VISION_QUANTIZED = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")  # the ViT blocks' linears


def unpack(packed: torch.Tensor, dim: int, bits: int = BITS) -> torch.Tensor:
    """int32 words -> `bits`-bit codes (int32), 32/bits per word, unpacked along `dim` (0 or 1)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    if dim == 0:
        codes = (packed[:, None, :] >> shifts[None, :, None]) & mask
        return codes.reshape(-1, packed.shape[1])
    codes = (packed[:, :, None] >> shifts[None, None, :]) & mask
    return codes.reshape(packed.shape[0], -1)


def pack(codes: torch.Tensor, dim: int, bits: int = BITS) -> torch.Tensor:
    """Inverse of `unpack`: codes (0..2^bits-1) -> int32 words along `dim`."""
    codes = codes.to(torch.int64)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
    if dim == 0:
        grouped = codes.reshape(-1, 32 // bits, codes.shape[1])
        words = (grouped << shifts[None, :, None]).sum(1)
    else:
        grouped = codes.reshape(codes.shape[0], -1, 32 // bits)
        words = (grouped << shifts[None, None, :]).sum(2)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement, as int32 stores it
    return words.to(torch.int32)


class QuantLinear(nn.Module):
    """A GPTQ int4 or int8 linear; `infeatures`/`outfeatures` let PEFT put LoRA on it (Q-LoRA).

    In eval mode the codes move into the device's packed kernel layout (quant_kernels) and `qweight` is
    dropped (same bytes, held once); state_dict, train() (the kernels have no backward), .to() and
    load_state_dict rebuild it. Without a kernel that takes the layer (device, dtype, group size), forward
    dequantizes: that plain path is the reference the kernels are tested against."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bits: int = BITS):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear takes 4 or 8 bits, got {bits}")
        per_word = 32 // bits
        if in_features % per_word or out_features % per_word:
            raise ValueError(f"int{bits} layers need in and out features divisible by {per_word}, "
                             f"got {in_features}x{out_features}")
        group_size = in_features if group_size == -1 else group_size  # GPTQ's -1: one group per output
        self.in_features, self.out_features, self.group_size, self.bits = in_features, out_features, group_size, bits
        groups = math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.zeros(in_features // per_word, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per_word, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32) // group_size)
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))
        self._kernel: dict | None = None  # the packed form, while in eval mode on a device with a kernel

    infeatures = property(lambda self: self.in_features)
    outfeatures = property(lambda self: self.out_features)

    def codes(self) -> torch.Tensor:
        """The stored codes [in, out] (int32)."""
        return unpack(self.qweight, 0, self.bits) if self._kernel is None else self._kernel_codes()

    def zeros(self) -> torch.Tensor:
        return unpack(self.qzeros, 1, self.bits) + 1  # GPTQ stores zero - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in nn.Linear's layout [out, in]."""
        g = self.g_idx.long()
        weight = self.scales.float()[g] * (self.codes() - self.zeros()[g]).float()
        return weight.t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._kernel
        if k is None or x.device != k["device"] or not kernels.available(self.bits, str(x.device), x.dtype):
            return F.linear(x, self.dequantize(x.dtype), self.bias.to(x.dtype))
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if k.get("perm") is not None:
            x2 = x2[:, k["perm"]]
        x2 = x2.contiguous()
        bias = None if k["bias"] is None else self._cast(k, "bias", x.dtype)
        if x2.shape[0] >= kernels.DEQUANTIZE_ROWS[self.bits] and k["dense"]:  # a prefill: a GEMM beats the kernel
            out = F.linear(x2, self._dense(x.dtype), bias)
        else:
            if self.bits == 4:
                out = kernels.int4_mm(x2, k["packed"], k["group"], self._cast(k, "scale_zeros", x.dtype))
            else:
                out = kernels.int8_mm(x2, k["packed"], self._cast(k, "scale", x.dtype))
                if k.get("offset") is not None:  # asymmetric zeros: W = s*(q + 128 - z), q the int8 code
                    out = out + x2.float().sum(-1, keepdim=True).to(x.dtype) * self._cast(k, "offset", x.dtype)
            if bias is not None:
                out = out + bias
        return out.reshape(*shape[:-1], self.out_features)

    def _dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The packed weight dequantized [out, in] (inputs in the kernel's order), for this call only."""
        k = self._kernel
        if self.bits == 4:
            return kernels.dequantize_int4(k["packed"], self.out_features, self.in_features, k["dense"], k["group"],
                                           self._cast(k, "scale_zeros", dtype))
        weight = k["packed"].to(dtype) * self._cast(k, "scale", dtype)[:, None]
        return weight if k.get("offset") is None else weight + self._cast(k, "offset", dtype)[:, None]

    @staticmethod
    def _cast(k: dict, name: str, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)  # cast once per activation dtype
        if key not in k:
            k[key] = k[name].to(dtype)
        return k[key]

    # ---- the packed form ----------------------------------------------------------------------

    def _plan_int4(self) -> tuple[torch.Tensor | None, int] | None:
        """(input permutation or None, kernel group size) when the int4 kernel can take this layer."""
        g_idx = self.g_idx.long().cpu()
        plain = torch.arange(self.in_features) // self.group_size
        perm = None
        if not torch.equal(g_idx, plain):  # act-order: sorting the inputs by group makes the groups contiguous
            perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[perm], plain):
                return None
        group = next((g for g in kernels.INT4_GROUPS if self.group_size % g == 0 and self.in_features % g == 0), None)
        return None if group is None else (perm, group)

    def pack_kernel(self) -> bool:
        """Move the codes into the device's kernel layout (no-op without a kernel); True when packed."""
        if self._kernel is not None:
            return True
        device = self.qweight.device
        if device.type == "meta" or not any(kernels.available(self.bits, str(device), d)
                                            for d in (self.bias.dtype, torch.bfloat16)):
            return False
        codes = self.codes().t()  # [out, in]
        g = self.g_idx.long()
        scale = self.scales.float()
        zeros = self.zeros().float()
        if self.bits == 4:
            plan = self._plan_int4()
            if plan is None:
                return False
            perm, group = plan
            if perm is not None:
                codes = codes[:, perm.to(device)]
            first = torch.arange(0, self.in_features, group, device=device)  # each kernel group's first input
            rows = g[first] if perm is None else g[perm.to(device)[first]]
            s = scale[rows]
            try:
                packed = kernels.pack_int4(codes.contiguous())
            except RuntimeError:  # a shape the kernel refuses (e.g. outputs not a multiple of 16 on the CPU)
                return False
            block = kernels.int4_block(str(device))
            kernel = {"packed": packed, "group": group, "perm": perm if perm is None else perm.to(device),
                      "scale_zeros": torch.stack([s, s * (8 - zeros[rows])], -1),
                      "dense": block if block and self.out_features % block == 0 else None}  # see _dense
        else:
            if self.scales.shape[0] != 1:
                return False  # the int8 kernel has one scale per output
            kernel = {"packed": (codes - 128).to(torch.int8).contiguous(), "scale": scale[0],
                      "dense": device.type == "cpu"}
            if not bool((zeros == 128).all()):
                kernel["offset"] = scale[0] * (128 - zeros[0])
        kernel.update(device=device, bias=self.bias.float() if bool(self.bias.any()) else None)  # GPTQ's zero biases
        self._kernel = kernel
        self.qweight = None  # held once, in the kernel's layout
        return True

    def _kernel_codes(self) -> torch.Tensor:
        """The codes [in, out] rebuilt from the packed form."""
        k = self._kernel
        if self.bits == 8:
            codes = k["packed"].to(torch.int32) + 128
        else:
            codes = kernels.unpack_int4(k["packed"], self.out_features, self.in_features)
            if k["perm"] is not None:
                restored = torch.empty_like(codes)
                restored[:, k["perm"]] = codes
                codes = restored
        return codes.t()

    def unpack_kernel(self) -> None:
        """Back to the plain GPTQ buffers (qweight rebuilt from the packed codes)."""
        if self._kernel is not None:
            self.qweight = pack(self._kernel_codes(), 0, self.bits)
            self._kernel = None

    def weight_bytes(self) -> int:
        """Bytes this layer holds for its weight, scales, zeros and bias (packed or not)."""
        tensors = [b for b in self.buffers(recurse=False) if b is not None]
        if self._kernel is not None:
            tensors.append(self._kernel["packed"])
        return sum(t.numel() * t.element_size() for t in tensors)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.unpack_kernel()
        else:
            self.pack_kernel()
        return self

    def _apply(self, fn, recurse=True):
        self.unpack_kernel()
        scales_dtype = self.scales.dtype
        super()._apply(fn, recurse)
        self.scales = self.scales.to(scales_dtype)  # GPTQ's fp16 scales stay fp16 under model.to(dtype)
        if not self.training:
            self.pack_kernel()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._kernel is not None:
            destination[prefix + "qweight"] = pack(self._kernel_codes(), 0, self.bits)

    def _load_from_state_dict(self, *args, **kwargs):
        packed = self._kernel is not None
        self.unpack_kernel()
        result = super()._load_from_state_dict(*args, **kwargs)
        if packed:
            self.pack_kernel()
        return result

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 128,
                 bits: int = BITS) -> "QuantLinear":
        """Round-to-nearest symmetric quantization of a float weight [out, in], in GPTQ's format
        (int4: scale = 2 * max|w| / 15 per group and output, zero point 8; int8: max|w| / 127, zero 128)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, group_size, bits).to(weight.device)
        group_size = layer.group_size
        w = weight.detach().float().t()  # [in, out]
        groups = layer.scales.shape[0]
        padded = F.pad(w, (0, 0, 0, groups * group_size - in_features)).reshape(groups, group_size, out_features)
        top, zero = (2 ** bits - 1), 2 ** (bits - 1)
        scale = padded.abs().amax(1) * (2 / 15 if bits == 4 else 1 / 127)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).half()
        codes = torch.clamp(torch.round(w / scale.float()[layer.g_idx.long()]) + zero, 0, top)
        layer.qweight.copy_(pack(codes, 0, bits))
        layer.qzeros.copy_(pack(torch.full((groups, out_features), zero - 1, device=weight.device), 1, bits))
        layer.scales.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias.detach().half())
        return layer


MODES = {"int4": (4, 128), "int8": (8, -1)}  # quantize= / --quantize: (bits, group size) as `qwenvl quantize` writes


def quantized_module_names(model: nn.Module, vision: bool = False, lm_head: bool = False) -> list[str]:
    """The linears quantization replaces: the decoder's, with `vision` the ViT blocks', with `lm_head` lm_head."""
    return [name for name, _ in model.named_modules()
            if (name.startswith("transformer.h.") and name.endswith(QUANTIZED))
            or (vision and name.startswith("transformer.visual.transformer.resblocks.") and name.endswith(VISION_QUANTIZED))
            or (lm_head and name == "lm_head")]


def quantize_linear(model: nn.Module, name: str, group_size: int, bits: int) -> None:
    """Replace the float linear `name` by its round-to-nearest QuantLinear, on the same device."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    weight = linear.weight.to_dense() if linear.weight.is_mkldnn else linear.weight  # a oneDNN-packed Linear
    setattr(parent, child, QuantLinear.quantize(weight, linear.bias, group_size, bits).train(parent.training))


def replace_with_quantized(model: nn.Module, group_size: int = 128, quantize: bool = False, bits: int = BITS,
                           vision: bool = False, lm_head: bool = False) -> None:
    """Swap the decoder's linears (see quantized_module_names) for QuantLinear: empty ones (to load an Int4
    checkpoint into), or, with `quantize`, ones quantized from the current weights."""
    for name in quantized_module_names(model, vision, lm_head):
        if quantize:
            quantize_linear(model, name, group_size, bits)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        new = QuantLinear(linear.in_features, linear.out_features, group_size, bits)
        setattr(parent, child, new.to(linear.weight.device) if not linear.weight.is_meta else new)


def has_float_bias(name: str, config) -> bool:
    """GPTQ stores a bias on every layer; the float architecture has one only on c_attn unless no_bias is off."""
    return name.endswith("attn.c_attn") or not config.no_bias


def to_linear(layer: QuantLinear, dtype: torch.dtype, bias: bool) -> nn.Module:
    """A float Linear holding `layer`'s dequantized weight (and its bias when the architecture has one)."""
    from .language import Linear

    linear = Linear(layer.in_features, layer.out_features, bias=bias, device=layer.scales.device, dtype=dtype)
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
