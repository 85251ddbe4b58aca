"""The processor step: a prompt and its images -> token ids + one picture per image span.

This is the one place where images are read. The official surfaces (`model(...)`, `generate`, `chat`, text
with `<img>path</img>`, `from_list_format`), the evaluation runner and the serving engine all come through
here; the model itself only ever sees pixel tensors [3, S, S] or cached features [256, hidden].

An image span is `<img>` + 256 ids + `</img>`. When no images are given beside the ids, the 256 ids name
where the picture comes from (the tokenizer writes a path, URL or data URI there, SPEC section 6) and the
picture is loaded from that reference; the same reference in one prompt is loaded once.
"""
from __future__ import annotations

import hashlib
import os

import torch
from PIL import Image

from . import images as image_io
from .errors import CheckpointError, RequestError


class Picture:
    """One picture of a prompt, known by its content hash (the engine's feature-cache key; a pixel tensor's
    is taken when first asked for); it is resized and normalized only when its pixels are asked for (not at
    all if its features are cached already)."""

    def __init__(self, image: "torch.Tensor | Image.Image", image_size: int, digest: bytes | None = None):
        self.image, self.image_size = image, image_size
        self.size = (image_size, image_size) if isinstance(image, torch.Tensor) else image.size  # (width, height)
        self._digest = digest
        if digest is None and not isinstance(image, torch.Tensor):
            self._digest = self.digest  # before preprocessing replaces the image by its pixels

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            image = self.image
            raw = image.contiguous().numpy().tobytes() if isinstance(image, torch.Tensor) else \
                f"{image.mode}{image.size}".encode() + image.tobytes()
            self._digest = hashlib.sha256(raw).digest()
        return self._digest

    @property
    def pixels(self) -> torch.Tensor:
        if not isinstance(self.image, torch.Tensor):
            self.image = image_io.preprocess(self.image, self.image_size)
        return self.image


def image_spans(config, input_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(row, column of <img>) of every image span of [B, T] ids, row-major; checks each span's length."""
    start_id = config.visual.image_start_id
    starts = (input_ids == start_id).nonzero().tolist()
    ends = (input_ids == start_id + 1).nonzero().tolist()
    if len(starts) != len(ends):
        raise RequestError(f"the prompt has {len(starts)} <img> but {len(ends)} </img> tokens")
    span = config.visual.n_queries + 1
    for (r, a), (r2, b) in zip(starts, ends):
        if r != r2 or b - a != span:
            raise RequestError(f"malformed image span in row {r} at column {a}: an image takes "
                               f"<img> + {span - 1} ids + </img>; build prompts with the tokenizer")
    return [(r, a) for r, a in starts]


def span_references(config, input_ids: torch.Tensor) -> list[str]:
    """The reference (path, URL or data URI) each image span of the ids names, in span order."""
    n = config.visual.n_queries
    return [image_io.decode_reference(input_ids[r, a + 1:a + 1 + n].tolist()) for r, a in image_spans(config, input_ids)]


def is_features(image) -> bool:
    """A tensor of one image's features [n_queries, output_dim] rather than its pixels [3, S, S]."""
    return isinstance(image, torch.Tensor) and image.dim() == 2


def _checked_features(features: torch.Tensor, config) -> torch.Tensor:
    shape = (config.visual.n_queries, config.visual.output_dim)
    if tuple(features.shape) != shape:
        raise RequestError(f"image features must have shape {shape} (one image's, as encode_images gives them), "
                           f"got {tuple(features.shape)}")
    return features


def picture_of(image, image_size: int) -> Picture:
    """Any image a user may give (path, URL, data URI, bytes, PIL image, pixel tensor [3, S, S], Picture)."""
    if isinstance(image, Picture):
        return image
    if isinstance(image, torch.Tensor):
        if tuple(image.shape) != (3, image_size, image_size):
            raise RequestError(f"a pixel tensor must have shape (3, {image_size}, {image_size}), "
                               f"got {tuple(image.shape)}")
        return Picture(image, image_size)
    return Picture(image_io.load_image(image), image_size)


def prompt_pictures(config, input_ids: torch.Tensor, images: list | None = None) -> list:
    """One entry per image span of the ids: a Picture, or a features tensor passed through as given.

    `images`, when given, fills the spans in order (one per span); otherwise each span's reference is
    loaded, each distinct reference once."""
    spans = image_spans(config, input_ids)
    size = config.visual.image_size
    if images is None:
        references = span_references(config, input_ids)
        loaded = {reference: picture_of(reference, size) for reference in dict.fromkeys(references)}
        return [loaded[reference] for reference in references]
    if isinstance(images, torch.Tensor) and images.dim() == 4:  # a stack of pixels [n, 3, S, S]
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)):
        raise RequestError(f"images must be a list (one image per <img></img> span), got {type(images).__name__}")
    if not spans and images:
        raise RequestError(f"{len(images)} images were given but the prompt has no <img></img> span")
    if len(images) != len(spans):
        raise RequestError(f"{len(images)} images were given for {len(spans)} <img></img> spans in the prompt")
    return [_checked_features(im, config) if is_features(im) else picture_of(im, size) for im in images]


def prompt_pixels(config, input_ids: torch.Tensor, images=None) -> "list[torch.Tensor] | torch.Tensor":
    """What the model takes beside the ids: per span, pixels [3, S, S] or features [n_queries, output_dim].
    A stack of pixels [n, 3, S, S] (a training batch's) is checked and passed on as it is, not copied."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        size, spans = config.visual.image_size, len(image_spans(config, input_ids))
        if tuple(images.shape[1:]) != (3, size, size) or len(images) != spans:
            raise RequestError(f"a pixel stack for {spans} <img></img> spans must have shape ({spans}, 3, {size}, "
                               f"{size}), got {tuple(images.shape)}")
        return images
    return [p.pixels if isinstance(p, Picture) else p for p in prompt_pictures(config, input_ids, images)]


class Processor:
    """Text (or list format, or a batch of either) + optional images -> `input_ids`, `attention_mask` and
    `images` (the pictures' pixels, one per span), ready for `model(**inputs)` or `model.generate(**inputs)`.

    >>> processor = Processor.from_pretrained("Qwen-VL")
    >>> inputs = processor("<img>demo.jpeg</img>Generate the caption in English:")
    >>> out = model.generate(**inputs, max_new_tokens=30)
    """

    def __init__(self, tokenizer, config):
        self.tokenizer, self.config = tokenizer, config

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "Processor":
        from .config import QWenConfig
        from .loading import check_folder
        from .tokenizer import QWenTokenizer

        path = check_folder(path)
        try:
            config = QWenConfig.from_json(os.path.join(path, "config.json"))
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {path}/config.json: {e}") from None
        return cls(QWenTokenizer.from_pretrained(path, **kwargs), config)

    def __call__(self, text, images: list | None = None) -> dict:
        """`text`: a string, a list-format list, or a list of either (a batch, left padded); `images`, when
        given, fill the batch's image spans in order instead of the references written in them."""
        batch = [text] if isinstance(text, str) or _is_list_format(text) else text
        if not isinstance(batch, (list, tuple)) or not batch:
            raise RequestError(f"text must be a string, a list-format list or a non-empty list of them, "
                               f"got {type(text).__name__}")
        rows = []
        for i, item in enumerate(batch):
            if isinstance(item, list):
                item = self.tokenizer.from_list_format(item)
            if not isinstance(item, str):
                raise RequestError(f"text[{i}] must be a string or a list-format list, got {type(item).__name__}")
            rows.append(self.tokenizer.encode(item))
        width, pad = max(map(len, rows)), self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "images": prompt_pixels(self.config, input_ids, images)}


def _is_list_format(value: list) -> bool:
    """[{"image": ...}, {"text": ...}] is one prompt; ["a", "b"] or [[{...}], [{...}]] is a batch."""
    return bool(value) and all(isinstance(item, dict) for item in value)
