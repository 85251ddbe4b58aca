"""The command line: answers, JSON, drawing, the chat loop, the benchmark, and one-line errors."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import qwenvl
from qwenvl import cli
from qwenvl.model import QWenLMHeadModel

from conftest import CHECKPOINT, GOLDEN

IMAGE = str(GOLDEN / "images" / "shapes_640x480.png")
BASE = ["-m", str(CHECKPOINT), "--dtype", "fp32", "--greedy"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def boxed_answer(monkeypatch):
    """Make every chat turn answer with a fixed grounded reply (random weights never produce boxes)."""
    reply = "<ref>the square</ref><box>(100,200),(300,400)</box>"

    def chat(self, tokenizer, query, history=None, system="", **kwargs):
        history = [] if history is None else history
        history.append((query, reply))
        return reply, history

    monkeypatch.setattr(QWenLMHeadModel, "chat", chat)
    return reply


def test_generate_prints_the_chat_answer(capsys, tokenizer, model):
    code, out, err = run(capsys, "generate", *BASE, "--image", IMAGE, "--prompt", "What is this?",
                         "--max-new-tokens", "6")
    assert code == 0 and err == ""
    query = tokenizer.from_list_format([{"image": IMAGE}, {"text": "What is this?"}])
    expected, _ = model.chat(tokenizer, query, history=[], do_sample=False, max_new_tokens=6)
    assert out == expected + "\n"


def test_generate_json_gives_boxes_in_both_spaces(capsys, boxed_answer):
    code, out, _ = run(capsys, "generate", *BASE, "--image", IMAGE, "--prompt", "Where is the square?", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["response"] == boxed_answer
    assert result["boxes"] == [{"box": [100, 200, 300, 400], "ref": "the square", "pixels": [64, 96, 192, 192]}]


def test_generate_draw_saves_the_box_on_the_image(capsys, tmp_path, boxed_answer):
    out_png = tmp_path / "boxes.png"
    code, _, err = run(capsys, "generate", *BASE, "--image", IMAGE, "--prompt", "Where?", "--draw", str(out_png))
    assert code == 0 and "saved 1 box" in err
    drawn = np.asarray(Image.open(out_png).convert("RGB")).astype(int)
    original = np.asarray(Image.open(IMAGE).convert("RGB")).astype(int)
    changed = np.abs(drawn - original).sum(-1) > 0
    assert changed[96:193, 64].any() and changed[96, 64:193].any()  # the box's left and top edges
    assert not changed[300:, 400:].any()  # far from the box and its label: untouched
    assert list(tmp_path.iterdir()) == [out_png]  # no temporary file left behind


@pytest.mark.parametrize("argv, needle", [
    (["--image", "missing.png"], "missing.png"),
    (["--image", "data:image/png;base64,@@@"], "data URI"),
    (["--top-p", "2"], "top_p"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
])
def test_generate_bad_input_is_one_line(capsys, argv, needle):
    code, out, err = run(capsys, "generate", *BASE, "--prompt", "hi", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("qwenvl: error:") and needle in err


def test_generate_corrupt_image_and_missing_model(capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    code, _, err = run(capsys, "generate", *BASE, "--image", str(bad), "--prompt", "hi")
    assert code == 2 and "broken.png" in err and err.count("\n") == 1
    code, _, err = run(capsys, "generate", "-m", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert code == 2 and "nowhere" in err and err.count("\n") == 1


def test_chat_loop_commands(capsys, monkeypatch, tmp_path, boxed_answer):
    out_png = tmp_path / "chat.png"
    lines = iter([":help", f":image {IMAGE}", "Where is the square?", ":history", f":draw {out_png}",
                  ":image nothing-here.png", ":bogus", ":clear", ":history", ":quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    streamed = []

    def chat_stream(self, tokenizer, query, history=None, system="", **kwargs):
        streamed.append(query)
        yield boxed_answer[:10]
        yield boxed_answer

    monkeypatch.setattr(QWenLMHeadModel, "chat_stream", chat_stream)
    code, out, err = run(capsys, "chat", *BASE)
    assert code == 0
    assert streamed == [f"Picture 1:<img>{IMAGE}</img>\nWhere is the square?"]
    assert "Assistant> " + boxed_answer in out  # streamed pieces join into the whole answer once
    assert f"[1] Assistant: {boxed_answer}" in out
    assert out_png.exists() and "saved 1 box" in out
    assert "(no turns yet)" in out  # after :clear
    assert "nothing-here.png" in err and "unknown command :bogus" in err


def test_chat_ends_on_end_of_input(capsys, monkeypatch):
    def eof(prompt=""):
        raise EOFError
    monkeypatch.setattr("builtins.input", eof)
    assert cli.main(["chat", *BASE]) == 0


def test_bench_prints_measured_figures(capsys):
    code, out, _ = run(capsys, "bench", "--random-config", "tiny", "--dtype", "fp32", "--repeats", "1",
                       "--decode-tokens", "4", "--prompt-tokens", "8")
    assert code == 0
    figures = {name: float(value) for name, value in re.findall(r"^([a-z ,0-9()]+?)\s{2,}([0-9.]+)", out, re.M)}
    assert figures["decode, batch 1"] > 0 and figures["memory copy bandwidth"] > 0
    ceiling = figures["bandwidth ceiling"]
    assert figures["fraction of ceiling"] == pytest.approx(100 * figures["decode, batch 1"] / ceiling, rel=0.02, abs=0.1)


def test_bench_refuses_both_model_and_random_config(capsys):
    code, _, err = run(capsys, "bench", "-m", str(CHECKPOINT), "--random-config", "tiny")
    assert code == 2 and "not both" in err


def test_console_script_is_declared():
    from importlib.metadata import entry_points
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("qwenvl") == "qwenvl.cli:main"
    assert qwenvl.__version__


def test_bench_refuses_a_config_that_does_not_fit(capsys, monkeypatch):
    from qwenvl import bench
    monkeypatch.setattr(bench, "available_memory", lambda device: 1 << 30)
    code, out, err = run(capsys, "bench", "--random-config", "0.5b", "--dtype", "fp32")
    assert code == 2 and out == "" and "GB available" in err and err.count("\n") == 1


def test_data_synth_writes_a_valid_training_file(capsys, tmp_path):
    from qwenvl.train.data import load_records
    assert cli.main(["data", "synth", "--out", str(tmp_path), "--n", "4", "--seed", "5"]) == 0
    records = load_records(tmp_path / "train.json")
    assert len(records) == 4 and all(r["meta"]["task"] for r in records)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_bad_image_is_reported_before_the_model_loads(capsys, monkeypatch, command):
    def no_load(args):
        raise AssertionError("the model was loaded before the image was checked")
    monkeypatch.setattr(cli, "_load", no_load)
    extra = ["--prompt", "hi"] if command == "generate" else []
    code, _, err = run(capsys, command, *BASE, "--image", "no-such.png", *extra)
    assert code == 2 and "no-such.png" in err


def test_bench_quant_measures_each_mode_against_bf16_in_one_run(capsys):
    code, out, _ = run(capsys, "bench", "--random-config", "tiny", "--quant", "int4,int8", "--quant-lm-head",
                       "--repeats", "1", "--decode-tokens", "2", "--prompt-tokens", "4")
    assert code == 0 and "activations bfloat16" in out
    rows = {m[0]: [float(v) for v in m[1:]] for m in re.findall(
        r"^(\w+) +decode +([0-9.]+) tokens/s \(([0-9.]+)x bf16\) +prefill +([0-9.]+) ms \(([0-9.]+)x bf16's time\)"
        r".*decoder weights +([0-9.]+) MB \(([0-9.]+)x bf16\)", out, re.M)}
    assert list(rows) == ["bf16", "int4", "int8"]
    for mode, (speed, ratio, prefill, prefill_ratio, mb, mb_ratio) in rows.items():
        assert speed > 0 and prefill > 0 and mb > 0
        assert ratio == pytest.approx(speed / rows["bf16"][0], abs=0.01)
    # lm_head quantized too: the tiny decoder is mostly lm_head, so its bytes shrink with the bits
    assert rows["int4"][5] < 0.4 and rows["int8"][5] < 0.6 and rows["bf16"][5] == 1.0


def test_bench_quant_names_a_bad_mode(capsys):
    code, out, err = run(capsys, "bench", "--random-config", "tiny", "--quant", "int4,int3")
    assert code == 2 and "--quant takes a comma list of int4, int8, got 'int4,int3'" in err
    code, out, err = run(capsys, "bench", "--random-config", "tiny", "--quant-lm-head")
    assert code == 2 and "--quant-lm-head goes with --quant" in err
