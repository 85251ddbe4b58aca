"""The synthetic data generator: deterministic files, ground truth that matches the drawn pixels, output
the training loader accepts."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from qwenvl.boxes import LATIN_FONT_PATHS, parse_boxes, to_pixels
from qwenvl.data import synth
from qwenvl.train.data import load_records

SIZE = 160


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    path = synth.generate(out, 24, seed=3, image_size=SIZE, langs=("en", "zh"))
    return out, path, json.loads(path.read_text(encoding="utf-8"))


def test_same_seed_same_bytes_other_seed_differs(generated, tmp_path):
    out, _, _ = generated
    again = synth.generate(tmp_path / "again", 24, seed=3, image_size=SIZE, langs=("en", "zh")).parent
    assert _files(again) == _files(out)
    other = synth.generate(tmp_path / "other", 24, seed=4, image_size=SIZE, langs=("en", "zh")).parent
    assert _files(other)["train.json"] != _files(out)["train.json"]
    test_split = synth.generate(tmp_path / "test", 4, seed=3, split="test", image_size=SIZE).parent
    assert (test_split / "test.json").is_file() and not (test_split / "train.json").exists()


def test_passes_the_training_loader_and_covers_every_task(generated):
    out, path, records = generated
    loaded = load_records(path)
    assert [r["id"] for r in loaded] == [r["id"] for r in records]
    assert loaded[0]["meta"] == records[0]["meta"]  # the loader keeps the ground truth
    assert {r["meta"]["task"] for r in records} == set(synth.TASKS)
    assert {r["meta"]["lang"] for r in records} == {"en", "zh"}
    for record in records:
        answers = [t["value"] for t in record["conversations"][1::2]]
        assert answers == [a["answer"] for a in record["meta"]["answers"]]
        for image in record["meta"]["images"]:
            assert f"<img>{image['file']}</img>" in record["conversations"][0]["value"]
            assert Image.open(out / image["file"]).size == (SIZE, SIZE)


def _pixels(out, image):
    return np.asarray(Image.open(out / image["file"]).convert("RGB")).astype(int)


def test_boxes_match_the_drawn_pixels(generated):
    out, _, records = generated
    checked = 0
    for record in records:
        for image in record["meta"]["images"]:
            pixels = _pixels(out, image)
            for thing in image["things"]:
                x1, y1, x2, y2 = thing["pixel_box"]
                exact = (pixels == synth.COLOURS[thing["colour"]]).all(-1)
                inside = exact[y1:y2, x1:x2]
                # tight: every edge row and column of the box holds the shape's colour
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
                elsewhere = exact.copy()
                for other in image["things"]:  # shapes may share a colour; the word never uses one
                    if other["colour"] == thing["colour"]:
                        ox1, oy1, ox2, oy2 = other["pixel_box"]
                        elsewhere[oy1:oy2, ox1:ox2] = False
                assert not elsewhere.any(), (record["id"], thing)
                back = to_pixels(thing["box"], image["width"], image["height"])
                assert max(abs(a - b) for a, b in zip(back, thing["pixel_box"])) <= 1
                checked += 1
    assert checked > 30


def test_answers_are_exact(generated):
    out, _, records = generated
    seen = set()
    for record in records:
        images = record["meta"]["images"]
        things = images[0]["things"]
        for answer in record["meta"]["answers"]:
            task = answer["task"]
            seen.add(task)
            if task == "count":
                assert answer["answer"] == str(len(things))
            elif task == "compare_total":
                assert answer["answer"] == str(sum(len(i["things"]) for i in images))
            elif task == "compare_more":
                more = 1 + (len(images[1]["things"]) > len(images[0]["things"]))
                assert answer["answer"] in (f"Picture {more}", f"图{more}")
            elif task == "grounding":
                (box,) = parse_boxes(answer["answer"])
                assert box["box"] == tuple(answer["box"]) and box["ref"] == answer["ref"]
                assert list(answer["box"]) in [t["box"] for t in things]
            elif task == "grounded_caption":
                boxes = [b["box"] for b in parse_boxes(answer["answer"])]
                word = images[0]["word"]
                assert boxes == [tuple(t["box"]) for t in things] + ([tuple(word["box"])] if word else [])
            elif task == "ocr":
                word = images[0]["word"]
                assert answer["answer"] == word["text"]
                x1, y1, x2, y2 = word["pixel_box"]
                ink = np.abs(_pixels(out, images[0])[y1:y2, x1:x2] - word["colour"]).sum(-1) < 60
                assert ink.sum() > 20  # the word is drawn in its box
            elif task == "caption" and record["meta"]["lang"] == "en":
                for thing in things:
                    assert f"{thing['colour']} {thing['shape']}" in answer["answer"]
    assert {"count", "grounding", "ocr", "grounded_caption"} <= seen


def test_multi_turn_answers_are_not_given_away_by_earlier_turns(tmp_path):
    path = synth.generate(tmp_path, 30, seed=5, image_size=SIZE, langs=("en", "zh"), tasks=("multi",))
    records = json.loads(path.read_text(encoding="utf-8"))
    turns = 0
    for record in records:
        answers, conv = record["meta"]["answers"], record["conversations"]
        things = record["meta"]["images"][0]["things"]
        captions = [k for k, a in enumerate(answers) if a["task"] in ("caption", "grounded_caption")]
        assert captions in ([], [len(answers) - 1])  # a caption names everything: only last
        asked = [a["thing"] for a in answers if "thing" in a]
        assert len(asked) == len(set(asked))  # each shape once
        for task in ("count", "ocr"):
            assert sum(a["task"] == task for a in answers) <= 1
        for k, answer in enumerate(answers[: captions[0] if captions else None]):
            earlier = "".join(t["value"] for t in conv[: 2 * k])
            thing = things[answer["thing"]] if "thing" in answer else None
            if thing:  # neither its box nor its full name is anywhere before
                zh = record["meta"]["lang"] == "zh"
                name = f"{synth.COLOURS_ZH[thing['colour']]}的{synth.SHAPES_ZH[thing['shape']]}" if zh else \
                    f"{thing['colour']} {thing['shape']}"
                assert synth._box_text(thing["box"]) not in earlier and name not in earlier, (record["id"], answer)
            turns += 1
    assert turns > 60 and {a["task"] for r in records for a in r["meta"]["answers"]} >= {
        "count", "colour", "shape", "position", "grounding", "referring"}


def test_phrases_and_positions():
    thing = synth.Thing("circle", "orange", "small", "left", "top", (0, 0, 10, 10), (0, 0, 62, 62))
    assert synth.phrase(thing, "en") == "the orange circle"
    assert synth.phrase(thing, "zh") == "橙色的圆形"
    picture = synth.Picture(160, 160, {"kind": "plain"}, [thing])
    assert synth.caption(picture, "en") == "An orange circle at the top left."
    assert (synth.caption(picture, "en", grounded=True)
            == "<ref>An orange circle</ref><box>(0,0),(62,62)</box> at the top left.")
    assert synth.caption(picture, "zh") == "左上方有一个橙色的圆形。"
    q, answer, _ = synth.grounding(thing, "zh")
    assert q == "框出图中橙色的圆形" and answer == "<ref>橙色的圆形</ref><box>(0,0),(62,62)</box>"


def _words(tmp_path, monkeypatch, font):
    monkeypatch.setattr(synth, "find_font_path", lambda: font)
    path = synth.generate(tmp_path, 30, seed=5, image_size=SIZE, langs=("en", "zh"))
    records = json.loads(path.read_text(encoding="utf-8"))
    return {i["word"]["lang"] for r in records for i in r["meta"]["images"] if i["word"]}, records


def test_word_languages_follow_the_fonts(tmp_path, monkeypatch):
    latin = next((p for p in LATIN_FONT_PATHS if os.path.isfile(p)), None)
    if latin is None:
        pytest.skip("no DejaVu font installed")
    langs, _ = _words(tmp_path / "latin", monkeypatch, latin)
    assert langs == {"en"}
    langs, records = _words(tmp_path / "none", monkeypatch, None)
    assert langs == set() and "ocr" not in {r["meta"]["task"] for r in records}


def test_chinese_words_with_a_cjk_font(tmp_path, monkeypatch):
    cjk = "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"
    if not os.path.isfile(cjk):
        pytest.skip("no CJK font installed")
    langs, _ = _words(tmp_path, monkeypatch, cjk)
    assert langs == {"en", "zh"}


def test_command_line(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path), "--n", "3", "--seed", "1", "--image-size", "96", "--split", "test"]) == 0
    assert len(load_records(tmp_path / "test.json")) == 3
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path), "--n", "3", "--lang", "fr"])
    assert "--lang" in capsys.readouterr().err
