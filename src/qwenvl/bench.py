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


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: everything in the decoder but the embedding table."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if not name.startswith(("transformer.visual.", "transformer.wte.")))


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


def run(model, prompt_tokens: int = 64, decode_tokens: int = 32, repeats: int = 5, report=print) -> dict:
    """Measure and print; returns the numbers."""
    for name, value in (("prompt_tokens", prompt_tokens), ("decode_tokens", decode_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionsError(f"{name} must be a positive integer, got {value!r}")
    device, config = model.device, model.config
    size = config.visual.image_size
    pixels = torch.rand(1, 3, size, size, device=device)
    span = config.visual.n_queries
    start_id = config.visual.image_start_id
    text = torch.randint(0, 150000, (prompt_tokens,), device=device)
    # one image span (258 tokens) + text, like the reference's figures
    ids = torch.cat([torch.tensor([start_id], device=device), torch.full((span,), 151859, device=device),
                     torch.tensor([start_id + 1], device=device), text])[None]
    images = [pixels[0]]

    with torch.inference_mode():
        encode_s = _median_time(lambda: model.encode_images(images), device, repeats)
        prefill_s = _median_time(lambda: model.prefill(ids, None, images, decode_tokens), device, repeats)

        def decode():
            logits, cache, rows = model.prefill(ids, None, images, decode_tokens)
            token = logits.argmax(-1)
            _sync(device)
            start = time.perf_counter()
            for _ in range(decode_tokens):
                token = model.decode_step(token, cache, rows).argmax(-1)
            _sync(device)
            return (time.perf_counter() - start) / decode_tokens

        decode()  # warm-up
        per_token = statistics.median(decode() for _ in range(repeats))
    bandwidth = copy_bandwidth(device)
    weight_bytes = decode_weight_bytes(model)
    ceiling = bandwidth / weight_bytes
    params = sum(p.numel() for p in model.parameters())
    result = {
        "device": str(device), "dtype": str(model.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "parameters": params, "decode_weight_bytes": weight_bytes,
        "image_encode_s": encode_s, "prefill_s": prefill_s, "prefill_tokens": ids.shape[1],
        "decode_tokens_per_s": 1 / per_token, "copy_bandwidth_gb_s": bandwidth / 1e9,
        "ceiling_tokens_per_s": ceiling, "fraction_of_ceiling": (1 / per_token) / ceiling,
    }
    report(f"device {result['device']}  dtype {result['dtype']}  threads {result['threads']}  "
           f"parameters {params / 1e9:.3f}B  decode reads {weight_bytes / 1e9:.3f} GB/token")
    report(f"image encode (1 image)        {encode_s * 1e3:9.1f} ms")
    report(f"prefill ({ids.shape[1]} tokens, 1 image) {prefill_s * 1e3:9.1f} ms")
    report(f"decode, batch 1               {1 / per_token:9.2f} tokens/s  ({per_token * 1e3:.1f} ms/token)")
    report(f"memory copy bandwidth         {bandwidth / 1e9:9.2f} GB/s")
    report(f"bandwidth ceiling             {ceiling:9.2f} tokens/s")
    report(f"fraction of ceiling           {result['fraction_of_ceiling'] * 100:9.1f} %")
    if model.tp is not None:
        from .model.parallel import decode_traffic
        traffic = decode_traffic(config, model.tp.world, model.dtype.itemsize)
        result.update(tensor_parallel=model.tp.world, traffic=traffic)
        report(f"tensor parallel {model.tp.world} ranks: per decode step {traffic['all_reduces']} all-reduces x "
               f"{traffic['all_reduce_bytes']:,} B + logits all-gather {traffic['all_gather_bytes']:,} B; "
               f"each rank sends {traffic['sent_per_rank']:,} B (weights above are one rank's)")
    return result
