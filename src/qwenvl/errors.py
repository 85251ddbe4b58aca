"""Errors a user can cause: one base type, one subclass per kind of input, each message naming the input.

`qwenvl` (the command line) turns a `QwenVLError`, and only that, into one line on stderr and exit
status 2; anything else is a bug and keeps its traceback. The base is a `ValueError`, so code that
caught `ValueError` before keeps working; the few kinds that were another built-in error (a missing
file, an unknown keyword) are that built-in error too.
"""
from __future__ import annotations


class QwenVLError(ValueError):
    """Something wrong with what a user gave: a file, an image, data, an option or a request."""


class CheckpointError(QwenVLError):
    """A checkpoint folder that cannot be loaded; the message names the file and the key."""


class MissingCheckpointFile(CheckpointError, FileNotFoundError):
    """A file a checkpoint folder must hold is not there (e.g. qwen.tiktoken)."""


class ImageError(QwenVLError):
    """An image that cannot be used (unreadable, too large, too slow to download); the message names it."""


class DataError(QwenVLError):
    """A training or benchmark file with problems; the message names the file and the record."""


class OptionsError(QwenVLError):
    """An option (generation setting, device, command-line value) out of its range; the message names it."""


class UnknownOptionError(OptionsError, TypeError):
    """A keyword argument that no surface knows (usually a typo)."""


class OutputExistsError(OptionsError, FileExistsError):
    """An output folder that already holds something."""


class RequestError(QwenVLError):
    """A prompt or conversation that cannot be run: too long, empty, or not in the expected shape."""


class DistributedError(QwenVLError, RuntimeError):
    """Tensor-parallel ranks out of step: a rank died, stalled past the collective timeout, or failed to join;
    the message names the rank."""
