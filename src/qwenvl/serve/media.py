"""Pictures a client sends, fetched under server-mode rules, then decoded by the shared loader (`images.py`).

Nothing a client sends reaches the host's disk unless it lies under `allowed_local_media_path` (checked
after resolving links); URLs are http(s) only, every address a name resolves to must be public unless
`allow_private_urls` (loopback, private, link-local, multicast, reserved and unspecified are refused), the
connection goes to the address that was checked (no second DNS answer), every redirect is checked again,
the whole download has one deadline and a byte cap, and the pixel count is read from the header before
any pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import socket
import ssl
import urllib.parse
import warnings
from dataclasses import dataclass, field

from PIL import Image

from .. import images as image_io
from ..errors import ImageError


class MediaRefused(ImageError):
    """A reference the server's rules do not allow (a local file, a private address, a scheme)."""


class MediaTooLarge(ImageError):
    """An image over the byte or pixel limits (HTTP 413)."""


@dataclass(frozen=True)
class MediaPolicy:
    limits: image_io.ImageLimits = field(default_factory=image_io.ImageLimits)
    allowed_local_media_path: str | None = None
    allow_private_urls: bool = False

    def load(self, url: str) -> Image.Image:
        """The decoded picture behind an `image_url`: a data: URI, an http(s) URL, or (only under the allowed
        folder) a file:// URL or path."""
        if not isinstance(url, str) or not url:
            raise ImageError("the image url is empty")
        label = image_io.short_label(url)
        if url.startswith("data:"):
            raw = self._data_uri(url, label)
        elif url.startswith(("http://", "https://")):
            raw = self._download(url, label)
        elif "://" in url and not url.startswith("file://"):
            raise MediaRefused(f"image url {label}: only http, https and data URLs are accepted")
        else:
            raw = self._local(url, label)
        return self.decode(raw, label)

    def decode(self, raw: bytes, label: str) -> Image.Image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                width, height = Image.open(io.BytesIO(raw)).size  # the header only
        except Exception:
            raise ImageError(f"image {label} is not a readable picture") from None
        if width * height > self.limits.max_pixels:
            raise MediaTooLarge(f"image {label} is {width}x{height} = {width * height} pixels, over the server's "
                                f"limit of {self.limits.max_pixels} (--max-image-pixels)")
        return image_io.open_image(raw, label, self.limits)

    def too_large(self, label: str, size: int) -> MediaTooLarge:
        return MediaTooLarge(f"image {label} holds {size} bytes or more, over the server's limit of "
                             f"{self.limits.max_bytes} (--max-image-bytes)")

    def _data_uri(self, url: str, label: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise ImageError(f"malformed data URI (no comma): {label}")
        is_base64 = header.endswith(";base64")
        if (len(payload) * 3 // 4 if is_base64 else len(payload)) > self.limits.max_bytes:
            raise self.too_large(label, len(payload) * 3 // 4 if is_base64 else len(payload))
        try:
            raw = base64.b64decode(payload, validate=True) if is_base64 else urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise ImageError(f"data URI with invalid base64: {label}") from None
        if len(raw) > self.limits.max_bytes:
            raise self.too_large(label, len(raw))
        return raw

    def _local(self, url: str, label: str) -> bytes:
        if self.allowed_local_media_path is None:
            raise MediaRefused(f"image url {label}: local files are not served (start the server with "
                               "--allowed-local-media-path DIR to allow files under DIR)")
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file://") else url
        root = os.path.realpath(self.allowed_local_media_path)
        resolved = os.path.realpath(path)
        if os.path.commonpath([root, resolved]) != root:
            raise MediaRefused(f"image url {label}: the file is not under the allowed folder")
        try:
            size = os.stat(resolved).st_size
        except OSError:
            raise ImageError(f"image file not found: {label}") from None
        if size > self.limits.max_bytes:
            raise self.too_large(label, size)
        with open(resolved, "rb") as f:  # only once the checks passed, the shared loader's own checks aside
            return f.read(self.limits.max_bytes + 1)

    def check_host(self, host: str, port: int, label: str) -> str:
        """The address to connect to: the first of `host`'s addresses, all of which must be allowed."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise ImageError(f"cannot download image {label}: cannot resolve {host} ({e})") from None
        addresses = [info[4][0] for info in infos]
        if not self.allow_private_urls:
            for address in addresses:
                ip = ipaddress.ip_address(address.split("%")[0])
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                    ip = ip.ipv4_mapped
                if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local \
                        or ip.is_private or ip.is_unspecified:
                    raise MediaRefused(f"image url {label}: {host} is a private, loopback or reserved address "
                                       f"({ip}); start the server with --allow-private-urls to allow it")
        return addresses[0]

    def _download(self, url: str, label: str) -> bytes:
        return image_io.download(url, self.limits, label, connect=self._connect,
                                 too_large=lambda size: self.too_large(label, size), timeout_hint="--image-fetch-timeout")

    def _connect(self, parts, timeout: float, label: str) -> http.client.HTTPConnection:
        """Each hop, redirects included: http(s) only, to an address `check_host` allows, pinned to it."""
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaRefused(f"image url {label}: a redirect to {image_io.short_label(parts.geturl())} is not http(s)")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        connection = _PinnedConnection(parts.scheme, parts.hostname, self.check_host(parts.hostname, port, label),
                                       port, timeout)
        connection.connect()
        return connection


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to the address that was checked, with the URL's host name for the Host header and TLS."""

    def __init__(self, scheme: str, host: str, address: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.scheme, self.address = scheme, address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
