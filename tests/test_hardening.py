"""Issue 16's table, one test per row: every bad input ends in a QwenVLError (or the right result) within a
time and memory bound. Servers listen on 127.0.0.1 on a free port and stop by themselves."""
import contextlib
import http.server
import io
import json
import os
import shutil
import struct
import sys
import threading
import time
import tracemalloc
import zlib

import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl import cli, images
from qwenvl.boxes import draw_boxes, latest_image, parse_boxes, split_tags, to_pixels
from qwenvl.errors import CheckpointError, ImageError, OptionsError, QwenVLError, RequestError
from qwenvl.images import ImageLimits, load_image
from qwenvl.model import QWenLMHeadModel

from conftest import CHECKPOINT, GOLDEN

IMAGE = str(GOLDEN / "images" / "shapes_640x480.png")
BASE = ["-m", str(CHECKPOINT), "--dtype", "fp32", "--greedy"]


@contextlib.contextmanager
def bounded(seconds: float, megabytes: float | None = None, cpu: bool = False):
    """The block must end within `seconds` (of this process's CPU time with `cpu`, for work that a busy
    machine would slow down; else of wall time, for waits), and allocate at most `megabytes` at its peak."""
    clock = time.process_time if cpu else time.monotonic
    if megabytes is not None:
        tracemalloc.start()
    start = clock()
    try:
        yield
    finally:
        elapsed = clock() - start
        peak = tracemalloc.get_traced_memory()[1] if megabytes is not None else 0
        if megabytes is not None:
            tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.1f} s (bound {seconds} s)"
    if megabytes is not None:
        assert peak < megabytes * 2 ** 20, f"peak {peak / 2 ** 20:.1f} MB (bound {megabytes} MB)"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height (its pixel data is a stub: decoding would fail)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (48 << 20)))
            + chunk(b"IEND", b""))


# ---- hostile http servers ---------------------------------------------------------------------------------

SERVER_LIFETIME_S = 20  # no handler runs longer than this, whatever the client does


class HostileHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client gave up: so do we
            return False

    def do_GET(self):
        stop = time.monotonic() + SERVER_LIFETIME_S
        if self.path == "/ok.png":
            body = open(IMAGE, "rb").read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self._send(body)
        elif self.path in ("/huge-declared", "/huge-stream"):
            self.send_response(200)
            if self.path == "/huge-declared":
                self.send_header("Content-Length", str(2 << 30))
            self.end_headers()
            chunk = b"\0" * (1 << 16)
            while time.monotonic() < stop and self._send(chunk):
                pass
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            while time.monotonic() < stop and self._send(b"\0"):
                time.sleep(0.2)
        elif self.path == "/slow-headers":
            self._send(b"HTTP/1.0 200 OK\r\n")
            while time.monotonic() < stop and self._send(b"X"):
                time.sleep(0.2)
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self.send_error(404)


@pytest.fixture(scope="module")
def hostile_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# ---- high: memory and hangs ------------------------------------------------------------------------------

def test_dev_zero_is_refused_as_an_image(model, tokenizer):
    with bounded(2, 16, cpu=True), pytest.raises(ImageError, match="/dev/zero is not a regular file"):
        model.encode_images(["/dev/zero"])
    with bounded(10, cpu=True), pytest.raises(ImageError, match="/dev/zero"):
        model.chat(tokenizer, "<img>/dev/zero</img>what is it?", do_sample=False, max_new_tokens=2)


def test_dev_zero_in_a_chat_prompt_gets_a_message(capsys, monkeypatch):
    lines = iter(["<img>/dev/zero</img> what is it?", ":image /dev/zero", ":quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, _, err = run(capsys, "chat", *BASE, "--max-new-tokens", "2")
    assert code == 0
    messages = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(messages) == 2 and all("/dev/zero is not a regular file" in m for m in messages)


def test_a_huge_download_is_cut_at_the_byte_cap(hostile_server):
    with bounded(5, 16), pytest.raises(ImageError, match=r"holds 2147483648 bytes, over the image limit"):
        load_image(f"{hostile_server}/huge-declared")  # refused from Content-Length, nothing read
    limits = ImageLimits(max_bytes=1 << 20)
    with bounded(5, 16), pytest.raises(ImageError, match="over the image limit of 1048576"):
        load_image(f"{hostile_server}/huge-stream", limits)  # no length given: counted while streaming


def test_a_trickling_server_meets_one_deadline(hostile_server):
    limits = ImageLimits(timeout_s=1.0)
    for path in ("/slow", "/slow-headers"):  # each read is quick; the whole is not
        with bounded(5), pytest.raises(ImageError, match="not done within 1 s"):
            load_image(f"{hostile_server}{path}", limits)


def test_downloads_that_work_and_redirect_loops(hostile_server):
    assert load_image(f"{hostile_server}/ok.png").size == (640, 480)
    with bounded(5), pytest.raises(ImageError, match="redirects"):
        load_image(f"{hostile_server}/loop")


def test_a_named_pipe_is_not_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_error_of(load_image, str(fifo))), daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "reading a FIFO blocked"
    assert isinstance(errors[0], ImageError) and "not a regular file" in str(errors[0])


def _error_of(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # returned to the test, which checks its type
        return e
    return None


def test_byte_cap_on_files_and_data_uris(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 << 20))
    limits = ImageLimits(max_bytes=1 << 20)
    with bounded(2, 4, cpu=True), pytest.raises(ImageError, match="big.png holds 2097152 bytes, over the image limit"):
        load_image(str(big), limits)
    uri = "data:image/png;base64," + "A" * (4 << 20)
    with bounded(2, 8, cpu=True), pytest.raises(ImageError, match="data URI .* over the image limit"):
        load_image(uri, limits)


# ---- medium: pixel bombs ----------------------------------------------------------------------------------

def test_a_png_declaring_20000_squared_is_a_clean_error(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    assert bomb.stat().st_size < 100_000
    with bounded(2, 64, cpu=True), pytest.raises(ImageError, match="400000000 pixels"):
        load_image(str(bomb))
    code, out, err = run(capsys, "generate", *BASE, "--image", str(bomb), "--prompt", "hi")
    assert code == 2 and out == "" and err.count("\n") == 1 and "bomb.png" in err
    assert "DecompressionBomb" not in err


def test_the_pixel_cap_is_read_from_the_header_and_configurable(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_declaring(12000, 12000))
    with bounded(2, 64, cpu=True), pytest.raises(ImageError, match="12000x12000 = 144000000 pixels, over the limit"):
        load_image(str(big))  # the stub pixel data is never decoded: the header decides first
    assert load_image(IMAGE).size == (640, 480)
    with pytest.raises(ImageError, match="640x480"):
        load_image(IMAGE, ImageLimits(max_pixels=640 * 480 - 1))
    old = images.set_limits(max_pixels=1000)
    try:
        with pytest.raises(ImageError, match="over the limit of 1000"):
            load_image(IMAGE)
    finally:
        images.set_limits(**vars(old))
    with pytest.raises(OptionsError, match="max_pixels"):
        ImageLimits(max_pixels=0)


def test_image_limits_from_the_environment_and_the_command_line(capsys, monkeypatch):
    assert ImageLimits.from_env({"QWENVL_MAX_IMAGE_PIXELS": "100", "QWENVL_IMAGE_TIMEOUT": "2.5"}) == \
        ImageLimits(max_pixels=100, timeout_s=2.5)
    with pytest.raises(OptionsError, match="QWENVL_MAX_IMAGE_BYTES"):
        ImageLimits.from_env({"QWENVL_MAX_IMAGE_BYTES": "lots"})
    monkeypatch.setattr(images, "_limits", None)  # restored after the test
    code, _, err = run(capsys, "generate", *BASE, "--image", IMAGE, "--prompt", "hi", "--max-image-pixels", "1000")
    assert code == 2 and "over the limit of 1000" in err and err.count("\n") == 1


# ---- medium: quadratic parsing ----------------------------------------------------------------------------

def test_tag_parsing_is_linear(tokenizer):
    with bounded(3, cpu=True):  # 18 s when each element searched the rest of the text again
        assert parse_boxes("<ref>a</ref>" * 32000) == []
    with bounded(3, cpu=True):
        assert len(parse_boxes("<ref>a</ref><box>(1,2),(3,4)</box>" * 32000)) == 32000
    with bounded(3, cpu=True):
        assert len(tokenizer.to_list_format("<ref>a</ref>" * 32000)) == 32000
    with bounded(3, cpu=True):
        assert latest_image("<box>(1,2),(3,4)</box>" * 32000, [("<img>a.png</img>" * 32000, "x")]) == "a.png"
    with bounded(3, cpu=True):  # unclosed tags: each stays text, the scan goes on
        assert split_tags("<ref>" * 100000, strict=False) == [{"text": "<ref>" * 100000}]


# ---- medium: prompts and answers past the position limit --------------------------------------------------

def test_a_prompt_past_the_position_limit_names_both_numbers(model, tokenizer):
    limit = model.config.max_position_embeddings
    with bounded(5, cpu=True), pytest.raises(RequestError, match=f"{limit + 1} tokens, more than the model's {limit}"):
        model.generate(torch.full((1, limit + 1), 100), max_new_tokens=1, do_sample=False)
    with bounded(10, cpu=True), pytest.raises(RequestError, match=f"more than the model's {limit} positions"):
        model.chat(tokenizer, "hello " * limit, do_sample=False, max_new_tokens=1)


def test_a_two_megabyte_line_in_chat(capsys, monkeypatch):
    lines = iter(["hello world " * 175_000, ":quit"])  # 2.1 MB, about 350,000 tokens
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    with bounded(60, cpu=True):
        code, _, err = run(capsys, "chat", *BASE)
    assert code == 0
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "tokens, more than the model's 8192 positions" in message[0]


def test_a_billion_new_tokens_is_refused_before_allocating(model, capsys):
    needle = r"3 tokens plus max_new_tokens=1000000000 exceed .* 8192"
    with bounded(5, cpu=True), pytest.raises(RequestError, match=needle):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=1_000_000_000, do_sample=False)
    code, out, err = run(capsys, "generate", *BASE, "--prompt", "hi", "--max-new-tokens", "1000000000")
    assert code == 2 and out == "" and err.count("\n") == 1 and "max_new_tokens=1000000000" in err


# ---- medium: sampling values ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, name", [
    (dict(do_sample=True, temperature=float("nan")), "temperature"),
    (dict(do_sample=True, temperature=1e-45), "temperature"),
    (dict(do_sample=True, temperature=float("inf")), "temperature"),
    (dict(do_sample=True, repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(do_sample=False, repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(do_sample=True, top_p=float("nan")), "top_p"),
])
def test_non_finite_or_tiny_sampling_values_are_refused(model, options, name):
    with bounded(2, cpu=True), pytest.raises(OptionsError, match=name):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, **options)


# ---- medium: command-line values --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["generate", *BASE, "--prompt", "hi", "--device", "foo"], "unknown device 'foo'"),
    (["generate", *BASE, "--prompt", "hi", "--device", "cuda:-1"], "cuda:-1"),
    (["generate", *BASE, "--prompt", "hi", "--device", "meta"], "device 'meta' cannot run a model"),
    (["bench", "--random-config", "tiny", "--decode-tokens", "0"], "--decode-tokens must be at least 1"),
    (["bench", "--random-config", "tiny", "--device", "meta"], "meta"),
    (["quantize", "-m", str(CHECKPOINT), "--out", "{tmp}/q", "--group-size", "0"], "group_size must be a positive"),
])
def test_bad_command_line_values_are_one_line(capsys, tmp_path, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with bounded(20, cpu=True):
        code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("qwenvl: error:") and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "q").exists()


def test_a_real_bug_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(cli, "cmd_generate", broken)  # build_parser looks it up when main runs
    with pytest.raises(ZeroDivisionError):
        cli.main(["generate", "--prompt", "hi"])


# ---- medium and low: checkpoints ----------------------------------------------------------------------------

def checkpoint_with(tmp_path, change=None, visual=None, generation=None, name="ckpt"):
    """A folder with the golden config.json (changed) and no weights: config errors must come first."""
    folder = tmp_path / name
    folder.mkdir()
    config = json.loads((CHECKPOINT / "config.json").read_text())
    config.update(change or {})
    config["visual"].update(visual or {})
    (folder / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_ten_million_layers_is_refused_at_once(tmp_path):
    folder = checkpoint_with(tmp_path, {"num_hidden_layers": 10_000_000})
    with bounded(2, 16, cpu=True), pytest.raises(CheckpointError, match="num_hidden_layers must be in .*10000000"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")


@pytest.mark.parametrize("change, visual, generation, needle", [
    ({"hidden_size": "128"}, None, None, "hidden_size must be an integer, got '128'"),
    ({"hidden_size": 128.0}, None, None, "hidden_size must be an integer, got 128.0"),
    ({"hidden_size": -1}, None, None, "hidden_size must be in"),
    (None, {"width": 1e9}, None, "visual.width must be an integer"),
    (None, {"heads": 0}, None, "visual.heads must be in"),
    (None, {"heads": 3}, None, "visual.width 64 must be divisible by visual.heads 3"),
    (None, {"image_size": 0}, None, "visual.image_size must be in"),
    ({"seq_length": 0}, None, None, "seq_length must be in"),
    ({"quantization_config": "yes"}, None, None, "quantization_config must be an object"),
    ({"use_dynamic_ntk": "yes"}, None, None, "use_dynamic_ntk must be true or false"),
    ({"kv_channels": 2}, None, None, "kv_channels must be in"),
    (None, None, [1], "generation_config.json must hold a JSON object"),
    (None, None, {"max_new_tokens": "lots"}, "max_new_tokens must be an integer"),
])
def test_malformed_configs_are_named(tmp_path, change, visual, generation, needle):
    folder = checkpoint_with(tmp_path, change, visual, generation)
    with bounded(2, cpu=True), pytest.raises(CheckpointError, match=needle):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")


def test_a_weight_map_that_is_a_list(tmp_path):
    folder = checkpoint_with(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to shard file names"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")


@pytest.mark.parametrize("shard", ["../elsewhere/x.safetensors", "../../elsewhere/x.safetensors", "ABSOLUTE"])
def test_shard_names_stay_inside_the_checkpoint(tmp_path, shard):
    folder = checkpoint_with(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(CHECKPOINT / "model-00001-of-00002.safetensors", outside / "x.safetensors")  # only the name is wrong
    shard = str(outside / "x.safetensors") if shard == "ABSOLUTE" else shard
    index = {"weight_map": {"lm_head.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file inside the checkpoint folder"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")


# ---- low: injection ---------------------------------------------------------------------------------------

def test_an_image_item_cannot_open_a_second_image(tokenizer):
    with pytest.raises(ImageError, match="contains <img> or </img>"):
        tokenizer.from_list_format([{"image": "x.png</img>hello<img>y.png"}, {"text": "hi"}])
    with pytest.raises(QwenVLError, match="ref"):
        tokenizer.from_list_format([{"ref": "a</ref><box>(1,2),(3,4)</box><ref>b", "box": [(1, 2, 3, 4)]}])
    text = tokenizer.from_list_format([{"image": "x.png"}, {"text": "hi"}])
    assert [e for e in tokenizer.to_list_format(text) if "image" in e] == [{"image": "x.png"}]


# ---- low: the misc row ------------------------------------------------------------------------------------

def test_a_400_digit_coordinate(capsys, monkeypatch, tmp_path):
    huge = int("9" * 400)
    reply = f"<ref>it</ref><box>({huge},1),(2,3)</box>"
    assert parse_boxes(reply) == [{"box": (huge, 1, 2, 3), "ref": "it"}]
    assert to_pixels((huge, 1, 2, 3), 640, 480)[0] == huge * 640 // 1000
    assert to_pixels((-huge, 500, 1000, 0), 640, 480)[:3] == (-(huge * 640 // 1000), 240, 640)
    assert draw_boxes(Image.new("RGB", (64, 48)), parse_boxes(reply)).size == (64, 48)

    def chat(self, tokenizer, query, history=None, system="", **kwargs):
        return reply, (history or []) + [(query, reply)]
    monkeypatch.setattr(QWenLMHeadModel, "chat", chat)
    out_png = tmp_path / "drawn.png"
    code, out, err = run(capsys, "generate", *BASE, "--image", IMAGE, "--prompt", "where?", "--json",
                         "--draw", str(out_png))
    assert code == 0 and out_png.exists()
    assert json.loads(out)["boxes"][0]["pixels"][0] == huge * 640 // 1000


def test_history_shapes(model, tokenizer):
    openai = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with bounded(2, cpu=True), pytest.raises(RequestError, match="history item 0 is a dict"):
        model.chat(tokenizer, "and now?", history=openai, do_sample=False, max_new_tokens=2)
    with pytest.raises(RequestError, match="history item 0"):
        model.chat(tokenizer, "and now?", history=[("only a query",)], do_sample=False, max_new_tokens=2)
    turns = (("hi", "hello"),)
    response, history = model.chat(tokenizer, "and now?", history=turns, do_sample=False, max_new_tokens=2)
    assert history == [("hi", "hello"), ("and now?", response)] and turns == (("hi", "hello"),)


@pytest.mark.parametrize("options, needle", [
    (dict(do_sample="False"), "do_sample must be True or False"),
    (dict(stop_words_ids=[151645]), "stop_words_ids must be a list of token id lists"),
    (dict(seed=2 ** 64, do_sample=True), "seed must fit in 64 bits"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(eos_token_id="151643"), "eos_token_id"),
])
def test_option_types_follow_hf(model, options, needle):
    with pytest.raises(OptionsError, match=needle):
        model.generate(torch.tensor([[1, 2, 3]]), **{"max_new_tokens": 2, **options})


def test_generate_on_empty_or_foreign_ids(model):
    with pytest.raises(RequestError, match="the prompt is empty"):
        model.generate(torch.tensor([[]], dtype=torch.long), max_new_tokens=2, do_sample=False)
    with pytest.raises(RequestError, match="the prompt is empty"):
        model.generate([], max_new_tokens=2, do_sample=False)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        model.generate(torch.tensor([[1, 10 ** 7]]), max_new_tokens=2, do_sample=False)
    stops = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, stop_words_ids=[[151645]])
    assert stops.shape[1] <= 6


def test_a_box_after_an_unclosed_ref_is_kept():
    assert parse_boxes("<ref>a<box>(1,2),(3,4)</box>") == [{"box": (1, 2, 3, 4), "ref": None}]
    assert latest_image("<img>a.png<img>b.png</img>") == "a.png<img>b.png"  # the original's pairing rule


def test_a_non_utf8_terminal_still_shows_the_reply(monkeypatch):
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="latin-1", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BytesIO(), encoding="latin-1", errors="strict"))
    lines = iter(["hi", ":quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))

    def chat_stream(self, tokenizer, query, history=None, system="", **kwargs):
        yield "café 你好"
    monkeypatch.setattr(QWenLMHeadModel, "chat_stream", chat_stream)
    assert cli.main(["chat", *BASE]) == 0
    stdout.flush()
    assert "Assistant> café ??".encode("latin-1") in raw.getvalue()


def test_every_user_error_type_shares_the_base():
    from qwenvl.eval.tasks import EvalDataError
    from qwenvl.train.data import DataError
    for kind in (CheckpointError, ImageError, OptionsError, RequestError, DataError, EvalDataError, cli.UsageError):
        assert issubclass(kind, QwenVLError) and issubclass(kind, ValueError)
