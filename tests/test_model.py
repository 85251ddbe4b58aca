"""The model against the original's golden outputs, each part on its own, images as real inputs, bad inputs."""
import base64
import json
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import PIL
from PIL import Image

import qwenvl
from qwenvl.config import QWenConfig, VisualConfig
from qwenvl.images import (IMAGE_PAD_ID, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError, load_image, preprocess,
                           square_bicubic)
from qwenvl.model.language import (MLP, Attention, RMSNorm, Rotary, Step, apply_rotary, logn_scale, ntk_alpha,
                                   rotate_half)
from qwenvl.model.vision import ResamplerAttention, VisualAttention

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = json.loads((GOLDEN / "model_cases.json").read_text(encoding="utf-8"))
TOKENIZER_CASES = json.loads((GOLDEN / "tokenizer_cases.json").read_text(encoding="utf-8"))
ATOL = 1e-3
IMG_START, IMG_END = 151857, 151858
CAPTION = CASES["logits"][1]  # 'Picture 1:<img>images/shapes_640x480.png</img>\nGenerate the caption ...'
CAPTION_IMAGE = "images/shapes_640x480.png"


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def logits_of(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]) if isinstance(ids, list) else ids, **kwargs).logits


@pytest.fixture(scope="module")
def caption_logits(model):
    """Last-8 logits of the caption prompt with its image given as a path inside the text."""
    import os
    cwd = os.getcwd()
    os.chdir(GOLDEN)
    try:
        return logits_of(model, CAPTION["input_ids"])[0, -8:]
    finally:
        os.chdir(cwd)


# ---- parity with the original, whole model ---------------------------------------------------------

@pytest.mark.parametrize("case", CASES["visual"], ids=lambda c: c["image"])
def test_visual_matches_original(model, expected, in_golden, case):
    with torch.no_grad():
        got = model.encode_images([case["image"]])
    assert got.shape == (1, 256, 128)
    assert max_diff(got[0], expected[case["array"]]) <= ATOL


@pytest.mark.parametrize("case", CASES["logits"], ids=lambda c: c["prompt"][:40])
def test_logits_match_original(model, tokenizer, expected, in_golden, case):
    assert tokenizer(case["prompt"])["input_ids"] == case["input_ids"]
    logits = logits_of(model, case["input_ids"])[0]
    assert logits.shape == (len(case["input_ids"]), 151936)
    assert max_diff(logits[-1], expected[case["last_logits"]]) <= ATOL
    assert max_diff(logits[-8:], expected[case["last8_logits"]]) <= ATOL


@pytest.mark.parametrize("case", CASES["generate"], ids=lambda c: str(len(c["input_ids"])))
def test_greedy_generation_matches_original(model, in_golden, case):
    ids = torch.tensor([case["input_ids"]])
    out = model.generate(ids, max_new_tokens=case["max_new_tokens"], do_sample=False, eos_token_id=None)
    assert out[0, :ids.shape[1]].tolist() == case["input_ids"]
    assert out[0, ids.shape[1]:].tolist() == case["output_ids"]


@pytest.mark.parametrize("case", CASES["chat"], ids=lambda c: c["query"][:20])
def test_chat_matches_original(model, tokenizer, in_golden, case):
    history = [tuple(h) for h in case["history"]]
    response, new_history = model.chat(tokenizer, case["query"], history=history, system=case["system"],
                                       do_sample=False, max_new_tokens=case["max_new_tokens"])
    assert response == case["response"]
    assert new_history[-1] == (case["query"], case["response"])


@pytest.mark.parametrize("case", CASES["chat"], ids=lambda c: c["query"][:20])
def test_chat_context_matches_original(tokenizer, case):
    history = [tuple(h) for h in case["history"]]
    _, ids = qwenvl.make_context(tokenizer, case["query"], history=history, system=case["system"])
    assert ids == case["context_ids"]


@pytest.mark.parametrize("case", TOKENIZER_CASES["make_context"], ids=lambda c: c["query"][:20])
def test_make_context_matches_original(tokenizer, case):
    history = [tuple(h) for h in case["history"]] if case["history"] else None
    raw_text, ids = qwenvl.make_context(tokenizer, case["query"], history=history, system=case["system"],
                                        max_window_size=case["max_window_size"])
    assert ids == case["ids"]
    assert raw_text == case["raw_text"]


# ---- each part on its own ---------------------------------------------------------------------------

def reference_preprocess(picture: Image.Image) -> torch.Tensor:
    """torchvision's Resize(448, BICUBIC) + ToTensor + Normalize, written out with numpy float32.

    The resize is Pillow 13's under any Pillow (test_square_bicubic_is_pillow_13s_under_any_pillow)."""
    rgb = square_bicubic(picture.convert("RGB"), 448)
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255)
    x = (x - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


@pytest.mark.parametrize("name", sorted(p.name for p in (GOLDEN / "images").iterdir()))
def test_preprocess_is_bit_exact(name):
    picture = Image.open(GOLDEN / "images" / name)
    got = preprocess(load_image(str(GOLDEN / "images" / name)), 448)
    assert got.dtype == torch.float32 and got.shape == (3, 448, 448)
    assert torch.equal(got, reference_preprocess(picture))


# sha256[:16] of Pillow 13.0's bicubic resize of seeded noise to 448 and 224: the golden pixels are Pillow 13's,
# and Pillow 10-12 give other bytes for tall pictures (a different pass order), so these pin the bytes themselves.
PILLOW_13_DIGESTS = {
    (300, 700): ("db31127acc66c993", "d3df924c42e76eaf"), (100, 900): ("80b07a7a99efa7f4", "df99969f2b51575d"),
    (448, 1000): ("2cd9bf47109233f1", "c9d5a56263a23af7"), (1000, 448): ("8c34f70d38c63cd4", "efc616184a05e9d3"),
    (64, 1500): ("a6c967ffc8714a1e", "35cdd05ffdae6a04"), (500, 520): ("d5ae4b1c3ea16d24", "a2a17f89509701ac"),
    (37, 23): ("a03b0746d0ebb9d4", "4f936bb44b262f1c"), (2000, 700): ("e6942dd6178b548f", "a7e743fdd0cbd186"),
}


def test_square_bicubic_is_pillow_13s_under_any_pillow():
    import hashlib
    rng = np.random.default_rng(0)
    for (w, h), want in PILLOW_13_DIGESTS.items():
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = tuple(hashlib.sha256(square_bicubic(noise, s).tobytes()).hexdigest()[:16] for s in (448, 224))
        assert got == want, (w, h)


@pytest.mark.skipif(not PIL.__version__.startswith("13."), reason="Pillow's own pass order is 13's only under 13")
def test_square_bicubic_is_pillow_13s_own_resize():
    # near the order rule's boundary (600x752 horizontal first, 600x753 vertical first), up and down, past 100:1
    rng = np.random.default_rng(1)
    for w, h in [(600, 752), (600, 753), (5, 7), (61, 1001), (449, 452), (700, 64), (30, 3100), (2000, 10)]:
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for s in (64, 448):
            assert square_bicubic(noise, s).tobytes() == noise.resize((s, s), Image.BICUBIC).tobytes(), (w, h, s)


def test_preprocess_ignores_exif_rotation(tmp_path):
    picture = Image.new("RGB", (60, 30), (200, 10, 10))
    picture.paste((10, 10, 200), (0, 0, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90°": the original does not apply it, so neither may we
    path = tmp_path / "rotated.jpg"
    picture.save(path, exif=exif)
    got = preprocess(load_image(str(path)), 448)
    assert torch.equal(got, reference_preprocess(Image.open(path)))
    assert got[2, 224, 10] > got[2, 224, 400]  # the blue stripe is still on the left


def reference_visual_attention(module: VisualAttention, x: torch.Tensor) -> torch.Tensor:
    """SPEC 3.4: in_proj viewed as [tokens, heads, 3 * head_dim], q|k|v split inside each head."""
    n, length, width = x.shape
    heads = module.heads
    hd = width // heads
    qkv = (x @ module.in_proj.weight.T + module.in_proj.bias).view(n, length, heads, 3 * hd)
    q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
    weights = torch.einsum("nlhd,nmhd->nhlm", q / math.sqrt(hd), k).softmax(-1)
    out = torch.einsum("nhlm,nmhd->nlhd", weights, v).reshape(n, length, width)
    return out @ module.out_proj.weight.T + module.out_proj.bias


def usual_layout_attention(module: VisualAttention, x: torch.Tensor) -> torch.Tensor:
    """The common [3, heads, head_dim] layout, which the checkpoints do NOT use."""
    n, length, width = x.shape
    out = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), width, module.heads, module.in_proj.weight,
        module.in_proj.bias, None, None, False, 0.0, module.out_proj.weight, module.out_proj.bias,
        need_weights=False)[0]
    return out.transpose(0, 1)


def test_vit_attention_splits_qkv_per_head():
    torch.manual_seed(0)
    module = VisualAttention(width=16, heads=4)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        got = module(x)
        torch.testing.assert_close(got, reference_visual_attention(module, x), atol=1e-5, rtol=1e-5)
        assert (got - usual_layout_attention(module, x)).abs().max() > 1e-2  # the case tells the layouts apart


def test_resampler_attention_is_standard_multihead_attention():
    torch.manual_seed(0)
    module = ResamplerAttention(dim=16, heads=2)
    torch.nn.init.normal_(module.in_proj_weight)
    torch.nn.init.normal_(module.in_proj_bias)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    mha.load_state_dict(module.state_dict())
    query, key, value = torch.randn(1, 5, 16), torch.randn(3, 9, 16), torch.randn(3, 9, 16)
    with torch.no_grad():
        expected = mha(query.expand(3, -1, -1), key, value, need_weights=False)[0]
        torch.testing.assert_close(module(query, key, value), expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 8) * 1e-3 + 0.5  # a nonzero mean: RMSNorm must not subtract it
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)
        tiny = torch.full((1, 8), 1e-4)  # mean(x^2) = 1e-8, so eps dominates
        torch.testing.assert_close(norm(tiny), tiny / math.sqrt(1e-8 + 1e-6) * norm.weight)
        # bf16 input: normalized in float32, cast back to bf16, then scaled by the weight
        norm_bf16 = norm.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        xf = xb.float()
        want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm_bf16.weight
        assert torch.equal(norm_bf16(xb), want)


def tiny_config(**changes) -> QWenConfig:
    config = QWenConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, kv_channels=8,
                        intermediate_size=24, seq_length=8, visual=VisualConfig(width=8, layers=1, heads=2,
                                                                                output_dim=16))
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_mlp_is_w1_times_silu_w2():
    torch.manual_seed(0)
    mlp = MLP(tiny_config())
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = (x @ mlp.w1.weight.T * F.silu(x @ mlp.w2.weight.T)) @ mlp.c_proj.weight.T
        torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)
        w1, w2 = mlp.w1.weight.clone(), mlp.w2.weight.clone()
        mlp.w1.weight.copy_(w2)
        mlp.w2.weight.copy_(w1)
        assert (mlp(x) - expected).abs().max() > 1e-3  # SiLU on w1 instead would give another answer


def test_rotate_half_convention():
    assert rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-3.0, -4.0, 1.0, 2.0]


def test_rotary_rotates_pairs_i_and_i_plus_half():
    torch.manual_seed(0)
    dim, base = 8, 10000.0
    rotary = Rotary(dim, base)
    positions = torch.tensor([[0, 1, 5, 300]])
    cos, sin = rotary.tables(positions, [1.0])
    x = torch.randn(1, 1, 4, dim)
    got = apply_rotary(x, cos, sin)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions[0, :, None].double() * inv_freq  # [T, dim/2]
    a, b = x[0, 0, :, :dim // 2].double(), x[0, 0, :, dim // 2:].double()
    want = torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)
    torch.testing.assert_close(got[0, 0].double(), want, atol=1e-4, rtol=1e-4)


def test_rotary_dot_products_depend_only_on_distance():
    torch.manual_seed(0)
    rotary = Rotary(16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rotary.tables(torch.tensor([[pq]]), [1.0])
        ck, sk = rotary.tables(torch.tensor([[pk]]), [1.0])
        return float((apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
    assert abs(score(7, 3) - score(7, 1)) > 1.0  # the distance does matter


def test_ntk_alpha_values():
    assert [ntk_alpha(n, 256) for n in (1, 256, 257, 512, 513, 1024, 1025)] == [1, 1, 3, 3, 7, 7, 15]


def test_ntk_alpha_changes_the_rotary_base():
    rotary = Rotary(64, 10000.0)
    base = 10000.0 * 3.0 ** (64 / 62)
    expected = 1.0 / base ** (torch.arange(0, 64, 2).float() / 64)
    torch.testing.assert_close(rotary.inv_freq(3.0, "cpu"), expected)
    assert torch.equal(rotary.inv_freq(1.0, "cpu"), 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64))


def test_logn_scale_applies_only_past_seq_length():
    scale = logn_scale(torch.tensor([[0, 254, 255, 256, 511]]), 256).flatten().tolist()
    assert scale[:3] == [1.0, 1.0, 1.0]
    assert scale[3] == pytest.approx(math.log(257) / math.log(256))
    assert scale[4] == pytest.approx(1.125)  # log(512) / log(256)


def test_decoder_attention_matches_a_hand_written_reference():
    """c_attn stacked [q; k; v], rotary on q and k, log-n on q, causal softmax, c_proj (SPEC 4)."""
    torch.manual_seed(0)
    config = tiny_config()
    attn = Attention(config)
    with torch.no_grad():
        attn.c_attn.bias.normal_()
    b, t, heads, hd = 1, 6, 2, 8
    x = torch.randn(b, t, 16)
    positions = torch.arange(4, 4 + t)[None]  # crosses seq_length 8: log-n applies to the last ones
    alpha = 3.0
    cos, sin = Rotary(hd, 10000.0).tables(positions, [alpha])
    logn = logn_scale(positions, config.seq_length)
    with torch.no_grad():
        got = attn(x, Step(cos=cos, sin=sin, logn=logn, mask=None, start=0, cache=None))
        qkv = x @ attn.c_attn.weight.T + attn.c_attn.bias
        q, k, v = (part.view(b, t, heads, hd).transpose(1, 2) for part in qkv.split(heads * hd, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * logn
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * hd)
        torch.testing.assert_close(got, out @ attn.c_proj.weight.T, atol=1e-5, rtol=1e-5)


# ---- images as real inputs ----------------------------------------------------------------------------

def pad_span(ids: list[int]) -> list[int]:
    """The same prompt with every image span holding only <imgpad>: the image must come from images=."""
    out = list(ids)
    for i, token in enumerate(ids):
        if token == IMG_START:
            out[i + 1:i + 257] = [IMAGE_PAD_ID] * 256
    return out


IMAGE_INPUTS = {
    "relative path": lambda base: CAPTION_IMAGE,
    "pathlib.Path": lambda base: GOLDEN / CAPTION_IMAGE,
    "bytes": lambda base: (GOLDEN / CAPTION_IMAGE).read_bytes(),
    "data URI": lambda base: "data:image/png;base64," + base64.b64encode((GOLDEN / CAPTION_IMAGE).read_bytes()).decode(),
    "PIL image": lambda base: Image.open(GOLDEN / CAPTION_IMAGE),
    "http URL": lambda base: f"{base}/{CAPTION_IMAGE}",
    "file URI": lambda base: f"file://{GOLDEN / CAPTION_IMAGE}",
}


@pytest.mark.parametrize("kind", IMAGE_INPUTS)
def test_images_passed_alongside_ids_give_the_path_logits(model, in_golden, image_server, caption_logits, kind):
    image = IMAGE_INPUTS[kind](image_server)
    ids = torch.tensor([pad_span(CAPTION["input_ids"])])
    got = logits_of(model, ids, images=[image])[0, -8:]
    torch.testing.assert_close(got, caption_logits, atol=1e-5, rtol=0)
    out = model.generate(ids, images=[image], max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert out[0, ids.shape[1]:].tolist() == CASES["generate"][1]["output_ids"]


@pytest.mark.parametrize("kind", ["bytes", "data URI", "PIL image", "http URL"])
def test_image_references_inside_the_text(model, tokenizer, in_golden, image_server, caption_logits, kind):
    image = IMAGE_INPUTS[kind](image_server)
    prompt = tokenizer.from_list_format([{"image": image}, {"text": CAPTION["prompt"].split("\n", 1)[1]}])
    ids = tokenizer(prompt)["input_ids"]
    start = ids.index(IMG_START)
    assert len(ids) == len(CAPTION["input_ids"]) and ids[start + 257] == IMG_END
    if kind != "http URL":  # a data URI is far longer than the 256 positions of the span
        assert len(prompt) > 1000
    torch.testing.assert_close(logits_of(model, ids)[0, -8:], caption_logits, atol=1e-5, rtol=0)


def test_image_path_longer_than_the_span(model, tokenizer, tmp_path, caption_logits):
    folder = tmp_path / ("d" * 100) / ("e" * 100) / ("f" * 60)
    folder.mkdir(parents=True)
    shutil.copy(GOLDEN / CAPTION_IMAGE, folder / "picture.png")
    path = str(folder / "picture.png")
    assert len(path.encode()) > 256  # the original refused this; its bytes cannot live in the span
    ids = tokenizer(f"Picture 1:<img>{path}</img>\n" + CAPTION["prompt"].split("\n", 1)[1])["input_ids"]
    assert len(ids) == len(CAPTION["input_ids"]) and ids[ids.index(IMG_START) + 257] == IMG_END
    torch.testing.assert_close(logits_of(model, ids)[0, -8:], caption_logits, atol=1e-5, rtol=0)


def test_encode_images_batched_equals_one_by_one(model, in_golden):
    names = [c["image"] for c in CASES["visual"]]
    names = names + names[:4]  # 10 images: more than one internal chunk of the vision tower
    with torch.no_grad():
        batched = model.encode_images(names)
        single = torch.cat([model.encode_images([n]) for n in names])
    assert batched.shape == (10, 256, 128)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_encode_images_takes_pixel_tensors(model, in_golden):
    pixels = preprocess(Image.open(CAPTION_IMAGE), 448)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images([pixels]), model.encode_images([CAPTION_IMAGE]))


# ---- bad inputs -----------------------------------------------------------------------------------------

def image_prompt_ids(tokenizer, reference: str) -> torch.Tensor:
    return torch.tensor([tokenizer(f"Picture 1:<img>{reference}</img>\nWhat is it?")["input_ids"]])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_image_file_is_named(model, tokenizer, tmp_path):
    missing = str(tmp_path / "no_such_picture.png")
    with pytest.raises(ImageError, match="not found: .*no_such_picture.png"):
        model(image_prompt_ids(tokenizer, missing))
    with pytest.raises(ImageError, match="no_such_picture.png"):
        model.chat(tokenizer, f"Picture 1:<img>{missing}</img>\nhi", do_sample=False, max_new_tokens=2)


def test_corrupt_image_file_is_named(model, tokenizer, tmp_path):
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"this is not a picture at all" * 10)
    with pytest.raises(ImageError, match="not a readable image: .*garbage.png"):
        model(image_prompt_ids(tokenizer, str(bad)))
    with pytest.raises(ImageError, match="not a readable picture"):
        model(image_prompt_ids(tokenizer, "x"), images=[bad.read_bytes()])


@pytest.mark.parametrize("uri, message", [
    ("data:image/png;base64,@@@not-base64@@@", "invalid base64: data:image/png;base64,@@@"),
    ("data:image/png;base64", "malformed data URI"),
    ("data:image/png;base64," + base64.b64encode(b"plain words").decode(), "not a readable image: data:image/png"),
])
def test_bad_data_uri_is_named(model, tokenizer, uri, message):
    with pytest.raises(ImageError, match=message):
        model(image_prompt_ids(tokenizer, uri))
    with pytest.raises(ImageError, match=message):
        model(image_prompt_ids(tokenizer, "x"), images=[uri])


def test_unreachable_url_is_named(model, tokenizer, image_server):
    url = f"http://127.0.0.1:{closed_port()}/picture.png"
    with pytest.raises(ImageError, match=f"cannot download image {url}"):
        model(image_prompt_ids(tokenizer, url))
    missing = f"{image_server}/images/not_there.png"
    with pytest.raises(ImageError, match=f"cannot download image {missing}.*404"):
        model(image_prompt_ids(tokenizer, "x"), images=[missing])


def test_unsupported_image_object_is_named(model, tokenizer):
    with pytest.raises(ImageError, match="type int"):
        model(image_prompt_ids(tokenizer, "x"), images=[123])


def test_number_of_images_must_match_the_spans(model, tokenizer, in_golden):
    ids = image_prompt_ids(tokenizer, CAPTION_IMAGE)
    with pytest.raises(ValueError, match="2 images were given for 1 <img></img> spans"):
        model(ids, images=[CAPTION_IMAGE, CAPTION_IMAGE])
    with pytest.raises(ValueError, match="2 images were given for 1"):
        model.generate(ids, images=[CAPTION_IMAGE, CAPTION_IMAGE], max_new_tokens=1)
    with pytest.raises(ValueError, match="1 images were given but the prompt has no <img>"):
        model(torch.tensor([tokenizer("no picture here")["input_ids"]]), images=[CAPTION_IMAGE])


def test_malformed_image_span_is_refused(model, tokenizer):
    text = tokenizer("hello")["input_ids"]
    short_span = torch.tensor([text + [IMG_START] + [97] * 10 + [IMG_END] + text])
    with pytest.raises(ValueError, match="malformed image span in row 0 at column 1"):
        model(short_span)
    unclosed = torch.tensor([text + [IMG_START] + [97] * 300])
    with pytest.raises(ValueError, match=r"1 <img> but 0 </img>"):
        model(unclosed)
    not_bytes = torch.tensor([[IMG_START] + [1000] * 256 + [IMG_END]])
    with pytest.raises(ImageError, match="not reference bytes"):
        model(not_bytes)


def test_right_padding_forward_equals_solo_but_generate_refuses_it(model, tokenizer):
    ids = torch.tensor([tokenizer("Hello there, world")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        solo = model(ids[1:, :-2]).logits
    torch.testing.assert_close(padded[1, :-2], solo[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=1)
    mask[1] = 0
    with pytest.raises(ValueError, match="all padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=1)
