"""The continuous-batching engine: every request computes what it computes alone, whatever runs beside it."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwenvl import images as image_io
from qwenvl.bench import random_config, random_model
from qwenvl.engine import LLMEngine, QueueFull
from qwenvl.errors import RequestError

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = json.loads((GOLDEN / "model_cases.json").read_text(encoding="utf-8"))
PROMPTS = [c["input_ids"] for c in CASES["logits"]]  # 9 to 534 tokens, 0 to 2 pictures, alphas 1, 3 and 7
SOLO = [c["output_ids"] for c in CASES["generate"]]  # the original's greedy tokens of each prompt alone
GREEDY = dict(do_sample=False, eos_token_id=None)


def test_staggered_requests_equal_solo_runs(model, in_golden):
    """Requests of different lengths, with and without pictures, arriving while others decode, more of them
    than slots, prefill chunked: each gets the original's solo tokens."""
    engine = LLMEngine(model, max_num_seqs=3, kv_cache_tokens=3 * 560, max_prefill_tokens=200)
    pool_k = engine.pool.k.data_ptr()
    first = [engine.add_request(PROMPTS[i], max_new_tokens=6, **GREEDY) for i in (0, 3)]
    engine.step()
    engine.step()
    later = [engine.add_request(PROMPTS[i], max_new_tokens=n, **GREEDY) for i, n in ((2, 5), (5, 6), (1, 4), (4, 6))]
    engine.wait(first + later)
    for seq, i, n in zip(first + later, (0, 3, 2, 5, 1, 4), (6, 6, 5, 6, 4, 6)):
        assert seq.output == SOLO[i][:n], f"prompt {i}"
        assert seq.finish_reason == "length"
    assert engine.pool.k.data_ptr() == pool_k  # one pool, never reallocated
    assert engine.num_running == 0 and engine.pool.available == 3


def test_chat_turns_reuse_the_prefix_with_unchanged_answers(model, tokenizer, in_golden):
    engine = LLMEngine(model, max_num_seqs=2, kv_cache_tokens=2 * 700)
    query = tokenizer.from_list_format([{"image": "images/shapes_640x480.png"}, {"text": "What is this?"}])
    options = dict(max_new_tokens=5, do_sample=False)
    expected, history = model.chat(tokenizer, query, history=None, **options)
    expected2, _ = model.chat(tokenizer, "And the colours?", history=history, **options)
    response, history = engine.chat(tokenizer, query, history=None, **options)
    assert response == expected
    misses, reused = engine.runner.image_misses, engine.stats["prefix_cache_tokens"]
    response2, _ = engine.chat(tokenizer, "And the colours?", history=history, **options)
    assert response2 == expected2
    assert engine.runner.image_misses == misses  # the picture is not encoded again
    assert engine.stats["prefix_cache_tokens"] - reused > 280  # system, picture and turn 1 come from the cache


def test_same_picture_in_two_prompts_is_encoded_once(model, in_golden):
    engine = LLMEngine(model, max_num_seqs=2, kv_cache_tokens=2 * 560)
    out = engine.generate([PROMPTS[3], PROMPTS[3]], max_new_tokens=3, **GREEDY)
    assert out == [SOLO[3][:3]] * 2
    assert engine.runner.image_misses == 1


def test_seeded_sampling_does_not_depend_on_neighbours(model, in_golden):
    sample = dict(max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.5, eos_token_id=None, seed=7)
    alone = model.generate(torch.tensor([PROMPTS[0]]), **sample)[0, len(PROMPTS[0]):].tolist()
    engine = LLMEngine(model, max_num_seqs=3, kv_cache_tokens=3 * 560)
    crowd = [engine.add_request(PROMPTS[3], max_new_tokens=6, do_sample=True, seed=1, eos_token_id=None),
             engine.add_request(PROMPTS[0], **sample),
             engine.add_request(PROMPTS[0], **{**sample, "seed": 8})]
    engine.wait(crowd)
    assert crowd[1].output == alone


def test_abort_frees_the_slot_at_the_next_step(model, in_golden):
    engine = LLMEngine(model, max_num_seqs=1, kv_cache_tokens=600)
    seq = engine.add_request(PROMPTS[0], max_new_tokens=50, **GREEDY)
    engine.step()
    assert engine.num_running == 1 and engine.pool.available == 0
    engine.abort(seq)
    waiting = engine.add_request(PROMPTS[0], max_new_tokens=2, **GREEDY)
    engine.step()
    assert seq.finish_reason == "abort" and len(seq.output) == 1
    engine.wait([waiting])
    assert waiting.output == SOLO[0][:2]


def test_refusals_name_the_lengths_and_the_queue(model):
    engine = LLMEngine(model, max_num_seqs=1, kv_cache_tokens=100, max_queue=1)
    with pytest.raises(RequestError, match="90 tokens plus max_new_tokens=20 exceed the engine's 100"):
        engine.add_request([1] * 90, max_new_tokens=20)
    engine.add_request([1] * 5, max_new_tokens=2)
    with pytest.raises(QueueFull):
        engine.add_request([1] * 5, max_new_tokens=2)


def test_random_model_with_pixels_equals_generate():
    """A random config of another shape (more layers and heads), pictures given as pixel tensors."""
    config = random_config("tiny")
    config.num_hidden_layers, config.num_attention_heads, config.kv_channels, config.seq_length = 3, 4, 32, 64
    model = random_model(config, torch.float32, torch.device("cpu"), seed=3)
    size = config.visual.image_size
    pixels = [image_io.preprocess(Image.open(GOLDEN / "images" / n), size) for n in ("tiny_37x23.png", "tall_300x700.png")]
    span = [config.visual.image_start_id] + [image_io.IMAGE_PAD_ID] * 256 + [config.visual.image_start_id + 1]
    prompts = [[11, 12, 13], [5] * 7 + span + [9, 10], [7] + span + [3] + span + [4, 4], [100, 200] * 20]
    pictures = [[], pixels[:1], pixels, []]
    expected = [model.generate(torch.tensor([p]), images=im or None, max_new_tokens=5, **GREEDY)[0, len(p):].tolist()
                for p, im in zip(prompts, pictures)]
    engine = LLMEngine(model, max_num_seqs=4, kv_cache_tokens=4 * 600, max_prefill_tokens=128)
    assert engine.generate(prompts, images=pictures, max_new_tokens=5, **GREEDY) == expected


def _tiny_random_model():
    config = random_config("tiny")
    config.seq_length = 64
    return random_model(config, torch.float32, torch.device("cpu"), seed=5)


class BrokenPicture:
    """Stands in for a picture whose pixels cannot be made."""
    digest, size = b"broken", (1, 1)

    @property
    def pixels(self):
        raise RuntimeError("cannot resize")


def test_a_failing_request_fails_alone():
    model = _tiny_random_model()
    from qwenvl.engine import Picture
    span = [model.config.visual.image_start_id] + [image_io.IMAGE_PAD_ID] * 256 + [model.config.visual.image_start_id + 1]
    expected = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, **GREEDY)[0, 3:].tolist()
    engine = LLMEngine(model, max_num_seqs=2, kv_cache_tokens=2 * 300)
    good = engine.add_request([1, 2, 3], max_new_tokens=3, **GREEDY)
    bad = engine.add_request([4] + span, images=[Picture(torch.zeros(3, 448, 448), 448)], max_new_tokens=3, **GREEDY)
    bad.pictures = [BrokenPicture()]
    engine.wait([good, bad])
    assert bad.finish_reason == "error" and "cannot resize" in str(bad.error)
    assert good.output == expected and engine.pool.available == 2


def test_memory_stays_bounded_over_many_requests():
    """Distinct pictures through a small feature cache, more requests than slots: nothing accumulates."""
    model = _tiny_random_model()
    span = [model.config.visual.image_start_id] + [image_io.IMAGE_PAD_ID] * 256 + [model.config.visual.image_start_id + 1]
    engine = LLMEngine(model, max_num_seqs=3, kv_cache_tokens=3 * 300, image_cache_size=2)
    generator = torch.Generator().manual_seed(0)
    seqs = [engine.add_request([7, i] + span + [9], images=[torch.randn(3, 448, 448, generator=generator)],
                               max_new_tokens=2, **GREEDY) for i in range(12)]
    engine.wait(seqs)
    assert all(s.finish_reason == "length" and s.features is None for s in seqs)
    assert len(engine.runner.features) <= 2 and engine.runner.image_misses == 12
    assert engine.num_running == engine.num_waiting == 0 and engine.pool.available == 3
    assert len(engine.pool.cached) <= 3
