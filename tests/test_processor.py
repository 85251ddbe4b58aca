"""The processor step: prompts and images -> ids + pixels, images read once, and a model that reads no files."""
import json
from pathlib import Path

import pytest
import torch

from qwenvl import images as image_io
from qwenvl import processor as processor_module
from qwenvl import Processor
from qwenvl.engine import LLMEngine
from qwenvl.errors import RequestError
from qwenvl.processor import Picture, prompt_pictures, prompt_pixels, span_references

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = json.loads((GOLDEN / "model_cases.json").read_text(encoding="utf-8"))
CAPTION = CASES["logits"][1]  # 'Picture 1:<img>images/shapes_640x480.png</img>\nGenerate the caption ...'
IMAGE = "images/shapes_640x480.png"
OTHER = next(p.relative_to(GOLDEN).as_posix() for p in sorted((GOLDEN / "images").iterdir()) if p.name != Path(IMAGE).name
             and p.suffix in (".png", ".jpg", ".jpeg"))
GREEDY = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def processor(tokenizer, model):
    return Processor(tokenizer, model.config)


class Counter:
    """Counts calls of a function it wraps (monkeypatched in)."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def test_processor_gives_the_tokenizers_ids_and_the_loaders_pixels(processor, tokenizer, model, in_golden):
    text = CAPTION["prompt"]
    inputs = processor(text)
    assert inputs["input_ids"][0].tolist() == tokenizer(text)["input_ids"] == CAPTION["input_ids"]
    assert inputs["attention_mask"].tolist() == [[1] * len(CAPTION["input_ids"])]
    (pixels,) = inputs["images"]
    assert torch.equal(pixels, image_io.preprocess(image_io.load_image(IMAGE), model.config.visual.image_size))
    assert span_references(model.config, inputs["input_ids"]) == [IMAGE]
    loaded = Processor.from_pretrained(GOLDEN / "checkpoint")(text)
    assert torch.equal(loaded["input_ids"], inputs["input_ids"]) and torch.equal(loaded["images"][0], pixels)


def test_model_on_processor_inputs_matches_golden_logits(processor, model, expected, in_golden):
    inputs = processor(CAPTION["prompt"])
    with torch.no_grad():
        logits = model(**inputs).logits[0, -8:]
        plain = model(input_ids=inputs["input_ids"]).logits[0, -8:]  # references read from the ids
    assert torch.equal(logits, plain)
    torch.testing.assert_close(logits, torch.tensor(expected["logits_all_1"]), atol=1e-4, rtol=0)


def test_generate_on_processor_inputs_matches_the_golden_tokens(processor, tokenizer, model, in_golden):
    case = CASES["generate"][1]
    inputs = processor(tokenizer.decode(case["input_ids"]))
    assert inputs["input_ids"][0].tolist() == case["input_ids"]
    out = model.generate(**inputs, max_new_tokens=len(case["output_ids"]), do_sample=False, eos_token_id=None)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == case["output_ids"]


def test_list_format_and_a_batch_are_left_padded(processor, tokenizer, model, in_golden):
    single = processor([{"image": IMAGE}, {"text": "What is this?"}])
    assert single["input_ids"][0].tolist() == tokenizer.encode(
        tokenizer.from_list_format([{"image": IMAGE}, {"text": "What is this?"}]))
    batch = processor([[{"image": IMAGE}, {"text": "What is this?"}], "A picture-less, longer prompt about shapes"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2 and len(batch["images"]) == 1
    assert mask[0].tolist() == [0] * int((mask[0] == 0).sum()) + [1] * int(mask[0].sum())  # pads on the left
    together = model.generate(**batch, **GREEDY)[:, ids.shape[1]:]
    for row, text in enumerate([[{"image": IMAGE}, {"text": "What is this?"}],
                                "A picture-less, longer prompt about shapes"]):
        alone = processor(text)
        out = model.generate(**alone, **GREEDY)[0, alone["input_ids"].shape[1]:]
        assert together[row].tolist() == out.tolist()


def test_the_model_reads_no_files(processor, model, monkeypatch, in_golden):
    """Once the processor has the pixels, nothing in the model loads an image; without them the model refuses."""
    inputs = processor(CAPTION["prompt"])
    with torch.no_grad():
        expected_logits = model(**inputs).logits
    def no_io(*args, **kwargs):
        raise AssertionError("the model read an image")
    monkeypatch.setattr(image_io, "load_image", no_io)
    monkeypatch.setattr(processor_module.image_io, "load_image", no_io)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected_logits)
        model.prefill(inputs["input_ids"], None, inputs["images"], 2)
        with pytest.raises(RequestError, match="0 images were given for 1"):
            model.prefill(inputs["input_ids"], None, None, 2)
        with pytest.raises(RequestError, match="pixel or feature tensors"):
            model.embed(inputs["input_ids"], [IMAGE])


def test_a_picture_repeated_in_a_prompt_is_loaded_and_encoded_once(processor, model, monkeypatch, in_golden):
    loads = Counter(image_io.load_image)
    monkeypatch.setattr(processor_module.image_io, "load_image", loads)
    visual = Counter(model.transformer.visual.forward)
    monkeypatch.setattr(model.transformer.visual, "forward", visual)
    text = f"Picture 1:<img>{IMAGE}</img>\nPicture 2:<img>{OTHER}</img>\nPicture 3:<img>{IMAGE}</img>\nSame?"
    inputs = processor(text)
    assert loads.calls == 2 and len(inputs["images"]) == 3 and inputs["images"][0] is inputs["images"][2]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert visual.calls == 1
    ids = inputs["input_ids"]
    with torch.no_grad():  # the same answer when every picture is given as its own copy
        copies = model(input_ids=ids, images=[im.clone() for im in inputs["images"]]).logits
    torch.testing.assert_close(logits, copies, atol=1e-5, rtol=0)


def test_features_can_stand_for_pixels(processor, model, in_golden):
    inputs = processor(CAPTION["prompt"])
    with torch.no_grad():
        features = model.encode_images([IMAGE])[0]
        from_pixels = model(**inputs).logits
        from_features = model(input_ids=inputs["input_ids"], images=[features]).logits
    torch.testing.assert_close(from_features, from_pixels, atol=1e-5, rtol=0)
    engine = LLMEngine(model, max_num_seqs=1, kv_cache_tokens=512)
    with pytest.raises(RequestError, match="not image features"):
        engine.add_request(inputs["input_ids"][0].tolist(), images=[features], max_new_tokens=2)


def test_the_engine_goes_through_the_processor(processor, model, monkeypatch, in_golden):
    loads = Counter(image_io.load_image)
    monkeypatch.setattr(processor_module.image_io, "load_image", loads)
    inputs = processor(CAPTION["prompt"])
    engine = LLMEngine(model, max_num_seqs=2, kv_cache_tokens=1024)
    ids = inputs["input_ids"][0].tolist()
    by_reference, by_pixels = engine.generate([ids, ids], images=[None, inputs["images"]], **GREEDY)
    assert by_reference == by_pixels == model.generate(**inputs, **GREEDY)[0, len(ids):].tolist()
    assert loads.calls == 2  # once for the processor above, once for the engine's reference


@pytest.mark.parametrize("images, message", [
    (["a.png", "b.png"], "2 images were given for 1"),
    ([torch.zeros(3, 8, 8)], r"shape \(3, 448, 448\)"),
    ("images/x.png", "images must be a list"),
    ([123], "cannot use an object of type int"),
    ([torch.zeros(10, 128)], r"features must have shape \(256, 128\)"),
])
def test_bad_images_name_the_problem(processor, model, images, message, in_golden):
    ids = processor(CAPTION["prompt"])["input_ids"]
    with pytest.raises((RequestError, image_io.ImageError), match=message):
        prompt_pixels(model.config, ids, images)


def test_bad_text_names_the_problem(processor):
    with pytest.raises(RequestError, match=r"text\[1\] must be a string"):
        processor(["fine", 42])
    with pytest.raises(RequestError, match="non-empty list"):
        processor([])
    with pytest.raises(RequestError, match="unclosed <img>"):
        processor("<img>images/x.png and no end")


def test_a_missing_picture_is_named(processor, model, tmp_path):
    with pytest.raises(image_io.ImageError, match="nowhere.png"):
        processor(f"<img>{tmp_path / 'nowhere.png'}</img>hi")


def test_picture_digest_is_content_hash(model):
    size = model.config.visual.image_size
    pixels = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    a, b = Picture(pixels, size), Picture(pixels.clone(), size)
    assert a.digest == b.digest and a.digest != Picture(pixels + 1, size).digest
    assert [p.digest for p in prompt_pictures(model.config, torch.tensor([[1, 2]]), [])] == []


def test_a_training_batchs_pixel_stack_is_passed_on_uncopied(processor, model, in_golden):
    inputs = processor(CAPTION["prompt"])
    stack = torch.stack(inputs["images"])
    assert prompt_pixels(model.config, inputs["input_ids"], stack) is stack
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=inputs["input_ids"], images=stack).logits,
                                   model(**inputs).logits, atol=1e-5, rtol=0)
    with pytest.raises(RequestError, match=r"pixel stack for 1 <img></img> spans must have shape \(1, 3, 448, 448\)"):
        prompt_pixels(model.config, inputs["input_ids"], torch.cat([stack, stack]))
