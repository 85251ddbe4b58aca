"""The model's shape (`config.json`) and its decoding defaults (`generation_config.json`)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


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

    @classmethod
    def from_dict(cls, data: dict) -> "QWenConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"visual", "extra"}
        known = {k: v for k, v in data.items() if k in names}
        visual_names = {f.name for f in dataclasses.fields(VisualConfig)}
        visual = VisualConfig(**{k: v for k, v in (data.get("visual") or {}).items() if k in visual_names})
        extra = {k: v for k, v in data.items() if k not in names and k != "visual"}
        return cls(**known, visual=visual, extra=extra)

    @classmethod
    def from_json(cls, path: str) -> "QWenConfig":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("visual"), dict) or "hidden_size" not in data:
            raise ValueError(f"{path} is not a Qwen-VL config.json (it needs a 'visual' object and 'hidden_size')")
        return cls.from_dict(data)

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
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

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
