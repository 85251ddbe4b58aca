"""`qwenvl bench`: image-encode, prefill and decode speed, against the machine's memory-bandwidth ceiling.

Decoding one token at batch 1 reads every decoder weight except the embedding table once, so
tokens/s can be at most (memory bandwidth) / (those bytes). The bandwidth is measured here, on the
same machine, with a large tensor copy (read + write bytes per second, as STREAM's Copy counts them).
"""
from __future__ import annotations

import statistics
import time

import torch

from .config import QWenConfig, VisualConfig
from .errors import OptionsError
from .model.language import pack_for_cpu

RANDOM_CONFIGS = {
    # the golden checkpoint's shape
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, kv_channels=64, intermediate_size=512,
                 seq_length=256, visual=dict(width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=128)),
    # ~0.5B parameters: 0.46B language model (0.31B of it embeddings + lm_head) + a small ViT
    "0.5b": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8, kv_channels=128,
                 intermediate_size=5632, visual=dict(width=768, layers=6, heads=12, mlp_ratio=4.0, output_dim=1024)),
    # the real Qwen-VL / Qwen-VL-Chat shape, 9.6B parameters
    "9.6b": dict(),
}


def random_config(name: str) -> QWenConfig:
    if name not in RANDOM_CONFIGS:
        raise OptionsError(f"unknown random config {name!r}; choose from {', '.join(RANDOM_CONFIGS)}")
    spec = dict(RANDOM_CONFIGS[name])
    visual = VisualConfig(**spec.pop("visual", {}))
    return QWenConfig(**spec, visual=visual)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a model on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def random_model(config: QWenConfig, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 tensor_parallel: bool = False):
    """A model with small random weights (speed does not depend on their values). `tensor_parallel`: this
    rank's share, under torchrun; the same seed on every rank keeps the replicated weights equal."""
    from .model import QWenLMHeadModel, parallel

    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    if tensor_parallel:
        group = parallel.join(cuda=device.type == "cuda")
        device = group.device
        parallel.shard_model(model, group)
    weights = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    free = available_memory(device)
    if free is not None and weights * 1.3 + (1 << 30) > free:  # weights, packing, allocator slack, activations (measured)
        raise OptionsError(f"this config's weights take {weights / 1e9:.1f} GB in {str(dtype).replace('torch.', '')} "
                          f"and {device} has {free / 1e9:.1f} GB available: use a smaller config or a bigger device")
    generator = torch.Generator(device=device).manual_seed(seed)  # seeded on every device: TP ranks agree
    state = {}
    for name, p in model.state_dict(keep_vars=True).items():
        t = torch.empty(p.shape, dtype=dtype, device=device)  # in the target dtype: the 9.6B shape fits in 24 GB as bf16
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "ln_pre.weight", "ln_post.weight",
                          "ln_q.weight", "ln_kv.weight")):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=generator)
        state[name] = t
    model.load_state_dict(state, assign=True)
    pack_for_cpu(model)  # as from_pretrained does
    return model.eval()


def _held_tensors(module):
    from .model.quant import QuantLinear

    yield from module.parameters(recurse=False)
    yield from (b for b in module.buffers(recurse=False) if b is not None)
    if isinstance(module, QuantLinear) and module._kernel is not None:  # the packed form, and its casts
        yield from (t for t in module._kernel.values() if isinstance(t, torch.Tensor))


def decode_weight_bytes(model) -> int:
    """Bytes of weights the decoder holds, which one decode step reads: everything but the vision tower and
    the embedding table; for quantized layers their packed codes, scales, zeros and bias (each storage once)."""
    seen, total = set(), 0
    for name, module in model.named_modules():
        if name.startswith(("transformer.visual", "transformer.wte")):
            continue
        for t in _held_tensors(module):
            key = id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size() if t.is_mkldnn else t.untyped_storage().nbytes()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second moved (read + write) by copying a large buffer."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = _median_time(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / seconds


def _check_counts(**counts) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionsError(f"{name} must be a positive integer, got {value!r}")


def _timers(model, prompt_tokens: int, decode_tokens: int) -> dict:
    """Functions timing one image encode, one prefill and the mean decode step (seconds) of `model`, on
    one image span (258 tokens) + `prompt_tokens` text tokens, like the reference's figures."""
    device, config = model.device, model.config
    size = config.visual.image_size
    generator = torch.Generator().manual_seed(0)  # the same inputs for every model
    images = [torch.rand(3, size, size, generator=generator).to(device)]
    text = torch.randint(0, 150000, (prompt_tokens,), generator=generator)
    start_id = config.visual.image_start_id
    ids = torch.cat([torch.tensor([start_id]), torch.full((config.visual.n_queries,), 151859),
                     torch.tensor([start_id + 1]), text])[None].to(device)

    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    def decode():
        logits, cache, rows = model.prefill(ids, None, images, decode_tokens)
        token = logits.argmax(-1)

        def steps():
            nonlocal token
            for _ in range(decode_tokens):
                token = model.decode_step(token, cache, rows).argmax(-1)
        return timed(steps) / decode_tokens

    return {"image_encode_s": lambda: timed(lambda: model.encode_images(images)),
            "prefill_s": lambda: timed(lambda: model.prefill(ids, None, images, decode_tokens)),
            "decode_s": decode, "prefill_tokens": ids.shape[1]}


def measure(models: dict, prompt_tokens: int = 64, decode_tokens: int = 32, repeats: int = 5) -> dict:
    """{label: model} -> {label: figures}: medians of `repeats` rounds after one warm-up round; each round
    runs every model once in turn, so a change in the machine's load falls on all of them alike."""
    _check_counts(prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, repeats=repeats)
    timers = {label: _timers(model, prompt_tokens, decode_tokens) for label, model in models.items()}
    names = ("image_encode_s", "prefill_s", "decode_s")
    times = {label: {name: [] for name in names} for label in models}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for label, timer in timers.items():
                for name in names:
                    seconds = timer[name]()
                    if round_:  # round 0 warms up
                        times[label][name].append(seconds)
    results = {}
    for label, model in models.items():
        figures = {name: statistics.median(times[label][name]) for name in names}
        per_token = figures.pop("decode_s")
        results[label] = {**figures, "decode_tokens_per_s": 1 / per_token, "prefill_tokens": timers[label]["prefill_tokens"],
                          "decode_weight_bytes": decode_weight_bytes(model)}
    return results


def _header(model) -> dict:
    return {"device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "parameters": sum(p.numel() for p in model.parameters())}


def run(model, prompt_tokens: int = 64, decode_tokens: int = 32, repeats: int = 5, report=print) -> dict:
    """Measure one model and print; returns the numbers."""
    figures = measure({"": model}, prompt_tokens, decode_tokens, repeats)[""]
    bandwidth = copy_bandwidth(model.device)
    weight_bytes = figures["decode_weight_bytes"]
    ceiling = bandwidth / weight_bytes
    result = {**_header(model), **figures, "copy_bandwidth_gb_s": bandwidth / 1e9, "ceiling_tokens_per_s": ceiling,
              "fraction_of_ceiling": figures["decode_tokens_per_s"] / ceiling}
    speed = figures["decode_tokens_per_s"]
    report(f"device {result['device']}  dtype {result['dtype']}  threads {result['threads']}  "
           f"parameters {result['parameters'] / 1e9:.3f}B  decode reads {weight_bytes / 1e9:.3f} GB/token")
    report(f"image encode (1 image)        {figures['image_encode_s'] * 1e3:9.1f} ms")
    report(f"prefill ({figures['prefill_tokens']} tokens, 1 image) {figures['prefill_s'] * 1e3:9.1f} ms")
    report(f"decode, batch 1               {speed:9.2f} tokens/s  ({1e3 / speed:.1f} ms/token)")
    report(f"memory copy bandwidth         {bandwidth / 1e9:9.2f} GB/s")
    report(f"bandwidth ceiling             {ceiling:9.2f} tokens/s")
    report(f"fraction of ceiling           {result['fraction_of_ceiling'] * 100:9.1f} %")
    if model.tp is not None:
        from .model.parallel import decode_traffic
        traffic = decode_traffic(model.config, model.tp.world, model.dtype.itemsize)
        result.update(tensor_parallel=model.tp.world, traffic=traffic)
        report(f"tensor parallel {model.tp.world} ranks: per decode step {traffic['all_reduces']} all-reduces x "
               f"{traffic['all_reduce_bytes']:,} B + logits all-gather {traffic['all_gather_bytes']:,} B; "
               f"each rank sends {traffic['sent_per_rank']:,} B (weights above are one rank's)")
    return result


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def parse_modes(text: str) -> list[str]:
    """'int4,int8' -> ['int4', 'int8'] (each mode once, in the order given)."""
    from .model.quant import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise OptionsError(f"--quant takes a comma list of {', '.join(MODES)}, got {text!r}")
    return list(dict.fromkeys(modes))


def quantize_random(model, mode: str, lm_head: bool = False):
    """A random model's decoder linears (and with `lm_head` lm_head) quantized round-to-nearest, in memory,
    by the code `qwenvl quantize` writes checkpoints with."""
    from .model.quant import MODES, replace_with_quantized

    bits, group_size = MODES[mode]
    # in eval mode: the new layers pack their codes for the device's kernel, the float ones stay packed
    replace_with_quantized(model.eval(), group_size, quantize=True, bits=bits, lm_head=lm_head)
    return model


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def compare(models: dict, prompt_tokens: int = 64, decode_tokens: int = 32, repeats: int = 5, report=print) -> dict:
    """{mode: model}, the float baseline first: measure them in one run (rounds interleaved) and print each
    mode's figures and their ratio to the baseline's."""
    results = measure(models, prompt_tokens, decode_tokens, repeats)
    peak = peak_rss()  # before the bandwidth test's buffers
    base_label, base = next(iter(results.items()))
    first = next(iter(models.values()))
    header = _header(first)
    bandwidth = copy_bandwidth(first.device)
    report(f"device {header['device']}  activations {header['dtype']}  threads {header['threads']}  "
           f"prefill {base['prefill_tokens']} tokens (1 image)  decode {decode_tokens} tokens  "
           f"medians of {repeats} interleaved rounds")
    for label, r in results.items():
        r["ceiling_tokens_per_s"] = bandwidth / r["decode_weight_bytes"]
        speed = r["decode_tokens_per_s"]
        report(f"{label:5s} decode {speed:8.2f} tokens/s ({speed / base['decode_tokens_per_s']:.2f}x {base_label})  "
               f"prefill {r['prefill_s'] * 1e3:8.1f} ms ({r['prefill_s'] / base['prefill_s']:.2f}x {base_label}'s time)  "
               f"image encode {r['image_encode_s'] * 1e3:7.1f} ms  "
               f"decoder weights {r['decode_weight_bytes'] / 1e6:8.1f} MB "
               f"({r['decode_weight_bytes'] / base['decode_weight_bytes']:.2f}x {base_label})  "
               f"bandwidth ceiling {r['ceiling_tokens_per_s']:.2f} tokens/s")
    if peak is not None:
        report(f"process peak resident memory {peak / 1e9:.2f} GB (all {len(models)} models held at once)")
    return results
