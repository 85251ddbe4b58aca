"""device_map: the decoder blocks spread over devices, pipeline style (one device works at a time).

The head (vision tower, wte, ln_f, lm_head) stays on the first GPU; the blocks go over the visible GPUs in
order, in equal shares where memory allows (90 % of each GPU's free memory, or `max_memory`), the blocks that
fit nowhere on the CPU. Each block gets the hidden state moved to its device, and its KV cache beside it.
"""
from __future__ import annotations

import re
import sys

import torch

from ..config import QWenConfig
from ..errors import OptionsError

HEAD = ("transformer.wte", "transformer.visual", "transformer.ln_f", "lm_head")
FREE_FRACTION = 0.9  # of a GPU's free memory: room for activations, the KV cache and the allocator
UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(name: str, value) -> int:
    """20000000, "20GB", "18GiB", "500MiB" -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", str(value).lower())
    if not match:
        raise OptionsError(f"max_memory[{name!r}] must be bytes or a size like '20GiB', got {value!r}")
    return int(float(match.group(1)) * UNITS[match.group(2) or "b"])


def sizes(config: QWenConfig, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of the head and of one decoder block."""
    from .qwen_vl import QWenLMHeadModel

    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    nbytes = lambda module: sum(p.numel() for p in module.parameters()) * dtype.itemsize
    block = nbytes(model.transformer.h[0])
    return nbytes(model) - block * config.num_hidden_layers, block


def plan(config: QWenConfig, dtype: torch.dtype, memory: dict[str, int]) -> dict[str, str]:
    """Module name -> device, for budgets {device: bytes} (GPUs in order, then optionally "cpu")."""
    gpus = [d for d in memory if d != "cpu"]
    head, block = sizes(config, dtype)
    layers = config.num_hidden_layers
    if not gpus or memory[gpus[0]] < head:
        where = "no GPU is given" if not gpus else \
            f"{gpus[0]} has {memory[gpus[0]] / 1e9:.2f} GB for a head of {head / 1e9:.2f} GB"
        if head + layers * block > memory.get("cpu", 0):
            raise OptionsError(f"the model does not fit: {where}, and the CPU budget of "
                               f"{memory.get('cpu', 0) / 1e9:.2f} GB is below its {(head + layers * block) / 1e9:.2f} GB")
        return {name: "cpu" for name in HEAD} | {f"transformer.h.{i}": "cpu" for i in range(layers)}
    room = {d: (memory[d] - (head if d == gpus[0] else 0)) // block for d in gpus}
    counts = dict.fromkeys(gpus, 0)
    for _ in range(layers):  # one block at a time to the emptiest GPU with room: equal shares where possible
        open_gpus = [d for d in gpus if counts[d] < room[d]]
        if not open_gpus:
            break
        counts[min(open_gpus, key=lambda d: counts[d])] += 1
    offloaded = layers - sum(counts.values())
    if offloaded and offloaded * block > memory.get("cpu", 0):
        raise OptionsError(f"the model does not fit: {offloaded} blocks ({offloaded * block / 1e9:.2f} GB) fit on no "
                           f"GPU and the CPU budget is {memory.get('cpu', 0) / 1e9:.2f} GB")
    devices = [d for d in gpus for _ in range(counts[d])] + ["cpu"] * offloaded
    return {name: gpus[0] for name in HEAD} | {f"transformer.h.{i}": d for i, d in enumerate(devices)}


def available(max_memory: dict | None) -> dict[str, int]:
    """The budgets: max_memory as given, else 90 % of each visible GPU's free memory and the CPU's."""
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise OptionsError(f"max_memory must map devices to sizes, e.g. {{0: '20GiB', 'cpu': '60GiB'}}; "
                               f"got {max_memory!r}")
        out = {}
        for key, value in max_memory.items():
            device = f"cuda:{key}" if isinstance(key, int) and not isinstance(key, bool) else str(key)
            if device != "cpu" and not re.fullmatch(r"cuda:\d+", device):
                raise OptionsError(f"max_memory key {key!r} is not a device: use GPU indices (0, 1, ...) or 'cpu'")
            out[device] = parse_size(key, value)
        return dict(sorted(out.items(), key=lambda kv: (kv[0] == "cpu", kv[0])))
    from ..bench import available_memory

    out = {f"cuda:{i}": int(torch.cuda.mem_get_info(i)[0] * FREE_FRACTION) for i in range(torch.cuda.device_count())}
    out["cpu"] = int((available_memory(torch.device("cpu")) or 0) * FREE_FRACTION)
    return out


def check_map(config: QWenConfig, device_map: dict, resolve) -> dict[str, torch.device]:
    """An explicit {module name or prefix: device} -> {HEAD name or block: device}, every module placed once."""
    units = list(HEAD) + [f"transformer.h.{i}" for i in range(config.num_hidden_layers)]
    found: dict[str, tuple[int, torch.device]] = {}
    for key, value in device_map.items():
        if not isinstance(key, str):
            raise OptionsError(f"device_map key {key!r} must be a module name such as 'transformer.h.3'")
        covered = [u for u in units if key in ("", u) or u.startswith(key + ".")]
        if not covered:
            inside = any(key.startswith(u + ".") for u in units)
            raise OptionsError(f"device_map key {key!r} " + (
                "is inside a module that must stay on one device: place the whole block or head module" if inside
                else "names no module of this model: use transformer.wte, transformer.visual, transformer.h.N, "
                     "transformer.ln_f, lm_head (or a prefix such as transformer.h)"))
        try:
            device = resolve(value)
        except OptionsError as e:
            raise OptionsError(f"device_map[{key!r}]: {e}") from None
        for unit in covered:  # the longest (most specific) key wins
            if unit not in found or len(key) > found[unit][0]:
                found[unit] = (len(key), device)
    missing = [u for u in units if u not in found]
    if missing:
        raise OptionsError(f"device_map places no device for {', '.join(missing[:4])}"
                           f"{' and more' if len(missing) > 4 else ''}: every module needs one")
    placed = {u: device for u, (_, device) in found.items()}
    if len({placed[name] for name in HEAD}) > 1:
        raise OptionsError("device_map: transformer.wte, transformer.visual, transformer.ln_f and lm_head must be on "
                           f"one device, got {', '.join(f'{n}={placed[n]}' for n in HEAD)}")
    return placed


def device_of(placed: dict, name: str) -> torch.device:
    """The device of a checkpoint tensor under a placement."""
    parts = name.split(".")
    unit = ".".join(parts[:3]) if parts[:2] == ["transformer", "h"] else \
        ".".join(parts[:2]) if parts[0] == "transformer" else parts[0]
    return placed[unit]


def describe(placed: dict, config: QWenConfig) -> None:
    """One line: what went where."""
    head = placed[HEAD[0]]
    groups: list[list] = []
    for i in range(config.num_hidden_layers):
        device = placed[f"transformer.h.{i}"]
        if groups and groups[-1][0] == device:
            groups[-1][2] = i
        else:
            groups.append([device, i, i])
    blocks = ", ".join(f"{a}-{b} on {d}" if a != b else f"{a} on {d}" for d, a, b in groups)
    print(f"device_map: vision tower, wte, ln_f, lm_head on {head}; decoder blocks {blocks}", file=sys.stderr)
