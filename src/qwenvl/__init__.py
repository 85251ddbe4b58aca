"""qwenvl: an exact, fast, pure-PyTorch runtime for the Qwen-VL family."""
from .boxes import parse_boxes, to_pixels
from .chat import make_context
from .config import GenerationConfig, QWenConfig
from .errors import CheckpointError, DataError, ImageError, OptionsError, QwenVLError, RequestError
from .images import ImageLimits, set_limits as set_image_limits
from .loading import from_pretrained, save_pretrained
from .model import QWenLMHeadModel
from .processor import Processor
from .tokenizer import QWenTokenizer

__version__ = "0.1.0"


class AutoModelForCausalLM:
    """`AutoModelForCausalLM.from_pretrained(path, bf16=..., device_map=..., trust_remote_code=...)`, as in the original."""

    from_pretrained = staticmethod(from_pretrained)


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(path, trust_remote_code=...)`, as in the original."""

    from_pretrained = staticmethod(QWenTokenizer.from_pretrained)


__all__ = [
    "AutoModelForCausalLM", "AutoTokenizer", "CheckpointError", "DataError", "GenerationConfig", "ImageError",
    "ImageLimits", "OptionsError", "Processor", "QWenConfig", "QWenLMHeadModel", "QWenTokenizer", "QwenVLError", "RequestError",
    "from_pretrained", "make_context", "parse_boxes", "save_pretrained", "set_image_limits", "to_pixels",
]
