"""Loading and saving checkpoints in the official layout (SPEC section 2).

Weights are read one shard at a time onto a model built without memory (meta device), safetensors
memory-mapped, so peak memory stays one model plus one shard's worth of conversion.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from .config import GenerationConfig, QWenConfig
from .errors import CheckpointError, OptionsError, OutputExistsError, UnknownOptionError
from .model import parallel, placement
from .model.language import pack_for_cpu
from .model.quant import MODES as QUANT_MODES, quantize_linear, quantized_module_names, replace_with_quantized
from .model.qwen_vl import QWenLMHeadModel

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Buffers some checkpoints carry that the model recomputes.
IGNORED_TAILS = {("rotary_emb", "inv_freq"), ("attn", "bias"), ("attn", "masked_bias")}
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def weight_files(path: str) -> list[str]:
    """The weight files of a checkpoint folder, in load order."""
    for name in INDEX_FILES:
        index = os.path.join(path, name)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            files = sorted(set(weight_map.values()))
            for shard in files:
                check_shard_name(shard, index)
                if not os.path.isfile(os.path.join(path, shard)):
                    raise CheckpointError(f"{index} lists shard {shard}, which is missing from {path}")
            return [os.path.join(path, f) for f in files]
    for name in WEIGHT_FILES:
        if os.path.exists(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise CheckpointError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES + INDEX_FILES)}")


def check_shard_name(shard: str, index: str) -> None:
    """A shard is a file name inside the checkpoint folder: no absolute path, no `..`, nothing outside."""
    parts = shard.replace("\\", "/").split("/")
    if not shard or os.path.isabs(shard) or os.path.splitdrive(shard)[0] or ".." in parts or "\0" in shard:
        raise CheckpointError(f"{index} names shard {shard!r}, which is not a file inside the checkpoint folder")


def read_shard(file: str, slices: bool = False):
    """Yield (name, tensor) of one weight file, lazily: safetensors memory-mapped, .bin mmapped when possible.
    `slices`: safetensors tensors come as slice objects, read only where indexed (tensor-parallel ranks)."""
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_slice(name) if slices else f.get_tensor(name)
            return
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"cannot read weight file {file}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    yield from state.items()


def resolve_dtype(config: QWenConfig, device: torch.device, torch_dtype=None, bf16=False, fp16=False, fp32=False):
    """The official precedence: explicit flags or torch_dtype, then config.json's flags, then the best the device runs."""
    if sum(map(bool, (bf16, fp16, fp32))) > 1:
        raise OptionsError("give at most one of bf16=True, fp16=True, fp32=True")
    if bf16 or fp16 or fp32:
        return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        if torch_dtype not in DTYPES:
            raise OptionsError(f"unknown torch_dtype {torch_dtype!r}; use one of {', '.join(sorted(DTYPES))} or 'auto'")
        return DTYPES[torch_dtype]
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if config.bf16 or config.fp16 or config.fp32:
        return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device_map) -> torch.device:
    """'auto' / None, 'cpu', 'cuda', 'cuda:N', an int N, a torch.device, or a one-device dict -> a device
    this machine has; anything else is an OptionsError that names it."""
    if device_map is None or device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise OptionsError("device_map dicts that split the model over several devices are not supported; "
                               "pass 'cpu', 'cuda', 'cuda:N' or 'auto'")
        device_map = devices.pop()
    try:
        if isinstance(device_map, bool) or not isinstance(device_map, (str, int, torch.device)):
            raise TypeError
        device = torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)
    except (RuntimeError, TypeError, ValueError):
        raise OptionsError(f"unknown device {device_map!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type not in DEVICE_TYPES:
        raise OptionsError(f"device {device_map!r} cannot run a model; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionsError(f"device {device_map!r} asks for CUDA, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise OptionsError(f"device {device_map!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise OptionsError(f"device {device_map!r} asks for MPS, but it is not available")
    return device


class _Progress:
    """One line on stderr, shown only for checkpoints large enough to make a user wait."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled, self.start = total, label, enabled, time.time()

    def update(self, done: int) -> None:
        if self.enabled:
            end = "\n" if done == self.total else ""
            print(f"\r{self.label}: {done}/{self.total} ({time.time() - self.start:.0f}s)", end=end,
                  file=sys.stderr, flush=True)


def load_weights(model: QWenLMHeadModel, files: list[str], dtype: torch.dtype, device,
                 progress: bool | None = None, shards: "parallel.Shards | None" = None,
                 quantizer: "OnLoadQuantizer | None" = None) -> None:
    """Fill a meta-device model from weight files, checking every name and shape. `shards`: a tensor-parallel
    rank's plan; shapes are checked against the full model's and only the rank's part is read. `device`: one
    device, or a function of the tensor's name (a device_map). `quantizer`: the linears it names keep the
    checkpoint's dtype and are quantized as soon as they are loaded, shard by shard."""
    expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
    if shards is not None:
        with torch.device("meta"):
            expected = {name: p.shape for name, p in QWenLMHeadModel(model.config).state_dict(keep_vars=True).items()}
    seen: set[str] = set()
    if progress is None:
        progress = sum(os.path.getsize(f) for f in files) > (1 << 30)
    bar = _Progress(len(files), "Loading checkpoint shards", progress)
    for n, file in enumerate(files, 1):
        tensors = {}
        for name, tensor in read_shard(file, slices=shards is not None):
            if tuple(name.split(".")[-2:]) in IGNORED_TAILS:
                continue
            if name not in expected:
                raise CheckpointError(f"{file} has a tensor the model does not know: {name} "
                                      "(is this a Qwen-VL checkpoint of this architecture?)")
            shape = tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(tensor.shape)
            if shape != tuple(expected[name]):
                raise CheckpointError(f"{file}: {name} has shape {shape}, config.json implies "
                                      f"{tuple(expected[name])}")
            if shards is not None:
                tensor = shards.take(name, tensor)
            # int4 codes stay integers and their scales fp16, as GPTQ stores them
            keep = not tensor.is_floating_point() or name.endswith(".scales") or \
                (quantizer is not None and name in quantizer.tensor_names)  # quantized from the stored values
            target = device(name) if callable(device) else device
            tensors[name] = tensor.to(device=target, dtype=None if keep else dtype)
            seen.add(name)
        model.load_state_dict(tensors, strict=False, assign=True)
        del tensors
        if quantizer is not None:
            quantizer(model)
        bar.update(n)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors the model needs: {shown}")


class OnLoadQuantizer:
    """from_pretrained(quantize=...): each linear it names is replaced by its round-to-nearest QuantLinear
    (the code `qwenvl quantize` writes checkpoints with) once its weight and bias are loaded, so the float
    decoder is never held whole: one shard's worth at most."""

    def __init__(self, model: QWenLMHeadModel, bits: int, group_size: int, vision: bool):
        self.bits, self.group_size, self.vision = bits, group_size, vision
        self.pending = quantized_module_names(model, vision=vision)
        self.tensor_names = {f"{name}.{part}" for name in self.pending for part in ("weight", "bias")}

    def __call__(self, model: QWenLMHeadModel) -> None:
        waiting = []
        for name in self.pending:
            linear = model.get_submodule(name)
            if linear.weight.is_meta or (linear.bias is not None and linear.bias.is_meta):
                waiting.append(name)  # its other tensor is in a later shard
            else:
                quantize_linear(model, name, self.group_size, self.bits)
        self.pending = waiting

    def config(self) -> dict:
        """The quantization_config of the result (GPTQ's; `quantized_vision` is qwenvl's own)."""
        q = {"bits": self.bits, "group_size": self.group_size, "desc_act": False, "sym": True, "quant_method": "gptq"}
        return {**q, "quantized_vision": True} if self.vision else q


def quantize_options(quantize, group_size, vision) -> tuple[int, int, bool] | None:
    """from_pretrained's quantize= ("int4" | "int8" | None), quantize_group_size= and quantize_vision= ->
    (bits, group size, vision) or None; a bad value is an OptionsError naming it."""
    if quantize is None:
        for name, value in (("quantize_group_size", group_size), ("quantize_vision", vision)):
            if value not in (None, False):
                raise OptionsError(f"{name}={value!r} goes with quantize='int4' or 'int8'")
        return None
    if not isinstance(quantize, str) or quantize not in QUANT_MODES:
        raise OptionsError(f"quantize must be 'int4', 'int8' or None, got {quantize!r}")
    bits, default = QUANT_MODES[quantize]
    group_size = default if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise OptionsError(f"quantize_group_size must be a positive integer or -1 (one group per output), "
                           f"got {group_size!r}")
    if not isinstance(vision, bool):
        raise OptionsError(f"quantize_vision must be True or False, got {vision!r}")
    return bits, group_size, vision


def quantization(config: QWenConfig, path: str) -> tuple[int, int, bool] | None:
    """(bits, group size, vision tower too) of a GPTQ 4- or 8-bit checkpoint (SPEC 8), None for a float one;
    others are refused."""
    q = config.quantization_config
    if not q:
        return None
    method, bits = q.get("quant_method", "gptq"), q.get("bits", 4)
    if method != "gptq" or bits not in (4, 8):
        raise CheckpointError(f"{path}/config.json: quantization {method} with {bits} bits is not supported "
                              "(only GPTQ 4-bit, as Qwen-VL-Chat-Int4, and GPTQ 8-bit)")
    group_size = q.get("group_size", 128)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise CheckpointError(f"{path}/config.json: quantization_config.group_size must be a positive integer "
                              f"or -1, got {group_size!r}")
    return bits, group_size, q.get("quantized_vision") is True


def check_folder(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json, so it is not a Qwen-VL checkpoint folder")
    return path


# transformers keywords that official examples pass and that change nothing here
IGNORED_KWARGS = {"trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "revision", "resume_download",
                  "local_files_only", "use_flash_attn", "attn_implementation", "cache_dir", "offload_folder"}


def from_pretrained(path, *, bf16: bool = False, fp16: bool = False, fp32: bool = False, torch_dtype=None,
                    device_map=None, max_memory=None, progress: bool | None = None, adapter=None,
                    tensor_parallel: bool = False, quantize: str | None = None, quantize_vision: bool = False,
                    quantize_group_size: int | None = None, **kwargs) -> QWenLMHeadModel:
    """Load an official Qwen-VL checkpoint folder; accepts the official keyword arguments. `adapter`: a LoRA
    adapter folder (PEFT's format, as `qwenvl finetune --lora` and the original's finetune.py write it) applied
    on top and merged, as the original's AutoPeftModelForCausalLM + merge_and_unload. `tensor_parallel`: under
    torchrun, this rank's share of the model (see model/parallel.py), on cuda:LOCAL_RANK or the CPU.
    `device_map`: a device, "auto", or {module: device}; "auto" with GPUs or `max_memory` ({0: "20GiB", "cpu":
    ...}) spreads the decoder blocks over the devices (see model/placement.py). `quantize`: "int8" or "int4",
    a float checkpoint's decoder linears (with `quantize_vision` the ViT blocks' too) quantized round-to-nearest
    while loading, as `qwenvl quantize` would write them (`quantize_group_size`: default 128 for int4, -1 for
    int8)."""
    unknown = sorted(set(kwargs) - IGNORED_KWARGS)
    if unknown:
        raise UnknownOptionError(f"from_pretrained got unknown keyword argument(s): {', '.join(unknown)}")
    path = check_folder(path)
    try:
        config = QWenConfig.from_json(os.path.join(path, "config.json"))
        generation_config = GenerationConfig.from_json(os.path.join(path, "generation_config.json"))
    except (OSError, UnicodeDecodeError) as e:  # an unreadable config file is a broken checkpoint
        raise CheckpointError(f"cannot read the config files of {path}: {e}") from None
    quantized = quantization(config, path)
    to_quantize = quantize_options(quantize, quantize_group_size, quantize_vision)
    if to_quantize and quantized:
        raise OptionsError(f"{path} is already quantized (GPTQ int{quantized[0]}): load it without quantize=")
    files = weight_files(path)
    placed, device = _placement(config, device_map, max_memory, tensor_parallel)
    dtype = resolve_dtype(config, device, torch_dtype, bf16, fp16, fp32)
    if placed == "auto":
        placed = {name: torch.device(d) for name, d in placement.plan(config, dtype, placement.available(max_memory)).items()}
        device = placed["lm_head"]
        if len(set(placed.values())) == 1:  # it all fits on one device
            placed = None
    with torch.device("meta"):
        model = QWenLMHeadModel(config, generation_config)
        if quantized:
            replace_with_quantized(model, quantized[1], bits=quantized[0], vision=quantized[2])
    quantizer = OnLoadQuantizer(model, *to_quantize) if to_quantize else None
    if quantizer is not None and adapter is not None:
        raise OptionsError("quantize= with an adapter: merge the adapter first (qwenvl merge), then quantize")
    shards = None
    if tensor_parallel:
        if quantized or quantizer is not None or adapter is not None:
            raise OptionsError("tensor_parallel=True runs float checkpoints only: for int4/int8 (or quantize=) use one process; "
                               "merge an adapter first (qwenvl merge)")
        parallel.check_sizes(config, int(os.environ.get("WORLD_SIZE", 1)))
        group = parallel.join(cuda=device.type == "cuda")
        device = group.device
        parallel.shard_model(model, group)
        shards = parallel.Shards(config, group.rank, group.world)
    target = device if placed is None else (lambda name: placement.device_of(placed, name))
    load_weights(model, files, dtype, target, progress, shards, quantizer)
    if quantizer is not None:
        config.quantization_config = quantizer.config()
    model.hf_device_map = {"": str(device)}
    if placed is not None:
        model.transformer.layer_devices = [placed[f"transformer.h.{i}"] for i in range(config.num_hidden_layers)]
        model.hf_device_map = {name: str(d) for name, d in placed.items()}
        placement.describe(placed, config)
    model.name_or_path = path
    if adapter is not None:
        from .train.adapters import attach_adapter
        attach_adapter(model, adapter)
    pack_for_cpu(model)
    return model.eval()


def _placement(config: QWenConfig, device_map, max_memory, tensor_parallel: bool):
    """(None, the device) for one device; (placement, head device) for an explicit map; ("auto", a device
    for the dtype) when the blocks are to be planned."""
    if max_memory is not None and device_map != "auto":
        raise OptionsError("max_memory goes with device_map='auto'")
    explicit = isinstance(device_map, dict) and set(device_map) != {""}
    auto = device_map == "auto" and (max_memory is not None or torch.cuda.is_available())
    if (explicit or max_memory is not None) and tensor_parallel:
        raise OptionsError("tensor_parallel=True places each rank on its own device: drop device_map / max_memory")
    if explicit:
        placed = placement.check_map(config, device_map, resolve_device)
        return placed, placed["lm_head"]
    if auto and not tensor_parallel:
        return "auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return None, resolve_device(device_map)


TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer_config.json")


def check_output_folder(out: str) -> None:
    """Refuse an output folder that already holds something (checked before any long work)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise OutputExistsError(f"{out} already exists and is not empty; remove it or choose another output folder")


def write_checkpoint(model: QWenLMHeadModel, out: str, tokenizer_from: str) -> str:
    """`save_pretrained` plus the tokenizer files of checkpoint `tokenizer_from`, written in a folder beside
    `out` and renamed into place at the end: a failure leaves nothing half-written."""
    import shutil
    import tempfile

    out = os.fspath(out)
    check_output_folder(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        save_pretrained(model, tmp)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tokenizer_from, name)):
                shutil.copy2(os.path.join(tokenizer_from, name), os.path.join(tmp, name))
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_pretrained(model: QWenLMHeadModel, path: str, max_shard_bytes: int = 2 << 30) -> None:
    """Write config, generation config and sharded safetensors + index in the official layout."""
    save_state_dict(model.state_dict(), model.config, model.generation_config, path, max_shard_bytes)


def save_state_dict(state: dict, config: QWenConfig, generation_config: GenerationConfig, path: str,
                    max_shard_bytes: int = 2 << 30) -> None:
    """`save_pretrained` for a bare state dict (e.g. one gathered from FSDP shards)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tmp = os.path.join(path, name + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, name))  # never leave a half-written shard under its real name
        weight_map.update({k: name for k in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config.save(path)
    generation_config.save(path)
