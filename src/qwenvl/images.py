"""Images: what users pass, how it rides inside the token ids, and how it becomes pixels.

An image in a prompt is `<img>REFERENCE</img>`, 258 tokens: the two tags around 256 positions.
A reference is a local path, an http(s) URL or a `data:` URI. As in the original, a reference of at
most 256 UTF-8 bytes is stored in the 256 positions as one id per byte (id == byte value), padded
with `<imgpad>`. A longer one (a data URI, a deep path) is stored as a marker byte 0xFF, which never
occurs in UTF-8, followed by a digest; the digest is resolved through an in-process registry that
the tokenizer fills when it encodes the reference.

Every image is read through one loader with limits (`ImageLimits`), shared by the library, the command
line and the model: regular files only, a byte cap on files, data URIs and downloads, one deadline per
download, and a pixel cap read from the header before anything is decoded. The model sees 448x448, so
the default cap (25 million pixels, a 24 MP photo) is generous; a 12000x12000 PNG of 420 KB would
otherwise take 1.6 GB to decode.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import http.client
import io
import os
import socket
import stat
import threading
import time
import urllib.parse
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ImageError, OptionsError, QwenVLError

IMAGE_SPAN = 256  # positions between <img> and </img>
IMAGE_PAD_ID = 151859
LONG_REFERENCE_MARKER = 0xFF
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class ImageLimits:
    """What reading one image may cost. The defaults come from QWENVL_MAX_IMAGE_BYTES,
    QWENVL_MAX_IMAGE_PIXELS and QWENVL_IMAGE_TIMEOUT when set."""

    max_bytes: int = 32 << 20  # file, data URI or download
    max_pixels: int = 25_000_000  # width x height, from the header
    timeout_s: float = 30.0  # one whole download, redirects included

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionsError(f"image limit {name} must be a positive integer, got {value!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not 0 < self.timeout_s < float("inf"):
            raise OptionsError(f"image limit timeout_s must be a positive number of seconds, got {self.timeout_s!r}")

    @classmethod
    def from_env(cls, environ=os.environ) -> "ImageLimits":
        changes = {}
        for field_name, variable, kind in (("max_bytes", "QWENVL_MAX_IMAGE_BYTES", int),
                                           ("max_pixels", "QWENVL_MAX_IMAGE_PIXELS", int),
                                           ("timeout_s", "QWENVL_IMAGE_TIMEOUT", float)):
            if environ.get(variable):
                try:
                    changes[field_name] = kind(environ[variable])
                except ValueError:
                    raise OptionsError(f"{variable}={environ[variable]!r} is not a number") from None
        return cls(**changes)


_limits: ImageLimits | None = None  # read from the environment at first use, so a bad value is a clean error


def current_limits() -> ImageLimits:
    """The process-wide image limits."""
    global _limits
    if _limits is None:
        _limits = ImageLimits.from_env()
    return _limits


def set_limits(**changes) -> ImageLimits:
    """Change the process-wide image limits (e.g. `set_limits(max_pixels=50_000_000)`); returns the old ones."""
    global _limits
    old = current_limits()
    _limits = dataclasses.replace(old, **changes)
    return old


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
        if len(raw) > current_limits().max_bytes:
            raise ImageError(_too_many_bytes("the image given as bytes", len(raw), current_limits()))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                fmt = Image.open(io.BytesIO(raw)).format or "octet-stream"
        except Exception as e:  # any decoder's failure on foreign bytes (pixels are checked when loaded)
            raise ImageError(f"the {len(raw)} bytes given as an image are not a readable picture") from e
        return f"data:image/{fmt.lower()};base64,{base64.b64encode(raw).decode('ascii')}"
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    raise ImageError(f"cannot use an object of type {type(image).__name__} as an image "
                     "(give a path, URL, data: URI, bytes or a PIL image)")


def _read_bytes(reference: str, limits: ImageLimits) -> bytes:
    if not reference:
        raise ImageError("empty image reference (<img></img>)")
    if reference.startswith("data:"):
        header, sep, payload = reference.partition(",")
        if not sep:
            raise ImageError(f"malformed data URI (no comma): {short_label(reference)}")
        is_base64 = header.endswith(";base64")
        size = len(payload) * 3 // 4 if is_base64 else len(payload)  # decoded size, at most
        if size > limits.max_bytes:
            raise ImageError(_too_many_bytes(f"the data URI {short_label(reference)}", size, limits))
        try:
            raw = base64.b64decode(payload, validate=True) if is_base64 else urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"data URI with invalid base64: {short_label(reference)}") from e
        if len(raw) > limits.max_bytes:
            raise ImageError(_too_many_bytes(f"the data URI {short_label(reference)}", len(raw), limits))
        return raw
    if reference.startswith(("http://", "https://")):
        return download(reference, limits)
    return _read_file(reference, limits)


def _too_many_bytes(what: str, size: int, limits: ImageLimits) -> str:
    return (f"{what} holds {size} bytes, over the image limit of {limits.max_bytes} "
            "(raise it with --max-image-bytes or QWENVL_MAX_IMAGE_BYTES)")


def _read_file(reference: str, limits: ImageLimits) -> bytes:
    """A regular file's bytes, at most `limits.max_bytes`; FIFOs, devices and folders are refused unopened."""
    path = os.path.expanduser(reference[7:] if reference.startswith("file://") else reference)
    label = short_label(reference)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageError(f"image {label} is not a regular file (a folder, pipe or device cannot be an image)")
        # non-blocking: a FIFO swapped in after the check must not hang the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(f"image file not found: {label}") from None
    except OSError as e:
        raise ImageError(f"cannot read image {label}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"image {label} is not a regular file (a folder, pipe or device cannot be an image)")
        if info.st_size > limits.max_bytes:
            raise ImageError(_too_many_bytes(f"image file {label}", info.st_size, limits))
        try:
            raw = f.read(limits.max_bytes + 1)
        except OSError as e:
            raise ImageError(f"cannot read image {label}: {e.strerror or e}") from None
    if len(raw) > limits.max_bytes:  # it grew after the size check
        raise ImageError(_too_many_bytes(f"image file {label}", len(raw), limits))
    return raw


def _plain_connection(parts, timeout: float, label: str) -> http.client.HTTPConnection:
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageError(f"cannot download image {label}: {parts.geturl()!r} is not an http(s) URL")
    connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_type(parts.hostname, parts.port, timeout=timeout)
    connection.connect()
    return connection


def download(url: str, limits: ImageLimits, label: str | None = None, connect=_plain_connection,
             too_large=None, timeout_hint: str = "raise it with --image-timeout or QWENVL_IMAGE_TIMEOUT") -> bytes:
    """GET `url` (following a few redirects): at most `limits.max_bytes`, all within `limits.timeout_s`.

    The deadline covers the whole download, not each read: a timer shuts the socket when it passes, so a
    server that trickles one byte at a time (or stalls in its headers) cannot keep us waiting. `connect(parts,
    timeout, label)` opens each hop's connection (the server's checks every address and redirect there);
    `too_large(size)` makes the error for a body over the byte cap.
    """
    label = label or short_label(url)
    too_large = too_large or (lambda size: ImageError(_too_many_bytes(f"the download {label}", size, limits)))
    deadline = time.monotonic() + limits.timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        connection = timer = None
        try:
            connection = connect(parts, max(deadline - time.monotonic(), 1e-3), label)
            sock = connection.sock  # kept: the connection lets go of it once the response is under way
            timer = threading.Timer(max(deadline - time.monotonic(), 0.0), _shut, (sock,))
            timer.daemon = True
            timer.start()
            target = parts.path or "/"
            connection.request("GET", target + (f"?{parts.query}" if parts.query else ""),
                               headers={"User-Agent": "qwenvl", "Accept": "image/*"})
            response = connection.getresponse()
            location = response.getheader("Location")
            if response.status in (301, 302, 303, 307, 308) and location:
                url = urllib.parse.urljoin(url, location)
                continue  # the next hop is connected (and checked) like the first
            if response.status != 200:
                raise ImageError(f"cannot download image {label}: HTTP {response.status} {response.reason}")
            declared = response.getheader("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise too_large(int(declared))
            body, size = [], 0
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                chunk = response.read1(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > limits.max_bytes:
                    raise too_large(size)
                body.append(chunk)
            if time.monotonic() >= deadline:
                raise TimeoutError
            if response.length:  # the server closed before the Content-Length it announced
                raise http.client.IncompleteRead(b"", response.length)
            return b"".join(body)
        except QwenVLError:
            raise
        except (http.client.HTTPException, OSError, ValueError) as e:
            if time.monotonic() >= deadline - 0.01:
                raise ImageError(f"cannot download image {label}: not done within {limits.timeout_s:g} s "
                                 f"({timeout_hint})") from None
            raise ImageError(f"cannot download image {label}: {e or type(e).__name__}") from None
        finally:
            if timer is not None:
                timer.cancel()
            if connection is not None:
                connection.close()
    raise ImageError(f"cannot download image {label}: more than {MAX_REDIRECTS} redirects")


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read at once (close alone may not)
    except OSError:
        pass


def open_image(raw: bytes, label: str, limits: ImageLimits | None = None) -> Image.Image:
    """Decode image bytes, checking the pixel count from the header before any pixel is decoded."""
    limits = limits or current_limits()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel cap below decides
            picture = Image.open(io.BytesIO(raw))
            width, height = picture.size
            if width * height > limits.max_pixels:
                raise ImageError(_too_many_pixels(label, width, height, limits))
            picture.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow refuses above twice its own limit, before our check
        raise ImageError(f"image {label} is too large to decode ({e}); the limit is {limits.max_pixels} pixels "
                         "(the model sees it at 448x448)") from None
    except Exception as e:  # a damaged file can fail in any of Pillow's decoders; it is still the file's fault
        raise ImageError(f"not a readable image: {label} ({type(e).__name__}: {e})") from None
    return picture


def _too_many_pixels(label: str, width: int, height: int, limits: ImageLimits) -> str:
    return (f"image {label} is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} "
            "(the model sees it at 448x448; raise it with --max-image-pixels or QWENVL_MAX_IMAGE_PIXELS)")


def load_image(image, limits: ImageLimits | None = None) -> Image.Image:
    """Open any accepted image input as a PIL image (not yet converted), within `limits` (default:
    `current_limits()`)."""
    if isinstance(image, Image.Image):
        return image
    limits = limits or current_limits()
    reference = image if isinstance(image, str) else to_reference(image)
    return open_image(_read_bytes(reference, limits), short_label(reference), limits)


def _normalization_table() -> torch.Tensor:
    # [3, 256]: ((v / 255) - mean) / std, with exactly torchvision's float32 operations, for every byte v.
    v = torch.arange(256, dtype=torch.float32).div(255)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32)[:, None]
    return (v[None, :] - mean) / std


_TABLE = _normalization_table()


def square_bicubic(picture: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to size x size exactly as Pillow 13 does it, under any Pillow (10.4 to 13 checked).

    Pillow resizes in two one-axis passes, rounding to bytes between them, and the order changes the bytes:
    13 runs the vertical pass first when the picture loses rows and over twice as many rows as columns
    (found on 1,400 sizes), where 10.x-12.x run the horizontal one first (vertical only above 100:1).
    The golden pixels are Pillow 13's, so both passes are run here explicitly, in its order; each one-axis
    pass gives the same bytes in every version.
    """
    width, height = picture.size
    vertical_first = height > size and height - size > 2 * max(width - size, 0)
    for step in ((width, size), (size, size)) if vertical_first else ((size, height), (size, size)):
        picture = picture.resize(step, Image.BICUBIC, reducing_gap=None)
    return picture


def preprocess(picture: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, bicubic resize to a square (aspect not kept), CLIP normalization: [3, size, size] float32.

    Bit-identical to the original's torchvision Resize(BICUBIC) + ToTensor + Normalize on a PIL image
    under Pillow 13 (the golden's), whichever Pillow is installed.
    """
    rgb = square_bicubic(picture.convert("RGB"), image_size)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).long()
    return torch.gather(_TABLE, 1, pixels.reshape(3, -1)).reshape(3, image_size, image_size)
