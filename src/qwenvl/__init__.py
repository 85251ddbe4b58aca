"""qwenvl: an exact, fast, pure-PyTorch runtime for the Qwen-VL family."""
__version__ = "0.1.0"
