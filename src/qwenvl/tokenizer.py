"""The Qwen tokenizer: byte-level BPE (tiktoken) plus Qwen-VL's special tokens and image spans.

A drop-in for the original `tokenization_qwen.QWenTokenizer`: same ids, same call surfaces, built
in-process from the checkpoint's `qwen.tiktoken` (nothing is downloaded).
"""
from __future__ import annotations

import base64
import binascii
import json
import unicodedata
from pathlib import Path

import tiktoken
import torch

from . import boxes as box_utils
from .errors import CheckpointError, ImageError, MissingCheckpointFile, OptionsError, RequestError
from .images import decode_reference, encode_reference, load_image, short_label, to_reference

VOCAB_FILE = "qwen.tiktoken"
CONFIG_FILE = "tokenizer_config.json"
NUM_MERGEABLE = 151643
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IMSTART, IMEND = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_ST = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS + IMAGE_ST
DEFAULT_CONFIG = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"}


class BatchEncoding(dict):
    """`input_ids` and `attention_mask`, readable as keys or attributes, movable with `.to(device)`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> "BatchEncoding":
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


def load_ranks(vocab_path: Path) -> dict[bytes, int]:
    """Read `base64token rank` lines; a missing or damaged file ends in an error that says what to do."""
    if not vocab_path.is_file():
        raise MissingCheckpointFile(
            f"{vocab_path} not found: a Qwen-VL checkpoint folder must hold {VOCAB_FILE} "
            "(copy it from the original checkpoint, or from the dashscope package's resources/)")
    ranks = {}
    with open(vocab_path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise CheckpointError(f"{vocab_path} line {number} is not 'base64token rank': the file is damaged; "
                                 f"copy {VOCAB_FILE} again from the original checkpoint") from None
    if sorted(ranks.values()) != list(range(NUM_MERGEABLE)):
        raise CheckpointError(f"{vocab_path} does not hold the Qwen vocabulary (ranks 0..{NUM_MERGEABLE - 1}, "
                         f"got {len(ranks)} tokens); copy {VOCAB_FILE} again from the original checkpoint")
    return ranks


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return dict(DEFAULT_CONFIG)
    try:
        return {**DEFAULT_CONFIG, **json.loads(path.read_text(encoding="utf-8"))}
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from None


def _find(ids: list[int], value: int, start: int) -> int:
    try:
        return ids.index(value, start)
    except ValueError:
        return -1


def _as_id_list(ids) -> list[int]:
    """A flat list of ints from an int, a list, a tensor or a numpy array."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class QWenTokenizer:
    """Qwen-VL's tokenizer. Build it with `QWenTokenizer.from_pretrained(checkpoint_folder)`."""

    IMAGE_ST = IMAGE_ST

    def __init__(self, mergeable_ranks: dict[bytes, int], config: dict | None = None, errors: str = "replace"):
        self.config = {**DEFAULT_CONFIG, **(config or {})}
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = {token: NUM_MERGEABLE + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.errors = errors
        # named `tokenizer` as in the original, where callers reach the tiktoken Encoding through it
        self.tokenizer = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                           special_tokens=self.special_tokens)
        self.model_max_length = self.config["model_max_length"]
        self.padding_side = self.config.get("padding_side", "right")
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        (self.ref_start_id, self.ref_end_id, self.box_start_id, self.box_end_id, self.quad_start_id,
         self.quad_end_id, self.img_start_id, self.img_end_id, self.img_pad_id) = (
            self.special_tokens[t] for t in IMAGE_ST)
        (self.ref_start_tag, self.ref_end_tag, self.box_start_tag, self.box_end_tag, self.quad_start_tag,
         self.quad_end_tag, self.image_start_tag, self.image_end_tag, self.image_pad_tag) = IMAGE_ST
        self.eos_token_id = self.eod_id
        self.pad_token_id = self.eod_id

    # ---- files -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "QWenTokenizer":
        """Load from a checkpoint folder. `padding_side`, `model_max_length` and `errors` are honoured;
        other keyword arguments of the original (`trust_remote_code`, `use_fast`, ...) are ignored."""
        folder = Path(path)
        if not folder.is_dir():
            raise MissingCheckpointFile(f"tokenizer folder not found: {folder} (give a checkpoint folder that "
                                        f"holds {VOCAB_FILE})")
        try:
            config = _read_config(folder / CONFIG_FILE)
            ranks = load_ranks(folder / VOCAB_FILE)
        except FileNotFoundError:
            raise
        except OSError as e:  # unreadable (permissions, a folder under the file's name)
            raise CheckpointError(f"cannot read the tokenizer files in {folder}: {e.strerror or e}") from None
        config.update({k: kwargs[k] for k in ("padding_side", "model_max_length") if k in kwargs})
        return cls(ranks, config, errors=kwargs.get("errors", "replace"))

    def save_pretrained(self, directory) -> tuple[str, str]:
        """Write `qwen.tiktoken` and `tokenizer_config.json` into `directory`; returns their paths."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        vocab_path, config_path = folder / VOCAB_FILE, folder / CONFIG_FILE
        lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                 for token, rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1]))
        vocab_path.write_text("".join(lines), encoding="ascii")
        config = {**self.config, "model_max_length": self.model_max_length, "padding_side": self.padding_side}
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return str(vocab_path), str(config_path)

    # ---- vocabulary --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    def __len__(self) -> int:
        return self.tokenizer.n_vocab

    def convert_tokens_to_ids(self, tokens):
        """Token(s) (bytes, or a special token's str) -> id(s); None for an unknown token."""
        if isinstance(tokens, (str, bytes)):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: str | bytes) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.mergeable_ranks.get(token.encode("utf-8") if isinstance(token, str) else token)

    def convert_ids_to_tokens(self, ids):
        """Id(s) -> token(s): bytes for ordinary tokens, str for special tokens."""
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(i) for i in _as_id_list(ids)]

    def _id_to_token(self, token_id: int) -> str | bytes:
        if NUM_MERGEABLE <= token_id < self.vocab_size:
            return SPECIAL_TOKENS[token_id - NUM_MERGEABLE]
        if 0 <= token_id < NUM_MERGEABLE:
            return self.tokenizer.decode_single_token_bytes(token_id)
        raise RequestError(f"unknown token id {token_id} (the vocabulary has {self.vocab_size} tokens)")

    # ---- encoding ----------------------------------------------------------------------------------

    def tokenize(self, text: str, allowed_special="all", disallowed_special=(), **kwargs) -> list[str | bytes]:
        return self.convert_ids_to_tokens(self.encode(text, allowed_special, disallowed_special))

    def encode(self, text: str, allowed_special="all", disallowed_special=(), add_special_tokens=True,
               **kwargs) -> list[int]:
        """NFC, BPE, then each `<img>REF</img>` becomes `<img>` + 256 reference ids + `</img>`.

        Special-token surface forms in `allowed_special` become special ids; others stay plain text.
        `add_special_tokens` is accepted for compatibility: Qwen adds no BOS/EOS.
        """
        text = unicodedata.normalize("NFC", text)
        allowed = allowed_special if allowed_special == "all" else set(allowed_special)
        disallowed = disallowed_special if disallowed_special == "all" else set(disallowed_special)
        ids = self.tokenizer.encode(text, allowed_special=allowed, disallowed_special=disallowed)
        return self._expand_images(ids)

    def _expand_images(self, ids: list[int]) -> list[int]:
        """The original's `_replace_closed_tag`: pair each `<img>` with the next `</img>` and fill the span."""
        out, pos = [], 0
        while (start := _find(ids, self.img_start_id, pos)) != -1:
            end = _find(ids, self.img_end_id, start + 1)
            if end == -1:
                text = self.tokenizer.decode(ids[start:])
                raise RequestError(f"unclosed <img> in {short_label(text)!r}: close the image with </img>")
            reference = self.tokenizer.decode_bytes(ids[start + 1:end]).decode("utf-8")
            out += ids[pos:start] + [self.img_start_id] + encode_reference(reference) + [self.img_end_id]
            pos = end + 1
        return out + ids[pos:]

    def __call__(self, text: str | list[str], return_tensors: str | None = None, padding=False,
                 truncation: bool = False, max_length: int | None = None, **kwargs) -> BatchEncoding:
        """Tokenize one text or a batch. `padding` True/"longest" pads to the longest row, "max_length"
        to `max_length`, with `pad_token_id` on `padding_side`; `return_tensors="pt"` gives LongTensors."""
        batch = [self.encode(t) for t in ([text] if isinstance(text, str) else text)]
        if truncation:
            batch = [ids[: max_length or self.model_max_length] for ids in batch]
        masks = [[1] * len(ids) for ids in batch]
        if padding:
            width = max_length if padding == "max_length" and max_length else max(map(len, batch), default=0)
            batch = [self._pad(ids, width, self.pad_token_id) for ids in batch]
            masks = [self._pad(mask, width, 0) for mask in masks]
        if return_tensors == "pt":
            if len(set(map(len, batch))) > 1:
                raise OptionsError("texts of different lengths cannot form one tensor: pass padding=True")
            batch, masks = torch.tensor(batch, dtype=torch.long), torch.tensor(masks, dtype=torch.long)
        elif return_tensors is not None:
            raise OptionsError(f"return_tensors={return_tensors!r} is not supported: use 'pt' or None")
        elif isinstance(text, str):
            batch, masks = batch[0], masks[0]
        return BatchEncoding(input_ids=batch, attention_mask=masks)

    def _pad(self, row: list[int], width: int, value: int) -> list[int]:
        fill = [value] * (width - len(row))
        return fill + row if self.padding_side == "left" else row + fill

    # ---- decoding ----------------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False, errors: str | None = None, **kwargs) -> str:
        """Ids (list, tensor, numpy) -> text; image spans become `<img>REF</img>`. Never fails on bad ids:
        ids past the vocabulary read as nothing, spans that are not references read as ordinary tokens."""
        pieces = []
        for part in self._split_image_spans(_as_id_list(ids)):
            if isinstance(part, str):
                tags = ("", "") if skip_special_tokens else (self.image_start_tag, self.image_end_tag)
                pieces.append(f"{tags[0]}{part}{tags[1]}".encode("utf-8"))
            else:
                limit = NUM_MERGEABLE if skip_special_tokens else self.vocab_size
                pieces.append(self.tokenizer.decode_bytes([i for i in part if 0 <= i < limit]))
        return b"".join(pieces).decode("utf-8", errors=errors or self.errors)

    def _split_image_spans(self, ids: list[int]) -> list[list[int] | str]:
        """Runs of ordinary ids, and the reference (str) of each decodable closed image span."""
        parts, pos = [], 0
        while (start := _find(ids, self.img_start_id, pos)) != -1:
            end = _find(ids, self.img_end_id, start + 1)
            if end == -1:
                break  # an unclosed <img> (a model may generate one) stays ordinary tokens
            try:
                reference = decode_reference(ids[start + 1:end])
            except ImageError:
                parts.append(ids[pos:end + 1])
            else:
                parts += [ids[pos:start], reference]
            pos = end + 1
        parts.append(ids[pos:])
        return parts

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    # ---- list format and grounding -----------------------------------------------------------------

    def to_list_format(self, text: str) -> list[dict]:
        """Split a prompt or response into `{'text'|'image'|'ref'|'box'|'quad': str}` elements.

        Same result as the original's token-level split; other special tokens (`<|im_start|>`) are
        plain text here, where the original refused them.
        """
        return box_utils.split_tags(unicodedata.normalize("NFC", text))

    def from_list_format(self, list_format: list[dict]) -> str:
        """Elements -> prompt text: `Picture n:<img>REF</img>\\n` per image, text as is, refs and boxes."""
        pieces, num_images = [], 0
        for element in list_format:
            if not isinstance(element, dict):
                raise RequestError(f"list format element {short_label(repr(element))} is not a dict")
            if "image" in element:
                num_images += 1
                reference = element["image"] if isinstance(element["image"], str) else to_reference(element["image"])
                if self.image_start_tag in reference or self.image_end_tag in reference:
                    # it would close its span early and open another: one item, two images
                    raise ImageError(f"image reference {short_label(reference)!r} contains <img> or </img>")
                pieces.append(f"Picture {num_images}:{self.image_start_tag}{reference}{self.image_end_tag}\n")
            elif "text" in element:
                if not isinstance(element["text"], str):
                    raise RequestError(f"list format text {short_label(repr(element['text']))} is not a string")
                pieces.append(element["text"])
            elif "box" in element:
                if "ref" in element:
                    ref = element["ref"]
                    if not isinstance(ref, str) or any(tag in ref for tag in IMAGE_ST):
                        raise RequestError(f"list format ref {short_label(repr(ref))} must be text without "
                                           "<ref>/<box>/<img> tags")
                    pieces.append(f"{self.ref_start_tag}{ref}{self.ref_end_tag}")
                try:
                    for box in element["box"]:
                        corners = "(%d,%d),(%d,%d)" % (box[0], box[1], box[2], box[3])
                        pieces.append(f"{self.box_start_tag}{corners}{self.box_end_tag}")
                except (TypeError, IndexError, KeyError, ValueError, OverflowError):
                    raise RequestError(f"list format box {short_label(repr(element['box']))} must be a list of "
                                       "(x1, y1, x2, y2) integer boxes") from None
            else:
                raise RequestError(f"unsupported list format element {short_label(repr(element))}: "
                                   "use keys 'image', 'text', or 'box' (with an optional 'ref')")
        return "".join(pieces)

    def draw_bbox_on_latest_picture(self, response: str, history=None):
        """The latest picture (in the response, else the history queries, newest first) with the response's
        boxes drawn on it; None when there is no box or no picture."""
        found = box_utils.parse_boxes(response)
        reference = box_utils.latest_image(response, history)
        if not found or reference is None:
            return None
        return box_utils.draw_boxes(load_image(reference).convert("RGB"), found)
