"""Images: what users pass, how it rides inside the token ids, and how it becomes pixels.

An image in a prompt is `<img>REFERENCE</img>`, 258 tokens: the two tags around 256 positions.
A reference is a local path, an http(s) URL or a `data:` URI. As in the original, a reference of at
most 256 UTF-8 bytes is stored in the 256 positions as one id per byte (id == byte value), padded
with `<imgpad>`. A longer one (a data URI, a deep path) is stored as a marker byte 0xFF, which never
occurs in UTF-8, followed by a digest; the digest is resolved through an in-process registry that
the tokenizer fills when it encodes the reference.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SPAN = 256  # positions between <img> and </img>
IMAGE_PAD_ID = 151859
LONG_REFERENCE_MARKER = 0xFF
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
URL_TIMEOUT_S = 30


class ImageError(ValueError):
    """An image that cannot be used; the message names it."""


class _ReferenceRegistry:
    """digest -> reference for references too long to live in the ids. Bounded LRU, thread-safe."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 1 << 30):
        self._items: OrderedDict[bytes, str] = OrderedDict()
        self._bytes = 0
        self._max_entries, self._max_bytes = max_entries, max_bytes
        self._lock = threading.Lock()

    def put(self, reference: str) -> bytes:
        digest = hashlib.sha256(reference.encode("utf-8")).digest()
        with self._lock:
            if digest in self._items:
                self._items.move_to_end(digest)
                return digest
            self._items[digest] = reference
            self._bytes += len(reference)
            while len(self._items) > self._max_entries or self._bytes > self._max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return digest

    def get(self, digest: bytes) -> str | None:
        with self._lock:
            reference = self._items.get(digest)
            if reference is not None:
                self._items.move_to_end(digest)
            return reference


_registry = _ReferenceRegistry()


def short_label(reference: str, limit: int = 80) -> str:
    """A reference shortened for error messages (data URIs can be megabytes)."""
    if len(reference) <= limit:
        return reference
    head = (limit - 3) // 2
    return reference[:head] + "..." + reference[-(limit - 3 - head):]  # keep the end: a path's file name is there


def encode_reference(reference: str) -> list[int]:
    """The 256 ids that stand for `reference` between <img> and </img>."""
    raw = reference.encode("utf-8")
    if len(raw) > IMAGE_SPAN:
        raw = bytes([LONG_REFERENCE_MARKER]) + _registry.put(reference)
    return list(raw) + [IMAGE_PAD_ID] * (IMAGE_SPAN - len(raw))


def decode_reference(span_ids) -> str:
    """Inverse of `encode_reference`; `span_ids` are the ids between <img> and </img>."""
    span_ids = list(span_ids)
    if IMAGE_PAD_ID in span_ids:
        span_ids = span_ids[: span_ids.index(IMAGE_PAD_ID)]
    if any(not 0 <= i < 256 for i in span_ids):
        raise ImageError("an image span holds ids that are not reference bytes; was it built by the tokenizer?")
    raw = bytes(span_ids)
    if raw[:1] == bytes([LONG_REFERENCE_MARKER]):
        reference = _registry.get(raw[1:])
        if reference is None:
            raise ImageError(
                "an image span refers to a long image reference that this process no longer knows; "
                "tokenize the prompt again in this process"
            )
        return reference
    return raw.decode("utf-8", errors="replace")


def to_reference(image) -> str:
    """A string reference for anything a user may pass as an image: path, URL, data URI, bytes, PIL image."""
    if isinstance(image, Path):
        return str(image)
    if isinstance(image, str):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        raw = bytes(image)
        try:
            fmt = Image.open(io.BytesIO(raw)).format or "octet-stream"
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"the {len(raw)} bytes given as an image are not a readable picture") from e
        return f"data:image/{fmt.lower()};base64,{base64.b64encode(raw).decode('ascii')}"
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    raise ImageError(f"cannot use an object of type {type(image).__name__} as an image "
                     "(give a path, URL, data: URI, bytes or a PIL image)")


def _read_bytes(reference: str) -> bytes:
    if not reference:
        raise ImageError("empty image reference (<img></img>)")
    if reference.startswith("data:"):
        header, sep, payload = reference.partition(",")
        if not sep:
            raise ImageError(f"malformed data URI (no comma): {short_label(reference)}")
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=True)
            return urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"data URI with invalid base64: {short_label(reference)}") from e
    if reference.startswith(("http://", "https://")):
        request = urllib.request.Request(reference, headers={"User-Agent": "qwenvl"})
        try:
            with urllib.request.urlopen(request, timeout=URL_TIMEOUT_S) as response:
                return response.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ImageError(f"cannot download image {short_label(reference)}: {e}") from e
    path = os.path.expanduser(reference[7:] if reference.startswith("file://") else reference)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {short_label(reference)}") from None
    except OSError as e:
        raise ImageError(f"cannot read image {short_label(reference)}: {e.strerror or e}") from None


def load_image(image) -> Image.Image:
    """Open any accepted image input as a PIL image (not yet converted)."""
    if isinstance(image, Image.Image):
        return image
    reference = image if isinstance(image, str) else to_reference(image)
    raw = _read_bytes(reference)
    try:
        picture = Image.open(io.BytesIO(raw))
        picture.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"not a readable image: {short_label(reference)} ({e})") from None
    return picture


def _normalization_table() -> torch.Tensor:
    # [3, 256]: ((v / 255) - mean) / std, with exactly torchvision's float32 operations, for every byte v.
    v = torch.arange(256, dtype=torch.float32).div(255)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32)[:, None]
    return (v[None, :] - mean) / std


_TABLE = _normalization_table()


def preprocess(picture: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, bicubic resize to a square (aspect not kept), CLIP normalization: [3, size, size] float32.

    Bit-identical to the original's torchvision Resize(BICUBIC) + ToTensor + Normalize on a PIL image.
    """
    rgb = picture.convert("RGB").resize((image_size, image_size), resample=Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).long()
    return torch.gather(_TABLE, 1, pixels.reshape(3, -1)).reshape(3, image_size, image_size)
