"""The web page's conversation (serve/web_chat.py) on the golden checkpoint, without a browser."""
import asyncio
import random
import time
from pathlib import Path

import pytest
from PIL import Image

from qwenvl.boxes import draw_boxes, parse_boxes
from qwenvl.chat import DEFAULT_SYSTEM, chat_stream, make_context
from qwenvl.engine import LLMEngine
from qwenvl.errors import ImageError, RequestError
from qwenvl.images import IMAGE_PAD_ID, IMAGE_SPAN, ImageLimits
from qwenvl.serve.media import MediaPolicy
from qwenvl.serve.prompt import PromptBuilder
from qwenvl.serve.web_chat import DRAWING_SIDE, Conversation, Settings, shown

GOLDEN = Path(__file__).parent / "data" / "golden"
SHAPES, TALL, TINY = (str(GOLDEN / "images" / n) for n in ("shapes_640x480.png", "tall_300x700.png", "tiny_37x23.png"))
GREEDY = Settings(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def engine(model):
    engine = LLMEngine(model, max_num_seqs=2, kv_cache_tokens=2 * 1200).start()
    yield engine
    engine.stop()


def conversation(engine, tokenizer, tmp_path, **kw) -> Conversation:
    return Conversation(engine, tokenizer, folder=str(tmp_path), **kw)


def answered(conv: Conversation, question: str, answer: str) -> None:
    turn = conv.ask(question)
    turn.answer, turn.answered = answer, True


def as_pads(ids: list[int], tokenizer) -> list[int]:
    out = list(ids)
    for i, t in enumerate(ids):
        if t == tokenizer.img_start_id:
            out[i + 1:i + 1 + IMAGE_SPAN] = [IMAGE_PAD_ID] * IMAGE_SPAN
    return out


def collect(conv: Conversation, settings: Settings = GREEDY) -> list[str]:
    async def run():
        return [t async for t in conv.answer_stream(settings)]
    return asyncio.run(run())


def test_prompt_is_make_contexts_with_pictures_numbered_across_turns(engine, tokenizer, tmp_path):
    conv = conversation(engine, tokenizer, tmp_path)
    conv.add_picture(SHAPES)
    answered(conv, "What is it?", "<ref>a circle</ref><box>(1,2),(300,400)</box>")
    conv.add_picture(TALL)
    conv.add_picture(TINY)
    conv.ask("Compare Picture 2 and Picture 3.")
    ids, pictures = conv.prompt(DEFAULT_SYSTEM)
    history = [(f"Picture 1:<img>{SHAPES}</img>\nWhat is it?", "<ref>a circle</ref><box>(1,2),(300,400)</box>")]
    query = f"Picture 2:<img>{TALL}</img>\nPicture 3:<img>{TINY}</img>\nCompare Picture 2 and Picture 3."
    _, expected = make_context(tokenizer, query, history, system=DEFAULT_SYSTEM)
    assert ids == as_pads(expected, tokenizer)
    assert pictures == [u.picture for u in conv.uploads] and [u.number for u in conv.uploads] == [1, 2, 3]


def test_pictures_wait_for_the_next_question_and_undo_takes_back_the_last_thing(engine, tokenizer, tmp_path):
    conv = conversation(engine, tokenizer, tmp_path)
    conv.add_picture(SHAPES)
    conv.add_picture(TINY)
    assert conv.undo() is None and [u.name for u in conv.waiting] == ["shapes_640x480.png"]
    answered(conv, "Describe it.", "shapes")
    assert conv.waiting == [] and len(conv.turns[0].pictures) == 1
    assert conv.undo() == "Describe it." and conv.turns == [] and len(conv.waiting) == 1  # the picture waits again
    conv.add_picture(TINY)
    assert [u.number for u in conv.waiting] == [1, 2]
    conv.clear()
    assert conv.turns == conv.waiting == [] and conv.uploads == []


def test_window_drops_old_turns_with_their_pictures_and_keeps_the_numbers(engine, tokenizer, tmp_path):
    conv = conversation(engine, tokenizer, tmp_path)
    conv.builder = PromptBuilder(tokenizer, max_window_size=IMAGE_SPAN + 150)  # room for one earlier turn
    conv.add_picture(SHAPES)
    answered(conv, "first", "one")
    conv.add_picture(TALL)
    answered(conv, "second", "two")
    conv.add_picture(TINY)
    conv.ask("third")
    ids, pictures = conv.prompt(DEFAULT_SYSTEM)
    assert pictures == [conv.uploads[1].picture, conv.uploads[2].picture]
    text = tokenizer.decode([t for t in ids if t != IMAGE_PAD_ID])
    assert "first" not in text and "Picture 2:" in text and "Picture 3:" in text and "Picture 1:" not in text


def test_shown_removes_the_markup_as_the_original_and_hides_a_tag_still_arriving():
    answer = "It is <ref>the red circle</ref><box>(1,2),(3,4)</box> and <ref>a box</ref><box>(5,6),(7,8)</box>."
    assert shown(answer) == "It is the red circle and a box."
    assert shown("<ref>x</ref><box>(1,2") == "x"
    assert shown("a <ref>x</re", final=False) == "a x" and shown("a <bo", final=False) == "a "
    assert shown("1 < 2", final=False) == "1 < 2" and shown("a <bo") == "a <bo"


def test_boxes_are_drawn_on_the_named_picture_else_the_latest(engine, tokenizer, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (2048, 1536), "white").save(big)
    conv = conversation(engine, tokenizer, tmp_path)
    first, second = conv.add_picture(SHAPES), conv.add_picture(str(big))
    answer = "<ref>thing</ref><box>(100,100),(500,600)</box>"
    answered(conv, "Where is the thing in Picture 1?", answer)
    named = conv.turns[0].drawing = conv.draw(conv.turns[0])
    answered(conv, "And now?", answer)
    latest = conv.turns[1].drawing = conv.draw(conv.turns[1])
    answered(conv, "No boxes here", "none")
    assert conv.draw(conv.turns[2]) is None
    assert Image.open(named).tobytes() == draw_boxes(first.image, parse_boxes(answer)).tobytes()
    scaled = second.image.copy()
    scaled.thumbnail((DRAWING_SIDE, DRAWING_SIDE))
    drawn = Image.open(latest)
    assert drawn.size == (1024, 768) and drawn.tobytes() == draw_boxes(scaled, parse_boxes(answer)).tobytes()
    conv.clear()
    assert not Path(named).exists() and not Path(latest).exists()


def test_refused_uploads_name_the_file_and_the_limit(engine, tokenizer, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), "white").save(big)
    conv = conversation(engine, tokenizer, tmp_path, max_images=2,
                        media=MediaPolicy(ImageLimits(max_pixels=1_000_000, max_bytes=50_000)))
    with pytest.raises(ImageError, match="notes.png is not a readable picture"):
        conv.add_picture(str(notes))
    with pytest.raises(ImageError, match=r"big.png is 1200x1000 = 1200000 pixels.*1000000 \(--max-image-pixels\)"):
        conv.add_picture(str(big))
    noisy = tmp_path / "noisy.png"
    Image.frombytes("RGB", (200, 200), random.Random(0).randbytes(120_000)).save(noisy)  # ~120 KB
    with pytest.raises(ImageError, match=r"noisy.png holds \d+ bytes.*50000 \(--max-image-bytes\)"):
        conv.add_picture(str(noisy))
    conv.add_picture(SHAPES, "a.png")
    conv.add_picture(TINY, "b.png")
    with pytest.raises(ImageError, match=r"c.png: the conversation already holds 2 pictures.*--max-images-per"):
        conv.add_picture(TINY, "c.png")
    assert [u.name for u in conv.uploads] == ["a.png", "b.png"]  # the refused ones joined nothing


def test_sampling_controls_and_a_bad_seed(engine, tokenizer, tmp_path):
    conv = conversation(engine, tokenizer, tmp_path)
    greedy = conv.sampling(Settings(temperature=0, max_new_tokens=50), 100)
    assert not greedy.do_sample and greedy.max_new_tokens == 50
    sampled = conv.sampling(Settings(temperature=0.7, top_p=0.9, max_new_tokens=20, seed=" 7 "), 100)
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.top_p == 0.9 and sampled.seed == 7
    assert conv.sampling(Settings(temperature=1, seed=""), 100).seed is None
    room = conv.sampling(Settings(max_new_tokens=5000), engine.max_model_len - 10)
    assert room.max_new_tokens == 9  # what the engine's slot leaves
    with pytest.raises(RequestError, match="seed: 'abc' is not a whole number"):
        conv.sampling(Settings(seed="abc"), 100)


def test_two_conversations_share_the_engines_steps_and_each_equals_solo_chat(engine, model, tokenizer, tmp_path):
    running, step = [], engine.step

    def counting_step():
        step()
        running.append(engine.num_running)

    engine.step = counting_step
    try:
        a, b = conversation(engine, tokenizer, tmp_path), conversation(engine, tokenizer, tmp_path)
        a.add_picture(SHAPES)
        a.ask("What is in the picture?")
        b.add_picture(TALL)
        b.add_picture(TINY)
        b.ask("Compare them.")

        async def both():
            async def one(conv):
                return [t async for t in conv.answer_stream(GREEDY)]
            return await asyncio.gather(one(a), one(b))

        texts_a, texts_b = asyncio.run(both())
    finally:
        del engine.step
    assert max(running) == 2
    solo_a = list(chat_stream(model, tokenizer, f"Picture 1:<img>{SHAPES}</img>\nWhat is in the picture?",
                              do_sample=False, max_new_tokens=12))
    solo_b = list(chat_stream(model, tokenizer, f"Picture 1:<img>{TALL}</img>\nPicture 2:<img>{TINY}</img>\n"
                              "Compare them.", do_sample=False, max_new_tokens=12))
    assert texts_a == solo_a and texts_b == solo_b
    assert len(texts_a) >= 2 and all(n.startswith(o) for o, n in zip(texts_a, texts_a[1:]))  # growing text
    assert a.turns[0].answered and a.turns[0].answer == solo_a[-1]


def test_leaving_a_stream_frees_the_slot(engine, tokenizer, tmp_path):
    conv = conversation(engine, tokenizer, tmp_path)
    conv.ask("Tell a long story.")

    async def first_then_leave():
        stream = conv.answer_stream(Settings(temperature=0, max_new_tokens=400))
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert asyncio.run(first_then_leave())
    deadline = time.monotonic() + 30
    while engine.num_running:
        assert time.monotonic() < deadline, "the left stream still runs"
        time.sleep(0.05)
    assert conv.pending  # its question can be answered again (Regenerate)


def test_a_conversation_too_long_for_the_engine_is_refused(model, tokenizer, tmp_path):
    engine = LLMEngine(model, max_num_seqs=1, kv_cache_tokens=400)
    conv = conversation(engine, tokenizer, tmp_path)
    conv.add_picture(SHAPES)
    answered(conv, "one", "fine")
    conv.add_picture(TINY)
    conv.ask("two")
    with pytest.raises(RequestError, match=r"the conversation is \d+ tokens, too long for the engine's 400"):
        collect(conv)


def test_serve_ui_behind_the_api_key(tokenizer, model):
    pytest.importorskip("gradio")
    import httpx

    from qwenvl.cli import build_parser
    from qwenvl.serve.bench import LocalServer
    from qwenvl.serve.cli import build

    args = build_parser().parse_args(["serve", "--ui", "--api-key", "sekret", "--max-num-seqs", "1",
                                      "--kv-cache-tokens", "600"])
    args.model = "golden"
    app = build(model, tokenizer, args)
    server = LocalServer(app)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/ui/config").status_code == 401
            assert client.post("/ui/login", data={"username": "me", "password": "wrong"}).status_code == 400
            assert client.post("/ui/login", data={"username": "me", "password": "sekret"}).status_code == 200
            config = client.get("/ui/config")
            assert config.status_code == 200 and "golden" in config.text
            assert client.get("/v1/models").status_code == 401  # the page's cookie is not the API's key
            assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    finally:
        server.stop()
