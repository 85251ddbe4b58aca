"""What trains: freeze plans over the three parameter groups, the paper's stage presets, and LoRA (SPEC section 9).

Groups, by checkpoint name:
- `vit`: `transformer.visual.*` except the resampler (conv1, positional_embedding, ln_pre, resblocks).
- `resampler`: `transformer.visual.attn_pool.*` plus `transformer.visual.ln_post` and `transformer.visual.proj`,
  the adapter's output projection. (The original's full fine-tuning froze all of `visual` and re-enabled
  `attn_pool` only, so ln_post and proj stayed frozen with the ViT, while `attn_pool.pos_embed` became trainable.)
- `llm`: everything else (`transformer.wte`, `transformer.h.*`, `transformer.ln_f`, `lm_head`).
`transformer.visual.attn_pool.pos_embed` is a fixed 2D sin-cos table and is never trained.

LoRA goes through PEFT, injected in place (`peft.inject_adapter_in_model`), so the model stays a
`QWenLMHeadModel` (`model(input_ids=...)`, `generate`, `chat` work unchanged). Adapters are saved in PEFT's
format (`adapter_model.safetensors` keyed `base_model.model.<module>.lora_A.weight`, `adapter_config.json`),
the same names the original's `finetune.py` writes, so its adapters load here and these load in PEFT.
LoRA weights are float32 whatever the base's dtype, and nothing here depends on that dtype. Q-LoRA (LoRA over
the Int4 base, which needs a GPU) is not implemented: it needs PEFT to wrap the quantized linears; the calls
below would stay the same.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable

import torch
from torch import nn

from ..loading import TOKENIZER_FILES, CheckpointError

GROUPS = ("vit", "resampler", "llm")
RESAMPLER_PREFIXES = ("transformer.visual.attn_pool", "transformer.visual.ln_post", "transformer.visual.proj")
FIXED = ("transformer.visual.attn_pool.pos_embed",)  # never trained: a sin-cos table, not learned

# The paper's three stages (SPEC section 9): which groups train, and the input resolution.
STAGES = {
    1: {"train": frozenset({"vit", "resampler"}), "image_size": 224},  # pretraining, LLM frozen
    2: {"train": frozenset({"vit", "resampler", "llm"}), "image_size": 448},  # multi-task pretraining
    3: {"train": frozenset({"resampler", "llm"}), "image_size": 448},  # supervised fine-tuning, ViT frozen
}

ADAPTER = "default"  # PEFT's adapter name; stripped from saved keys as PEFT does
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # older PEFT versions (as the original's finetune.py may have used)
TRAINED_WEIGHTS = "trained_weights.safetensors"  # groups trained fully alongside LoRA, official names
SAVED_PREFIX = "base_model.model."  # PeftModel's prefix in adapter files
# wte / lm_head trained beside LoRA on a base model: PEFT's modules_to_save, kept in the adapter file as the
# original's finetune.py writes them (`base_model.model.transformer.wte.weight`)
MODULES_TO_SAVE = {"transformer.wte.weight": "wte", "lm_head.weight": "lm_head"}

# LoRA targets by name -> regexes of full module names. Full names, not PEFT's suffix lists: a suffix such as
# "c_proj" or "mlp.c_proj" would also catch the ViT's `resblocks.{i}.mlp.c_proj`.
LLM_LAYER = r"transformer\.h\.\d+\."
LLM_TARGETS = {"c_attn": r"attn\.c_attn", "attn.c_proj": r"attn\.c_proj", "w1": r"mlp\.w1", "w2": r"mlp\.w2",
               "mlp.c_proj": r"mlp\.c_proj"}  # within a decoder layer
VISION_TARGETS = {
    "vit": r"transformer\.visual\.transformer\.resblocks\.\d+\.(?:attn\.in_proj|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)",
    # The resampler's q/k/v projection is a raw Parameter (`attn.in_proj_weight`, nn.MultiheadAttention's
    # layout), not a module, so LoRA cannot wrap it; train it fully with the "resampler" group instead.
    "resampler": r"transformer\.visual\.attn_pool\.(?:kv_proj|attn\.out_proj)",
}
LORA_TARGETS = (*LLM_TARGETS, *VISION_TARGETS)
DEFAULT_TARGETS = ("c_attn", "attn.c_proj", "w1", "w2")  # the original's LoRA


# ---- groups and freeze plans ----------------------------------------------------------------------

def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def group_of(name: str) -> str:
    """The group ("vit", "resampler" or "llm") of a parameter or module name (PEFT's wrapped names too)."""
    if any(_under(name, p) for p in RESAMPLER_PREFIXES):
        return "resampler"
    if _under(name, "transformer.visual"):
        return "vit"
    return "llm"


def is_lora(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter (PEFT's `lora_A` / `lora_B` ... modules)."""
    return any(part.startswith("lora_") for part in name.split("."))


def official_name(name: str) -> str:
    """A base parameter's checkpoint name: PEFT's wrapper inserts `.base_layer` into wrapped modules' names."""
    return name.replace(".base_layer.", ".")


def check_groups(groups: Iterable[str] | str) -> set[str]:
    groups = {groups} if isinstance(groups, str) else set(groups)
    unknown = sorted(groups - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown parameter group(s) {', '.join(map(repr, unknown))}; "
                         f"valid groups are {', '.join(GROUPS)}")
    return groups


def apply_freeze_plan(model: nn.Module, train: Iterable[str] | str, keep_lora: bool = True) -> dict[str, dict[str, int]]:
    """Train exactly the groups in `train` (fully); freeze the rest. LoRA weights, if any, stay trainable
    unless `keep_lora` is False. Returns parameter counts {group: {"trainable": n, "frozen": n}} (numel),
    with a "lora" entry when the model has LoRA adapters."""
    train = check_groups(train)
    counts: dict[str, dict[str, int]] = {g: {"trainable": 0, "frozen": 0} for g in GROUPS}
    for name, p in model.named_parameters():
        if is_lora(name):
            group, trainable = "lora", keep_lora
            counts.setdefault("lora", {"trainable": 0, "frozen": 0})
        else:
            group = group_of(name)
            trainable = group in train and official_name(name) not in FIXED
        p.requires_grad_(trainable)
        counts[group]["trainable" if trainable else "frozen"] += p.numel()
    return counts


def stage_settings(stage: int) -> dict:
    """The paper's stage `stage` (1, 2 or 3): {"train": set of groups, "image_size": int}."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the paper's stages are {', '.join(map(str, STAGES))}")
    return {"train": set(STAGES[stage]["train"]), "image_size": STAGES[stage]["image_size"]}


# ---- LoRA -------------------------------------------------------------------------------------------

def lora_regex(model: nn.Module, targets: Iterable[str]) -> str:
    """One regex of full module names for PEFT's `target_modules`, from names in LORA_TARGETS."""
    targets = list(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; "
                         f"valid targets are {', '.join(LORA_TARGETS)}")
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {', '.join(LORA_TARGETS)}")
    parts = []
    llm = [LLM_TARGETS[t] for t in targets if t in LLM_TARGETS]
    if llm:
        parts.append(LLM_LAYER + "(?:" + "|".join(llm) + ")")
    parts += [VISION_TARGETS[t] for t in targets if t in VISION_TARGETS]
    if "resampler" in targets and not isinstance(model.transformer.visual.attn_pool.kv_proj, nn.Linear):
        # kv_proj is an identity when the ViT is as wide as the LLM: nothing to wrap there
        parts[parts.index(VISION_TARGETS["resampler"])] = r"transformer\.visual\.attn_pool\.attn\.out_proj"
    return parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> PEFT LoRA layer of every module LoRA wraps in `model`."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _unpack(model: nn.Module) -> None:
    from ..model.language import Linear
    from ..model.quant import QuantLinear

    for module in model.modules():
        if isinstance(module, Linear):
            module.unpack()  # PEFT reads and merges into `weight`; a oneDNN-packed one has no plain layout
        elif isinstance(module, QuantLinear):
            module.unpack_kernel()  # PEFT reads `qweight`


def _inject(model: nn.Module, config) -> nn.Module:
    from peft import inject_adapter_in_model

    if getattr(model, "peft_config", None):
        raise ValueError("the model already has LoRA adapters (add_lora or load_adapter was called before)")
    from peft.tuners.lora.gptq import GPTQLoraLinear

    from ..model.quant import QuantLinear

    _unpack(model)
    # Q-LoRA: on an int4 base, PEFT's GPTQ LoRA layer adds B(A(x)) to the frozen quantized layer's output
    config._register_custom_module({QuantLinear: GPTQLoraLinear})
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for module in lora_modules(model).values():
        module.__dict__.pop("qweight", None)  # PEFT's copy of the base's qweight would outlive its re-packing
    model.train(model.training)  # new LoRA modules start in training mode: dropout would be on in an eval model
    for name, p in model.named_parameters():
        if is_lora(name):  # float32 adapters on any base: bf16 updates of a 1e-4-scale delta would round away
            p.data = p.data.float()
    return model


def add_lora(model: nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, r: int = 64, alpha: int = 16,
             dropout: float = 0.05, extra: Iterable[str] = ()) -> nn.Module:
    """Wrap the target linears with LoRA (in place; returns the same model). Afterwards only the LoRA weights
    train; call `apply_freeze_plan(model, groups)` after this to also train whole groups.

    Targets (`targets` + `extra`) are names of LORA_TARGETS: the LLM's "c_attn", "attn.c_proj", "w1", "w2"
    (the default, the original's choice) and "mlp.c_proj"; "vit" (every ViT block's in_proj, out_proj, c_fc,
    c_proj); "resampler" (attn_pool.kv_proj and attn_pool.attn.out_proj). B starts at zero, so the
    model's output is unchanged until training moves it.
    """
    from peft import LoraConfig

    if r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=lora_regex(model, [*targets, *extra]))
    config.base_model_name_or_path = getattr(model, "name_or_path", None)
    return _inject(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (W += scale * B @ A, computed in float32) and put the plain
    module back, so the model and its state dict are the official ones again. In place; returns the model."""
    from ..model.language import Linear
    from ..model.quant import QuantLinear, has_float_bias, to_linear

    for name, module in lora_modules(model).items():
        base = module.get_base_layer()
        if isinstance(base, Linear):
            base.unpack()  # a oneDNN-packed weight (bf16 inference) has no plain layout to add to
        with torch.no_grad():
            if isinstance(base, QuantLinear):  # Q-LoRA: the update goes into the dequantized weight
                delta = (module.lora_B[ADAPTER].weight.float() @ module.lora_A[ADAPTER].weight.float()) \
                    * module.scaling[ADAPTER]
                base = to_linear(base, model.dtype, has_float_bias(name, model.config))
            else:
                delta = module.get_delta_weight(ADAPTER).float()  # float32: LoRA weights are float32
            base.weight.data = (base.weight.data.float() + delta).to(base.weight.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, base)
    if any(isinstance(m, QuantLinear) for m in model.modules()):  # Q-LoRA: the merged model is a float one
        from ..model.quant import dequantize_model
        dequantize_model(model, model.dtype)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


# ---- saving and loading adapters --------------------------------------------------------------------

def _saved_key(name: str) -> str:
    """transformer.h.0.attn.c_attn.lora_A.default.weight -> base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"""
    return SAVED_PREFIX + name.replace(f".{ADAPTER}.", ".")


def _write_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)


def save_adapter(model: nn.Module, directory, state_dict: dict | None = None) -> str:
    """Write the LoRA weights (`adapter_model.safetensors`) and `adapter_config.json` in PEFT's format; weights
    of fully trained (non-LoRA, requires_grad) parameters go to `trained_weights.safetensors` under their
    official names, except wte and lm_head, which go beside the LoRA weights as PEFT's `modules_to_save`
    (listed in the config), as the original's finetune.py saves them for a base model.
    `state_dict` (e.g. gathered from FSDP shards) replaces `model.state_dict()`."""
    config = (getattr(model, "peft_config", None) or {}).get(ADAPTER)
    if config is None:
        raise ValueError("the model has no LoRA adapter to save; call add_lora first (or save the whole model "
                         "with qwenvl.save_pretrained)")
    directory = os.fspath(directory)
    state = model.state_dict() if state_dict is None else state_dict
    lora = {_saved_key(k): v for k, v in state.items() if is_lora(k)}
    trained_names = [n for n, p in model.named_parameters() if p.requires_grad and not is_lora(n)]
    missing = [n for n in trained_names if n not in state]
    if missing:
        raise ValueError(f"the state dict lacks {len(missing)} trained parameters, e.g. {missing[0]}")
    trained = {official_name(n): state[n] for n in trained_names}
    saved = {n: trained.pop(n) for n in list(trained) if n in MODULES_TO_SAVE}
    lora.update({SAVED_PREFIX + n: t for n, t in saved.items()})
    os.makedirs(directory, exist_ok=True)
    _write_safetensors(lora, os.path.join(directory, ADAPTER_WEIGHTS))
    config = copy.deepcopy(config)
    config.modules_to_save = [MODULES_TO_SAVE[n] for n in MODULES_TO_SAVE if n in saved] or None
    config.save_pretrained(directory)
    trained_path = os.path.join(directory, TRAINED_WEIGHTS)
    if trained:
        groups = sorted({group_of(n) for n in trained})
        _write_safetensors(trained, trained_path, {"groups": ",".join(groups)})
    elif os.path.exists(trained_path):
        os.remove(trained_path)  # a stale file from an earlier save would be applied on load
    return directory


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: say which one
        raise CheckpointError(f"cannot read adapter weights {path}: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def read_adapter_config(directory: str):
    """The LoraConfig of an adapter folder, checked to be a plain LoRA this module can apply and merge."""
    from peft import LoraConfig

    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isdir(directory):
        raise CheckpointError(f"adapter folder not found: {directory}")
    if not os.path.exists(path):
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG}, so it is not a PEFT LoRA adapter folder")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} does not describe a LoRA adapter (peft_type "
                              f"{data.get('peft_type') if isinstance(data, dict) else None!r})")
    try:
        config = LoraConfig.from_pretrained(directory)
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid LoRA config: {e}") from None
    unsupported = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out") if getattr(config, k, False)]
    if unsupported:
        raise CheckpointError(f"{path} sets {', '.join(unsupported)}; only plain LoRA adapters are supported")
    return config


def load_adapter(model: nn.Module, directory) -> nn.Module:
    """Apply a saved adapter to `model` (a model without LoRA; in place, returns it): injects LoRA as
    `adapter_config.json` describes, loads the LoRA weights, and fully trained weights if present.
    Reads adapters of the original's finetune.py too (including PEFT `modules_to_save` weights such as
    wte / lm_head, which replace those parameters). Names and shapes are checked against the model."""
    directory = os.fspath(directory)
    config = read_adapter_config(directory)
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.exists(weights):
        weights = os.path.join(directory, ADAPTER_WEIGHTS_BIN)
        if not os.path.exists(weights):
            raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS} (nor {ADAPTER_WEIGHTS_BIN})")
    saved = _read_tensors(weights)
    if getattr(model, "peft_config", None):
        raise ValueError("the model already has LoRA adapters; load the adapter into a model without them")
    config.modules_to_save = None  # their weights are in the file and are copied in below, under official names
    try:
        _inject(model, config)
    except ValueError as e:  # PEFT: no module matches target_modules
        raise CheckpointError(f"{os.path.join(directory, ADAPTER_CONFIG)}: its target_modules do not fit "
                              f"this model ({e}); is the adapter for another architecture?") from None
    params = dict(model.named_parameters())
    expected_lora = {_saved_key(n) for n in params if is_lora(n)}
    base_by_official = {official_name(n): p for n, p in params.items() if not is_lora(n)}
    lora_values, full_values = {}, {}
    for key, tensor in saved.items():
        name = key[len(SAVED_PREFIX):] if key.startswith(SAVED_PREFIX) else key
        if is_lora(name):
            target = name.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}.")
            if SAVED_PREFIX + name not in expected_lora:
                raise CheckpointError(f"{weights} has {key}, which names no LoRA layer of this model "
                                      "(is the adapter for another architecture?)")
            lora_values[target] = tensor
        elif name in base_by_official:  # PEFT modules_to_save: the whole parameter, trained
            full_values[name] = tensor
        else:
            raise CheckpointError(f"{weights} has {key}, which this model does not have "
                                  "(is the adapter for another architecture?)")
    missing = sorted(expected_lora - {_saved_key(n) for n in lora_values})
    if missing:
        raise CheckpointError(f"{weights} lacks {len(missing)} LoRA weights this model's adapter needs, e.g. "
                              f"{missing[0]} (is the adapter for another architecture?)")
    trained_path = os.path.join(directory, TRAINED_WEIGHTS)
    if os.path.exists(trained_path):
        for name, tensor in _read_tensors(trained_path).items():
            if name not in base_by_official:
                raise CheckpointError(f"{trained_path} has {name}, which this model does not have "
                                      "(is it for another architecture?)")
            full_values[name] = tensor
    with torch.no_grad():
        for file, values, lookup in ((weights, lora_values, params), (trained_path, full_values, base_by_official)):
            for name, tensor in values.items():
                p = lookup[name]
                if tuple(tensor.shape) != tuple(p.shape):
                    raise CheckpointError(f"{file}: {name} has shape {tuple(tensor.shape)}, this model needs "
                                          f"{tuple(p.shape)} (is the adapter for another model size?)")
        for values, lookup in ((lora_values, params), (full_values, base_by_official)):
            for name, tensor in values.items():
                lookup[name].copy_(tensor.to(lookup[name].dtype))
    return model


# ---- merging ----------------------------------------------------------------------------------------

def attach_adapter(model: nn.Module, directory) -> nn.Module:
    """`from_pretrained(base, adapter=directory)`: the adapter loaded and merged into the weights (an inference
    model, as fast as the base); over an Int4 base it stays beside the quantized layers (Q-LoRA)."""
    model.eval()
    load_adapter(model, directory)
    if not model.config.quantization_config:
        merge_lora(model)
    return model.eval()


def merge_adapter(base_dir, adapter_dir, out_dir, dtype: torch.dtype | str | None = None) -> str:
    """Base checkpoint + adapter -> a full official-layout checkpoint in `out_dir` (weights, config, tokenizer).

    The merge is computed in float32 and the result stored in `dtype` (default: the base's precision as its
    config.json declares it, bf16 for the published checkpoints; float32 when it declares none). Written to a
    temporary folder beside `out_dir` and renamed at the end, so a failure leaves nothing behind.
    """
    from .. import loading

    base_dir, adapter_dir, out_dir = os.fspath(base_dir), os.fspath(adapter_dir), os.fspath(out_dir)
    loading.check_folder(base_dir)
    read_adapter_config(adapter_dir)  # fail on a bad adapter before loading a large base
    for name in TOKENIZER_FILES:
        if not os.path.exists(os.path.join(base_dir, name)):
            raise CheckpointError(f"{base_dir} has no {name}; the merged checkpoint needs the base's tokenizer files")
    loading.check_output_folder(out_dir)

    model = loading.from_pretrained(base_dir, torch_dtype=dtype, device_map="cpu", progress=None)
    if model.config.quantization_config:  # a Q-LoRA adapter merges into the dequantized base
        from ..model.quant import dequantize_model
        dequantize_model(model, model.dtype)
    load_adapter(model, adapter_dir)
    merge_lora(model)
    return loading.write_checkpoint(model, out_dir, tokenizer_from=base_dir)
