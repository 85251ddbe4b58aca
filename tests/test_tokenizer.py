"""QWenTokenizer against the original's golden outputs, plus the cases the original got wrong."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qwenvl.images import load_image
from qwenvl.tokenizer import BatchEncoding, QWenTokenizer

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = json.loads((GOLDEN / "tokenizer_cases.json").read_text(encoding="utf-8"))
IMG_START, IMG_END, IMG_PAD, EOD = 151857, 151858, 151859, 151643


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer.from_pretrained(GOLDEN / "checkpoint", trust_remote_code=True)


# ---- golden cases --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES["encode"], ids=lambda c: c["text"][:30])
def test_encode_matches_original(tok, case):
    assert tok(case["text"])["input_ids"] == case["ids"]
    assert tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", CASES["encode_errors"], ids=lambda c: c["text"][:30])
def test_encode_errors(tok, case):
    text = case["text"]
    if text.endswith("</img>"):  # a path over 256 bytes: refused by the original, accepted here
        ids = tok.encode(text)
        assert len(ids) == 258 and ids[0] == IMG_START and ids[-1] == IMG_END
        assert tok.decode(ids) == text
    else:
        with pytest.raises(ValueError, match="unclosed <img>"):
            tok.encode(text)


@pytest.mark.parametrize("case", CASES["decode"], ids=lambda c: str(len(c["ids"])))
def test_decode_matches_original(tok, case):
    if "reference_error" in case:  # the original crashed on a 256-byte path: it must round-trip
        text = next(e["text"] for e in CASES["encode"] if e["ids"] == case["ids"])
        assert tok.decode(case["ids"]) == text
        assert tok.decode(case["ids"], skip_special_tokens=True) == text[len("<img>"):-len("</img>")]
        return
    assert tok.decode(case["ids"]) == case["text"]
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["text_skip_special"]


@pytest.mark.parametrize("case", CASES["to_list_format"], ids=lambda c: c["text"][:30])
def test_to_list_format_matches_original(tok, case):
    if "reference_error" in case:  # the original refused other special tokens; they are text here
        assert tok.to_list_format(case["text"]) == [{"text": case["text"]}]
    else:
        assert tok.to_list_format(case["text"]) == case["list"]


@pytest.mark.parametrize("case", CASES["from_list_format"], ids=lambda c: c["text"][:30])
def test_from_list_format_matches_original(tok, case):
    assert tok.from_list_format(case["list"]) == case["text"]


# ---- special tokens and vocabulary ---------------------------------------------------------------

def test_special_token_ids(tok):
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.special_tokens["<|extra_0|>"] == 151646 and tok.special_tokens["<|extra_204|>"] == 151850
    assert (tok.ref_start_id, tok.ref_end_id, tok.box_start_id, tok.box_end_id) == (151851, 151852, 151853, 151854)
    assert (tok.quad_start_id, tok.quad_end_id) == (151855, 151856)
    assert (tok.img_start_id, tok.img_end_id, tok.img_pad_id) == (IMG_START, IMG_END, IMG_PAD)
    assert tok.IMAGE_ST == ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
    assert tok.eos_token_id == tok.pad_token_id == EOD
    assert tok.vocab_size == len(tok) == 151860


def test_tokens_and_ids_convert_both_ways(tok):
    ids = tok.encode("Hello<|im_end|>")
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == [b"Hello", "<|im_end|>"]
    assert tok.convert_tokens_to_ids(tokens) == ids
    assert tok.tokenize("Hello<|im_end|>") == tokens
    with pytest.raises(ValueError, match="151936"):
        tok.convert_ids_to_tokens(151936)


def test_text_is_nfc_normalized(tok):
    assert tok.encode("e\u0301") == tok.encode("\u00e9")


def test_chat_turns_keep_typed_special_tokens_as_text(tok):
    ids = tok.encode("<img>a.png</img><|im_end|>", allowed_special=set(tok.IMAGE_ST))
    assert len(ids) > 258 and tok.im_end_id not in ids
    assert tok.decode(ids) == "<img>a.png</img><|im_end|>"


# ---- images inside the ids -----------------------------------------------------------------------

def test_long_reference_round_trips(tok):
    text = "see <img>" + "/very/deep/" * 40 + "picture.png</img> now"
    ids = tok.encode(text)
    start = ids.index(IMG_START)
    assert ids[start + 257] == IMG_END
    assert tok.decode(ids) == text


def test_pil_image_becomes_a_data_uri_that_round_trips(tok):
    picture = Image.new("RGB", (8, 6), (10, 200, 30))
    prompt = tok.from_list_format([{"image": picture}, {"text": "what?"}])
    assert prompt.startswith("Picture 1:<img>data:image/png;base64,")
    assert tok.decode(tok.encode(prompt)) == prompt
    reference = tok.to_list_format(prompt)[1]["image"]
    assert load_image(reference).convert("RGB").getpixel((3, 2)) == (10, 200, 30)


def test_from_list_format_takes_paths_and_bytes(tok, tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (2, 2)).save(path)
    prompt = tok.from_list_format([{"image": path}, {"image": path.read_bytes()}])
    assert prompt.startswith(f"Picture 1:<img>{path}</img>\nPicture 2:<img>data:image/png;base64,")


def test_from_list_format_rejects_unknown_elements(tok):
    with pytest.raises(ValueError, match="'picture'"):
        tok.from_list_format([{"picture": "a.png"}])


def test_unclosed_image_error_names_the_text_shortened(tok):
    with pytest.raises(ValueError, match=r"unclosed <img> in '<img>a\.png'"):
        tok.encode("text <img>a.png")
    with pytest.raises(ValueError) as error:
        tok("<img>" + "x" * 5000)
    assert len(str(error.value)) < 200


def test_to_list_format_rejects_unclosed_tags(tok):
    with pytest.raises(ValueError, match="unclosed <ref>"):
        tok.to_list_format("<ref>the dog")


# ---- decoding never fails -------------------------------------------------------------------------

def test_decode_survives_garbage_ids(tok):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.choice([rng.randrange(-3, 151936), IMG_START, IMG_END, IMG_PAD]) for _ in range(40)]
        assert isinstance(tok.decode(ids), str)
        assert isinstance(tok.decode(ids, skip_special_tokens=True), str)


def test_padded_vocabulary_ids_decode_to_nothing(tok):
    assert tok.decode([9707, 151860, 151935, 11]) == "Hello,"


def test_unclosed_generated_image_decodes_as_tokens(tok):
    ids = tok.encode("ok ") + [IMG_START] + tok.encode("cat")
    assert tok.decode(ids) == "ok <img>cat"


def test_image_span_that_is_not_a_reference_decodes_as_tokens(tok):
    ids = [IMG_START] + tok.encode("a cat") + [IMG_END]
    assert tok.decode(ids) == "<img>a cat</img>"
    unknown_long = [IMG_START, 0xFF] + [1] * 32 + [IMG_PAD] * 223 + [IMG_END]
    assert tok.decode(unknown_long).startswith("<img>")


def test_decode_takes_tensors_and_arrays(tok):
    ids = tok.encode("Picture 1:<img>a.png</img>\nhi")
    expected = "Picture 1:<img>a.png</img>\nhi"
    assert tok.decode(torch.tensor(ids)) == expected
    assert tok.decode(np.array(ids)) == expected
    assert tok.batch_decode(torch.tensor([ids, ids]), skip_special_tokens=True) == ["Picture 1:a.png\nhi"] * 2


# ---- batching -------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_with_tensors(tok, side):
    tok_side = QWenTokenizer(tok.mergeable_ranks, {"padding_side": side})
    batch = tok_side(["Hello, world!", "Hi"], return_tensors="pt", padding=True)
    short = tok.encode("Hi")
    assert isinstance(batch, BatchEncoding) and batch.input_ids.shape == (2, 4)
    row = batch["input_ids"][1].tolist()
    mask = batch.attention_mask[1].tolist()
    if side == "right":
        assert row == short + [EOD] * 3 and mask == [1, 0, 0, 0]
    else:
        assert row == [EOD] * 3 + short and mask == [0, 0, 0, 1]
    assert batch.to("cpu") is batch


def test_ragged_batch_needs_padding_for_tensors(tok):
    with pytest.raises(ValueError, match="padding=True"):
        tok(["Hello, world!", "Hi"], return_tensors="pt")
    assert tok(["Hello, world!", "Hi"])["input_ids"] == [[9707, 11, 1879, 0], tok.encode("Hi")]


def test_single_text_and_truncation(tok):
    single = tok("Hello, world!", return_tensors="pt")
    assert single.input_ids.tolist() == [[9707, 11, 1879, 0]]
    assert tok("Hello, world!", truncation=True, max_length=2)["input_ids"] == [9707, 11]


# ---- files ----------------------------------------------------------------------------------------

def test_missing_folder_and_vocabulary_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        QWenTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="qwen.tiktoken"):
        QWenTokenizer.from_pretrained(tmp_path)


def test_damaged_vocabulary_is_named(tmp_path):
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"qwen\.tiktoken line 2"):
        QWenTokenizer.from_pretrained(tmp_path)
    (tmp_path / "qwen.tiktoken").write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(ValueError, match="Qwen vocabulary"):
        QWenTokenizer.from_pretrained(tmp_path)


def test_save_pretrained_round_trips(tok, tmp_path):
    loaded = QWenTokenizer.from_pretrained(GOLDEN / "checkpoint", padding_side="left")
    loaded.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert (saved / "qwen.tiktoken").read_bytes() == (GOLDEN / "checkpoint" / "qwen.tiktoken").read_bytes()
    again = QWenTokenizer.from_pretrained(saved)
    assert again.padding_side == "left" and again.model_max_length == 8192
    assert json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"] == "QWenTokenizer"
    assert again.encode("你好 <img>a.png</img>") == tok.encode("你好 <img>a.png</img>")
