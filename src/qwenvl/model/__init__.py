from .qwen_vl import CausalLMOutput, QWenLMHeadModel

__all__ = ["CausalLMOutput", "QWenLMHeadModel"]
