"""PyTorch's packed low-bit matmul kernels (torch.ops.aten), per device, checked once against the plain formula.

int4: W[n, k] = (code - 8) * scale[k // g, n] + zero[k // g, n] (tinygemm's convention; g in 32..256).
  CPU: `_convert_weight_to_int4pack_for_cpu` / `_weight_int4pack_mm_for_cpu` (fp32, bf16, fp16 activations).
  CUDA: `_convert_weight_to_int4pack` / `_weight_int4pack_mm` (bf16 activations).
int8: y = x @ codes.T * scale[n] (`_weight_int8pack_mm`, one scale per output).
The packed int4 layout is undocumented and depends on the CPU's capability, so it is never decoded by hand:
`unpack_int4` learns where each code lands by packing probes (the base-16 digits of each code's position).
"""
from __future__ import annotations

import functools

import torch

INT4_GROUPS = (256, 128, 64, 32)  # group sizes the int4 kernels take, largest first
# From this many rows (tokens in one call: a prefill) a GEMM on the weight dequantized for the call beats the
# CPU kernels, whose cost grows with the rows as a GEMV's: one int8 (int4) dequantization and GEMM cost about
# as much as 30 (150) rows of the kernel (measured on 1024x5632, bf16, one thread).
DEQUANTIZE_ROWS = {8: 32, 4: 160}


def _aten(name: str):
    return getattr(torch.ops.aten, name, None)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes int32 [N, K] in 0..15 on the target device -> the device's packed layout."""
    if codes.device.type == "cuda":
        return _aten("_convert_weight_to_int4pack")(codes.to(torch.int32).contiguous(), 8)
    return _aten("_convert_weight_to_int4pack_for_cpu")(codes.to(torch.int32).contiguous(), 1)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scale_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N], with scale_zeros [K/g, N, 2] in x's dtype."""
    op = "_weight_int4pack_mm" if x.device.type == "cuda" else "_weight_int4pack_mm_for_cpu"
    return _aten(op)(x, packed, group, scale_zeros)


def int8_mm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (codes [N, K] int8 * scale[N]).T"""
    return torch.ops.aten._weight_int8pack_mm(x, codes, scale)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit field of a packed tensor, low nibble first, as int64 on the CPU."""
    raw = packed.contiguous().view(torch.uint8).flatten().cpu().to(torch.int64)
    return torch.stack([raw & 0xF, raw >> 4], 1).flatten()


@functools.lru_cache(maxsize=16)
def _int4_positions(n: int, k: int, device: str) -> torch.Tensor:
    """For each nibble of the packed layout, the flat index n*K + k of the code it holds (learned by probes)."""
    index = torch.arange(n * k, dtype=torch.int64)
    positions = torch.zeros(n * k, dtype=torch.int64)
    digit = 0
    while (16 ** digit) < n * k:
        probe = ((index >> (4 * digit)) & 0xF).reshape(n, k).to(torch.int32)
        positions |= _nibbles(pack_int4(probe.to(device))) << (4 * digit)
        digit += 1
    return positions


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `pack_int4`: the codes int32 [N, K] (on packed's device)."""
    codes = torch.empty(n * k, dtype=torch.int32)
    codes[_int4_positions(n, k, str(packed.device))] = _nibbles(packed).to(torch.int32)
    return codes.reshape(n, k).to(packed.device)


@functools.lru_cache(maxsize=None)
def int4_block(device: str) -> int | None:
    """The output block B of the CPU int4 layout when it is the plain blocked one (bytes [N/B, K, B/2]; byte d
    of block b at input k holds output b*B+d in its low nibble and b*B+B/2+d in its high one), checked by the
    probes; None where it is not (then only the kernel reads the packed codes)."""
    if device != "cpu":
        return None
    for block in (64, 32, 16):
        n, k = 2 * block, 64
        byte = torch.arange(n * k // 2).reshape(n // block, k, block // 2)
        b, kk, d = (byte // (k * block // 2)), (byte // (block // 2)) % k, byte % (block // 2)
        low, high = (b * block + d) * k + kk, (b * block + block // 2 + d) * k + kk
        try:
            if torch.equal(_int4_positions(n, k, device), torch.stack([low, high], -1).flatten()):
                return block
        except RuntimeError:
            return None
    return None


def dequantize_int4(packed: torch.Tensor, n: int, k: int, block: int, group: int,
                    scale_zeros: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] in scale_zeros' dtype from the CPU layout of int4_block (N a multiple of `block`)."""
    p = packed.view(n // block, k, block // 2)
    codes = torch.cat([p & 15, p >> 4], -1).transpose(1, 2).reshape(n, k // group, group)
    scale = scale_zeros[..., 0].t().contiguous()[..., None]  # [N, K/g, 1]
    zero = scale_zeros[..., 1].t().contiguous()[..., None] - 8 * scale
    return torch.addcmul(zero, codes.to(scale_zeros.dtype), scale).view(n, k)


@functools.lru_cache(maxsize=None)
def available(bits: int, device: str, dtype: torch.dtype) -> bool:
    """Whether the packed kernel for `bits` runs on `device` with `dtype` activations and agrees with the formula."""
    n, k, g = 32, 64, 32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, k, generator=gen)
    try:
        if bits == 4:
            if device.startswith("cuda") and dtype != torch.bfloat16:
                return False  # tinygemm takes bf16 activations only
            codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
            scale, zero = torch.rand(k // g, n, generator=gen) / 8, torch.randn(k // g, n, generator=gen) / 8
            weight = (codes - 8) * scale.repeat_interleave(g, 0).t() + zero.repeat_interleave(g, 0).t()
            sz = torch.stack([scale, zero], -1).to(device=device, dtype=dtype)
            got = int4_mm(x.to(device, dtype), pack_int4(codes.to(device)), g, sz)
            if not torch.equal(unpack_int4(pack_int4(codes.to(device)), n, k).cpu(), codes):
                return False
        elif bits == 8:
            codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
            scale = torch.rand(n, generator=gen) / 8
            weight = codes.float() * scale[:, None]
            got = int8_mm(x.to(device, dtype), codes.to(device), scale.to(device, dtype))
        else:
            return False
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return False
    want = x @ weight.t()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return bool(((got.float().cpu() - want).norm() <= tol * want.norm()).item())
