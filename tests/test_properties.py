"""Property-based tests (hypothesis): the tokenizer, tag parsing, the list format, ChatML contexts and decoding
hold their invariants on generated inputs full of tags, control tokens and odd Unicode."""
import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenvl import make_context
from qwenvl.boxes import parse_boxes
from qwenvl.errors import ImageError, QwenVLError, RequestError

CASES = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TAG_PIECES = ["<img>", "</img>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<imgpad>",
              "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|extra_3|>", "\n", "(", ")", ",", "1000", " "]
# text that may hold any tag or control token, in pieces so tags are frequent
tricky_text = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(TAG_PIECES)), max_size=12).map("".join)
# text without any tag (no '<')
plain_text = st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=12)
coordinate = st.integers(min_value=0, max_value=1000)
box = st.tuples(coordinate, coordinate, coordinate, coordinate)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@CASES
@given(text=tricky_text)
def test_encode_then_decode_gives_the_text_back(tokenizer, text):
    try:
        ids = tokenizer.encode(text)
    except RequestError:  # only an <img> that is never closed is refused
        assert "<img>" in nfc(text)
        return
    assert tokenizer.decode(ids) == nfc(text)


@CASES
@given(ids=st.lists(st.one_of(st.integers(-5, 151940), st.integers(0, 255),
                              st.sampled_from([151857, 151858, 151859, 151644, 151645])), max_size=300),
       skip=st.booleans())
def test_decode_never_fails(tokenizer, ids, skip):
    assert isinstance(tokenizer.decode(ids, skip_special_tokens=skip), str)


@CASES
@given(text=tricky_text)
def test_parse_boxes_takes_any_text(text):
    for found in parse_boxes(text):
        assert len(found["box"]) == 4 and all(isinstance(v, int) for v in found["box"])
        assert found["ref"] is None or isinstance(found["ref"], str)


@CASES
@given(groups=st.lists(st.tuples(plain_text.filter(bool), st.one_of(st.none(), plain_text), st.lists(box, max_size=3)),
                       max_size=6))
def test_parse_boxes_finds_every_box_with_its_ref(groups):
    text = "".join(filler + ("" if ref is None else f"<ref>{ref}</ref>") +
                   "".join(f"<box>({a},{b}),({c},{d})</box>" for a, b, c, d in boxes) for filler, ref, boxes in groups)
    expected = [{"box": b, "ref": None if ref is None else ref.strip()} for _, ref, boxes in groups for b in boxes]
    assert parse_boxes(text) == expected


item = st.one_of(st.builds(lambda r: {"image": r}, plain_text), st.builds(lambda t: {"text": t}, plain_text),
                 st.builds(lambda r, b: {"ref": r, "box": b}, plain_text, st.lists(box, min_size=1, max_size=2)),
                 st.builds(lambda b: {"box": b}, st.lists(box, min_size=1, max_size=2)))


@CASES
@given(items=st.lists(item, max_size=8))
def test_from_list_format_round_trips(tokenizer, items):
    elements = tokenizer.to_list_format(tokenizer.from_list_format(items))
    assert [e["image"] for e in elements if "image" in e] == [nfc(i["image"]) for i in items if "image" in i]
    assert [e["box"] for e in elements if "box" in e] == \
        ["(%d,%d),(%d,%d)" % b for i in items if "box" in i for b in i["box"]]


@CASES
@given(references=st.lists(tricky_text, min_size=1, max_size=4))
def test_one_image_item_is_one_image_span(tokenizer, references):
    try:
        text = tokenizer.from_list_format([{"image": r} for r in references])
    except ImageError:
        assert any("<img>" in r or "</img>" in r for r in references)
        return
    ids = tokenizer.encode(text)
    assert ids.count(tokenizer.img_start_id) == ids.count(tokenizer.img_end_id) == len(references)


@CASES
@given(query=tricky_text.filter(str.strip), system=tricky_text,
       history=st.lists(st.tuples(tricky_text, tricky_text), max_size=3))
def test_make_context_frames_every_turn_and_nothing_else(tokenizer, query, system, history):
    try:
        raw, ids = make_context(tokenizer, query, history=history, system=system)
    except QwenVLError:
        assert any("<img>" in nfc(t) for t in [query, system, *(x for turn in history for x in turn)])
        return
    turns = 1 + 2 * len(history) + 2  # system, each (query, response), the query, the assistant's opening
    assert ids.count(tokenizer.im_start_id) == turns
    assert ids.count(tokenizer.im_end_id) == turns - 1
    assert tokenizer.eod_id not in ids  # no user text becomes a control token
    assert tokenizer.decode(ids) == nfc(raw)
