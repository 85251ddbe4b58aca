"""The model's shape (`config.json`) and its decoding defaults (`generation_config.json`).

Both are checked when read, before any tensor is built: types, positive sizes, the divisibility the
layers need, and upper bounds far above any released Qwen-VL (a `num_hidden_layers` of 10,000,000
would otherwise build modules for minutes before failing).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .errors import CheckpointError

# (lowest, highest) of each size; the real Qwen-VL is well inside every range
LANGUAGE_SIZES = {"vocab_size": (1, 1 << 20), "hidden_size": (1, 1 << 16), "num_hidden_layers": (1, 1024),
                  "num_attention_heads": (1, 1024), "kv_channels": (4, 4096), "intermediate_size": (2, 1 << 20),
                  "seq_length": (2, 1 << 22), "max_position_embeddings": (1, 1 << 22)}
VISUAL_SIZES = {"image_size": (1, 8192), "patch_size": (1, 1024), "width": (1, 1 << 16), "layers": (1, 1024),
                "heads": (1, 1024), "output_dim": (128, 1 << 16), "image_start_id": (0, (1 << 20) - 3)}
FLAGS = ("use_dynamic_ntk", "use_logn_attn", "no_bias", "tie_word_embeddings", "bf16", "fp16", "fp32")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_sizes(obj, sizes: dict, prefix: str, problems: list[str]) -> None:
    for name, (low, high) in sizes.items():
        value = getattr(obj, name)
        if not _is_int(value):
            problems.append(f"{prefix}{name} must be an integer, got {value!r}")
        elif not low <= value <= high:
            problems.append(f"{prefix}{name} must be in [{low}, {high}], got {value}")


@dataclass
class VisualConfig:
    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    output_dim: int = 4096
    image_start_id: int = 151857
    n_queries: int = 256  # fixed by the architecture; not in config.json

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class QWenConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: float = 10000
    rotary_pct: float = 1.0
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    visual: VisualConfig = field(default_factory=VisualConfig)
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict)  # every other key of config.json, written back on save

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rotary_dim(self) -> int:
        return int(self.kv_channels * self.rotary_pct)

    def validate(self, source: str = "config.json") -> None:
        """Raise CheckpointError naming `source` and every wrong key, before anything is built from it."""
        problems: list[str] = []
        _check_sizes(self, LANGUAGE_SIZES, "", problems)
        for name, low, high in (("layer_norm_epsilon", 0, 1), ("rotary_emb_base", 1, 1e12), ("rotary_pct", 0, 1)):
            value = getattr(self, name)
            if not _is_number(value) or not low < value <= high:
                problems.append(f"{name} must be a number in ({low}, {high}], got {value!r}")
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            problems.append(f"quantization_config must be an object, got {self.quantization_config!r}")
        if not isinstance(self.visual, VisualConfig):
            problems.append(f"visual must be an object, got {self.visual!r}")
        else:
            v = self.visual
            _check_sizes(v, VISUAL_SIZES, "visual.", problems)
            if not _is_number(v.mlp_ratio) or not 0 < v.mlp_ratio <= 64:
                problems.append(f"visual.mlp_ratio must be a number in (0, 64], got {v.mlp_ratio!r}")
            if not problems:
                if v.width % v.heads:
                    problems.append(f"visual.width {v.width} must be divisible by visual.heads {v.heads}")
                if v.patch_size > v.image_size:
                    problems.append(f"visual.patch_size {v.patch_size} is larger than visual.image_size {v.image_size}")
                if v.output_dim % (v.output_dim // 128):
                    problems.append(f"visual.output_dim {v.output_dim} must be divisible by its "
                                    f"{v.output_dim // 128} resampler heads (output_dim // 128)")
                if v.output_dim != self.hidden_size:
                    problems.append(f"visual.output_dim {v.output_dim} must equal hidden_size {self.hidden_size} "
                                    "(image features take the place of token embeddings)")
                if v.image_start_id + 2 >= self.vocab_size:
                    problems.append(f"visual.image_start_id {v.image_start_id} needs <img>, </img> and <imgpad> "
                                    f"below vocab_size {self.vocab_size}")
                if v.mlp_width < 1:
                    problems.append(f"visual.width x visual.mlp_ratio is below 1 ({v.width} x {v.mlp_ratio})")
        if not problems:
            if self.intermediate_size % 2:
                problems.append(f"intermediate_size {self.intermediate_size} must be even (w1 and w2 take half each)")
            if self.rotary_dim < 4 or self.rotary_dim % 2:
                problems.append(f"kv_channels x rotary_pct = {self.rotary_dim} must be an even number of at least 4")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckpointError(f"{source}: {shown}")

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "QWenConfig":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} must hold a JSON object, got {type(data).__name__}")
        if not isinstance(data.get("visual", {}), dict):
            raise CheckpointError(f"{source}: visual must be an object, got {data['visual']!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"visual", "extra"}
        known = {k: v for k, v in data.items() if k in names}
        visual_names = {f.name for f in dataclasses.fields(VisualConfig)}
        visual = VisualConfig(**{k: v for k, v in (data.get("visual") or {}).items() if k in visual_names})
        extra = {k: v for k, v in data.items() if k not in names and k != "visual"}
        config = cls(**known, visual=visual, extra=extra)
        config.validate(source)
        return config

    @classmethod
    def from_json(cls, path: str) -> "QWenConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("visual"), dict) or "hidden_size" not in data:
            raise CheckpointError(f"{path} is not a Qwen-VL config.json (it needs a 'visual' object and 'hidden_size')")
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict:
        data = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("visual", "extra") or (f.name == "quantization_config" and self.quantization_config is None):
                continue
            data[f.name] = getattr(self, f.name)
        visual = dataclasses.asdict(self.visual)
        visual.pop("n_queries")
        data["visual"] = visual
        data.setdefault("model_type", "qwen")
        data.setdefault("architectures", ["QWenLMHeadModel"])
        return dict(sorted(data.items()))

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


@dataclass
class GenerationConfig:
    """Defaults of the chat checkpoint's generation_config.json; each can be overridden per call."""

    chat_format: str = "chatml"
    eos_token_id: int = 151643
    pad_token_id: int = 151643
    max_window_size: int = 6144
    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.5
    repetition_penalty: float = 1.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: str) -> "GenerationConfig":
        if not os.path.exists(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        config = cls(**known, extra={k: v for k, v in data.items() if k not in names})
        config.validate(path)
        return config

    def validate(self, source: str = "generation_config.json") -> None:
        """Types of the defaults (their ranges are checked with every call's options, in SamplingParams)."""
        problems = []
        for name in ("max_new_tokens", "max_window_size", "top_k", "pad_token_id"):
            if not _is_int(getattr(self, name)):
                problems.append(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not isinstance(self.do_sample, bool):
            problems.append(f"do_sample must be true or false, got {self.do_sample!r}")
        if not isinstance(self.chat_format, str):
            problems.append(f"chat_format must be a string, got {self.chat_format!r}")
        eos = self.eos_token_id
        if not (_is_int(eos) or isinstance(eos, list) and all(map(_is_int, eos))):
            problems.append(f"eos_token_id must be an integer or a list of integers, got {eos!r}")
        if problems:
            raise CheckpointError(f"{source}: " + "; ".join(problems))

    @classmethod
    def from_pretrained(cls, path, **ignored) -> "GenerationConfig":
        """A checkpoint folder's generation_config.json, as transformers' `GenerationConfig.from_pretrained`."""
        return cls.from_json(os.path.join(os.fspath(path), "generation_config.json"))

    def to_dict(self) -> dict:
        data = dict(self.extra)
        data.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return data

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
