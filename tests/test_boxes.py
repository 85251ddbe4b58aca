"""Box parsing against the original's golden outputs, and drawing boxes on the latest picture."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from qwenvl import boxes as box_utils
from qwenvl.boxes import draw_boxes, parse_boxes, parse_quads, split_tags, to_pixels
from qwenvl.tokenizer import QWenTokenizer

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = json.loads((GOLDEN / "tokenizer_cases.json").read_text(encoding="utf-8"))
WHITE = (255, 255, 255)


@pytest.fixture(scope="module")
def tok():
    return QWenTokenizer.from_pretrained(GOLDEN / "checkpoint")


def white_png(folder: Path, name: str, size=(200, 100)) -> Path:
    path = folder / name
    Image.new("RGB", size, WHITE).save(path)
    return path


# ---- parsing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES["boxes"], ids=lambda c: c["response"][:30])
def test_parse_boxes_matches_original(case):
    got = [{"box": list(b["box"]), **({"ref": b["ref"]} if b["ref"] is not None else {})}
           for b in parse_boxes(case["response"])]
    assert got == case["boxes"]


def test_one_ref_labels_the_run_of_boxes_after_it():
    found = parse_boxes("<ref>cats</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> and <box>(9,9),(10,10)</box>")
    assert [(b["box"], b["ref"]) for b in found] == [
        ((1, 2, 3, 4), "cats"), ((5, 6, 7, 8), "cats"), ((9, 9, 10, 10), None)]


@pytest.mark.parametrize("body", ["(1,2),(3)", "(a,b),(c,d)", "(1.5,2),(3,4)", "(1,2),(3,4),(5,6)", ""])
def test_malformed_boxes_are_skipped(body):
    assert parse_boxes(f"<ref>x</ref><box>{body}</box><box>(1,2),(3,4)</box>") == [{"box": (1, 2, 3, 4), "ref": "x"}]


def test_spaces_inside_a_box_are_tolerated():
    assert parse_boxes("<box>( 1, 2 ),( 3, 4 )</box>")[0]["box"] == (1, 2, 3, 4)


def test_truncated_response_keeps_the_boxes_before_the_cut():
    assert parse_boxes("<ref>a</ref><box>(1,2),(3,4)</box><ref>b</ref><box>(5,") == [{"box": (1, 2, 3, 4), "ref": "a"}]


def test_parse_quads():
    found = parse_quads("<ref>sign</ref><quad>(1,2),(3,4),(5,6),(7,8)</quad><quad>(1,2)</quad>")
    assert found == [{"quad": ((1, 2), (3, 4), (5, 6), (7, 8)), "ref": "sign"}]


def test_split_tags_strict_and_lenient():
    assert split_tags("a</ref><box>b</box>") == [{"text": "a</ref>"}, {"box": "b"}]
    with pytest.raises(ValueError, match="unclosed <quad>"):
        split_tags("x<quad>(1,2)")
    assert split_tags("x<quad>(1,2)", strict=False) == [{"text": "x<quad>(1,2)"}]


def test_to_pixels_divides_by_1000():
    assert to_pixels((100, 200, 500, 1000), 200, 100) == (20, 20, 100, 100)
    assert to_pixels((999, 999, 999, 999), 37, 23) == (36, 22, 36, 22)


# ---- drawing --------------------------------------------------------------------------------------

def test_draw_boxes_outlines_the_box_and_leaves_inside_white():
    picture = Image.new("RGB", (200, 100), WHITE)
    drawn = draw_boxes(picture, [{"box": (500, 800, 100, 200), "ref": None}])  # corners in reverse order
    for x, y in [(20, 50), (100, 50), (60, 20), (60, 80)]:
        assert drawn.getpixel((x, y)) != WHITE, (x, y)
    for x, y in [(60, 50), (10, 50), (150, 50), (60, 10)]:
        assert drawn.getpixel((x, y)) == WHITE, (x, y)
    assert picture.getpixel((20, 50)) == WHITE  # the input is not drawn on


def test_each_ref_gets_its_own_colour():
    picture = Image.new("RGB", (300, 300), WHITE)
    drawn = draw_boxes(picture, [{"box": (100, 500, 200, 600), "ref": "a"}, {"box": (400, 500, 500, 600), "ref": "b"},
                                 {"box": (700, 500, 800, 600), "ref": "a"}])
    left, middle, right = (drawn.getpixel((x, 165)) for x in (30, 120, 210))
    assert left == right != middle


def test_draw_bbox_on_latest_picture(tok, tmp_path):
    path = white_png(tmp_path, "white.png")
    history = [(f"Picture 1:<img>{path}</img>\nWhere is the cat?", "...")]
    drawn = tok.draw_bbox_on_latest_picture("<ref>cat</ref><box>(100,200),(500,800)</box>", history)
    assert drawn.size == (200, 100) and drawn.mode == "RGB"
    assert drawn.getpixel((20, 50)) != WHITE and drawn.getpixel((100, 50)) != WHITE
    assert drawn.getpixel((60, 50)) == WHITE


def test_no_box_or_no_picture_gives_none(tok, tmp_path):
    path = white_png(tmp_path, "white.png")
    assert tok.draw_bbox_on_latest_picture("no boxes here", [(f"<img>{path}</img>", "")]) is None
    assert tok.draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>", [("no picture", "")]) is None
    assert tok.draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>") is None


def test_the_newest_picture_is_used(tok, tmp_path):
    old, newer, newest = (white_png(tmp_path, f"{n}.png", size) for n, size in
                          [("old", (10, 10)), ("newer", (20, 20)), ("newest", (30, 30))])
    history = [(f"<img>{old}</img>", "a"), (f"<img>{old}</img> then <img>{newer}</img>", "b"), ("text only", "c")]
    assert tok.draw_bbox_on_latest_picture("<box>(1,2),(3,4)</box>", history).size == (20, 20)
    response = f"<img>{newest}</img><box>(1,2),(3,4)</box>"
    assert tok.draw_bbox_on_latest_picture(response, history).size == (30, 30)


def _cjk_font_installed() -> bool:
    if shutil.which("fc-list") is None:
        return False
    return bool(subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True).stdout.strip())


@pytest.mark.skipif(not _cjk_font_installed(), reason="no CJK font installed (e.g. apt-get install fonts-wqy-zenhei)")
def test_installed_cjk_font_renders_chinese():
    box_utils.find_font_path.cache_clear()
    font = box_utils.load_font(32)
    glyphs = []
    for char in "击掌":  # without CJK coverage both come out as the same "missing glyph" box
        canvas = Image.new("L", (40, 40), 0)
        ImageDraw.Draw(canvas).text((2, 2), char, fill=255, font=font)
        glyphs.append(canvas.tobytes())
    assert glyphs[0] != glyphs[1] and any(glyphs[0])


@pytest.mark.parametrize("font_path", ["found", None])
def test_cjk_label_draws_with_and_without_a_font(tok, tmp_path, monkeypatch, font_path):
    if font_path is None:
        monkeypatch.setattr(box_utils, "find_font_path", lambda: None)
    path = white_png(tmp_path, "white.png", (400, 300))
    drawn = tok.draw_bbox_on_latest_picture(f"<img>{path}</img><ref>击掌</ref><box>(250,500),(750,900)</box>")
    assert drawn.getpixel((101, 140)) != WHITE  # the label's background, just above the box's corner
    assert drawn.getpixel((200, 220)) == WHITE
