"""generate / chat / chat_stream: batch invariance, stopping, sampling, streaming."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import qwenvl
from qwenvl import chat as chat_module
from qwenvl import generation
from qwenvl.config import GenerationConfig, QWenConfig
from qwenvl.generation import SamplingParams, apply_repetition_penalty, warp

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = json.loads((GOLDEN / "model_cases.json").read_text(encoding="utf-8"))
PROMPTS = CASES["logits"]  # 0: 9 tokens, text only; 1-5: 265-534 tokens with images (past seq_length 256)
SOLO = [c["output_ids"] for c in CASES["generate"]]  # the greedy 10 tokens of each prompt alone (same prompts)
PAD = 151643
IMG_START = 151857
INF = float("inf")


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def greedy(model, ids, n, **kwargs) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=n, do_sample=False, **{"eos_token_id": None, **kwargs})


# ---- batch invariance -------------------------------------------------------------------------------------

def test_prompt_lengths_cover_all_ntk_regimes():
    lengths = [len(PROMPTS[i]["input_ids"]) for i in (0, 1, 2)]
    assert lengths[0] <= 256 < lengths[1] <= 512 < lengths[2]  # alphas 1, 3, 7 in one batch


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0), (1, 3, 4)])
def test_left_padded_batch_rows_equal_solo_runs(model, in_golden, order):
    ids, mask = left_pad([PROMPTS[i]["input_ids"] for i in order])
    out = greedy(model, ids, 6, attention_mask=mask)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for row, i in enumerate(order):
        assert out[row, ids.shape[1]:].tolist() == SOLO[i][:6], f"row {row} (prompt {i})"


def test_left_padded_batch_with_images_passed_as_inputs(model, in_golden):
    """Prompts 3, 4, 5 (one, one and two images), the pictures given as PIL images in row-major order."""
    rows = [PROMPTS[i]["input_ids"] for i in (3, 4, 5)]
    names = ["tiny_37x23.png", "shapes_640x480.jpg", "gray_37x23.png", "rgba_300x700.png"]
    ids, mask = left_pad(rows)
    pictures = [Image.open(GOLDEN / "images" / n) for n in names]
    out = greedy(model, ids, 5, attention_mask=mask, images=pictures)
    assert [r[ids.shape[1]:] for r in out.tolist()] == [SOLO[i][:5] for i in (3, 4, 5)]


def test_left_padded_logits_equal_solo_logits(model, in_golden):
    order = (0, 2)  # 9 tokens (no NTK, no log-n) padded to 534 (alpha 7, log-n)
    ids, mask = left_pad([PROMPTS[i]["input_ids"] for i in order])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for row, i in enumerate(order):
            solo_ids = torch.tensor([PROMPTS[i]["input_ids"]])
            solo = model(solo_ids).logits[0]
            pads = ids.shape[1] - solo_ids.shape[1]
            torch.testing.assert_close(batch[row, pads:], solo, atol=1e-4, rtol=0)
            del solo
    assert torch.isfinite(batch).all()


def test_tokenizer_output_feeds_generate(model, tokenizer, in_golden):
    """The base-model surface: model.generate(**tokenizer(text, return_tensors='pt'))."""
    left = qwenvl.QWenTokenizer(tokenizer.mergeable_ranks, {"padding_side": "left"})
    inputs = left([PROMPTS[0]["prompt"], PROMPTS[1]["prompt"]], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert [r[inputs.input_ids.shape[1]:] for r in out.tolist()] == [SOLO[0][:4], SOLO[1][:4]]
    single = model.generate(**tokenizer(PROMPTS[0]["prompt"], return_tensors="pt"), max_new_tokens=4,
                            do_sample=False, eos_token_id=None)
    assert tokenizer.decode(single[0, len(PROMPTS[0]["input_ids"]):]) == tokenizer.decode(SOLO[0][:4])


# ---- stopping ---------------------------------------------------------------------------------------------

def expected_stop(tokens: list[int], eos: set[int], n: int) -> list[int]:
    """A row's tokens up to and including its first eos, then nothing."""
    for i, t in enumerate(tokens[:n]):
        if t in eos:
            return tokens[:i + 1]
    return tokens[:n]


def first_new_token_at(tokens: list[int], start: int) -> int:
    return next(k for k in range(start, len(tokens)) if tokens[k] not in tokens[:k])


@pytest.mark.parametrize("pad_token_id", [PAD, 7])
def test_eos_stops_a_row_and_pads_it(model, in_golden, pad_token_id):
    order = (0, 1)
    k = first_new_token_at(SOLO[0], 2)
    eos = SOLO[0][k]  # greedy decoding of prompt 0 produces it at step k, so the row must stop there
    ids, mask = left_pad([PROMPTS[i]["input_ids"] for i in order])
    out = greedy(model, ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=pad_token_id)
    rows = [expected_stop(SOLO[i], {eos}, 10) for i in order]
    steps = max(map(len, rows))
    assert out.shape == (2, ids.shape[1] + steps)
    for row, want in enumerate(rows):
        assert out[row, ids.shape[1]:].tolist() == want + [pad_token_id] * (steps - len(want))
    assert out[0, ids.shape[1] + k].item() == eos  # the eos itself is kept, as transformers does


def test_min_new_tokens_forbids_eos_until_reached(model, in_golden):
    ids = torch.tensor([PROMPTS[0]["input_ids"]])
    first = SOLO[0][0]  # greedy's first new token; as eos it ends the row at once ...
    assert greedy(model, ids, 6, eos_token_id=first).shape[1] == ids.shape[1] + 1
    out = greedy(model, ids, 6, eos_token_id=first, min_new_tokens=3)[0, ids.shape[1]:].tolist()
    assert first not in out[:3] and len(out) >= 4  # ... unless min_new_tokens holds it back (as transformers)
    with pytest.raises(ValueError, match="min_new_tokens"):
        greedy(model, ids, 6, min_new_tokens=-1)


def test_eos_list_and_all_rows_finished_ends_generation(model, in_golden):
    k0, k1 = first_new_token_at(SOLO[0], 1), first_new_token_at(SOLO[1], 3)
    eos = [SOLO[0][k0], SOLO[1][k1]]
    ids, mask = left_pad([PROMPTS[0]["input_ids"], PROMPTS[1]["input_ids"]])
    out = greedy(model, ids, 10, attention_mask=mask, eos_token_id=eos)
    rows = [expected_stop(SOLO[i], set(eos), 10) for i in (0, 1)]
    assert out.shape[1] == ids.shape[1] + max(map(len, rows)) < ids.shape[1] + 10


def test_multi_token_stop_words(model, in_golden):
    ids = torch.tensor([PROMPTS[0]["input_ids"]])
    solo = SOLO[0]
    k = next(k for k in range(3, 9) if all(solo[j:j + 2] != solo[k:k + 2] for j in range(k)))
    out = greedy(model, ids, 10, stop_words_ids=[solo[k:k + 2]])
    assert out[0, ids.shape[1]:].tolist() == solo[:k + 2]
    # only the whole word stops: its first token followed by something else does not
    wrong_second = [solo[k], (solo[k + 1] + 1) % 1000]
    out = greedy(model, ids, 10, stop_words_ids=[wrong_second])
    assert out[0, ids.shape[1]:].tolist() == solo


@pytest.mark.parametrize("n", [1, 3])
def test_max_new_tokens_and_output_is_prompt_plus_new(model, in_golden, n):
    ids = torch.tensor([PROMPTS[1]["input_ids"]])
    out = greedy(model, ids, n)
    assert out.shape == (1, ids.shape[1] + n)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert out[0, ids.shape[1]:].tolist() == SOLO[1][:n]


def test_default_eos_comes_from_generation_config(model):
    params = SamplingParams.build(model.generation_config)
    assert params.eos_token_id == [151643] and params.pad_token_id == 151643
    assert params.do_sample is True and params.top_p == 0.5 and params.top_k == 0 and params.max_new_tokens == 512
    assert SamplingParams.build(model.generation_config, eos_token_id=None).eos_token_id == []


# ---- sampling ---------------------------------------------------------------------------------------------

def sample(model, seed=None, n=8, **kwargs):
    ids = torch.tensor([PROMPTS[0]["input_ids"]])
    settings = dict(do_sample=True, top_p=1.0, top_k=0, max_new_tokens=n, eos_token_id=None, seed=seed)
    return model.generate(ids, **{**settings, **kwargs})[0, ids.shape[1]:].tolist()


def test_same_seed_same_tokens_different_seed_different(model):
    first = sample(model, seed=123)
    assert sample(model, seed=123) == first
    assert sample(model, seed=124) != first
    assert first != SOLO[0][:8]  # nearly uniform sampling over 151936 tokens is not greedy


def test_global_torch_seed_is_used_without_a_seed(model):
    torch.manual_seed(1234)
    first = sample(model)
    torch.manual_seed(1234)
    assert sample(model) == first


@pytest.mark.parametrize("settings", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-3)],
                         ids=lambda s: next(iter(s)))
def test_degenerate_sampling_equals_greedy(model, settings):
    assert sample(model, seed=5, **settings) == SOLO[0][:8]


def test_repetition_penalty_rule_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -4.0, 0.0]])
    seen = torch.tensor([[0, 1, 1], [2, 2, 2]])  # repeats count once
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert got.tolist() == [[1.0, -2.0, 0.5, 3.0], [1.0, 1.0, -8.0, 0.0]]
    assert apply_repetition_penalty(logits, seen, 0.5).tolist() == [[4.0, -0.5, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0]]


def test_repetition_penalty_in_generation_matches_a_hand_loop(model):
    ids = PROMPTS[0]["input_ids"]
    penalty = 1.5
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(6):
            logits = model(torch.tensor([sequence])).logits[0, -1].clone()
            for t in set(sequence):  # transformers: every token of prompt + output, once
                logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
            sequence.append(int(logits.argmax()))
    got = greedy(model, torch.tensor([ids]), 6, repetition_penalty=penalty)[0].tolist()
    assert got == sequence
    assert got[len(ids):] != SOLO[0][:6]  # the penalty changed the answer, so the test has teeth


def log_probs(*p):
    return torch.tensor([[math.log(v) for v in p]])


def kept(logits: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(logits[0].tolist()) if v != -INF]


def test_warp_temperature_top_k_top_p_by_hand():
    params = lambda **kw: SamplingParams(do_sample=True, **kw)
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert warp(logits, params(temperature=2.0)).tolist() == [[0.5, 1.5, 1.0, 0.0]]
    assert warp(logits, params(top_k=2)).tolist() == [[-INF, 3.0, 2.0, -INF]]
    assert torch.equal(warp(logits, params(top_k=0, top_p=1.0)), logits)
    probs = log_probs(0.5, 0.3, 0.15, 0.05)
    assert kept(warp(probs, params(top_p=0.6))) == [0, 1]  # smallest set with mass >= 0.6
    assert kept(warp(probs, params(top_p=0.45))) == [0]
    assert kept(warp(probs, params(top_p=0.9))) == [0, 1, 2]
    assert kept(warp(log_probs(0.97, 0.01, 0.01, 0.01), params(top_p=1e-9))) == [0]  # at least one token


def test_warp_order_is_temperature_then_top_k_then_top_p():
    params = lambda **kw: SamplingParams(do_sample=True, **kw)
    # temperature 0.5 sharpens [0.5, 0.3, 0.15, 0.05] to ~[0.68, 0.25, 0.06, 0.01]: only one token left
    assert kept(warp(log_probs(0.5, 0.3, 0.15, 0.05), params(temperature=0.5, top_p=0.6))) == [0]
    # top-k 2 first renormalizes [0.4, 0.3] to [0.57, 0.43]: top_p 0.5 then keeps one token, not two
    assert kept(warp(log_probs(0.4, 0.3, 0.2, 0.1), params(top_k=2, top_p=0.5))) == [0]


@pytest.mark.parametrize("bad, name", [
    (dict(temperature=0.0, do_sample=True), "temperature"), (dict(temperature=-1.0, do_sample=True), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_invalid_sampling_parameters_are_named(model, tokenizer, bad, name):
    with pytest.raises(ValueError, match=name):
        model.generate(torch.tensor([PROMPTS[0]["input_ids"]]), **bad)
    with pytest.raises(ValueError, match=name):
        model.chat(tokenizer, "hi", **bad)


# ---- a scripted model: exact control over the tokens --------------------------------------------------------

class ScriptedModel:
    """Implements what generation needs (prefill, decode_step, agree, device, config): each row emits its script's tokens."""

    device = torch.device("cpu")
    generation_config = GenerationConfig()
    config = QWenConfig()  # the position limit and vocabulary size that prompts are checked against

    def __init__(self, script=None, logits=None):
        self.script, self.fixed = script, logits
        self.calls = 0

    def _logits(self, batch):
        if self.fixed is not None:
            return self.fixed.expand(batch, -1).clone()
        out = torch.zeros(batch, 151936)
        out[:, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return out

    def prefill(self, input_ids, attention_mask, images, max_new_tokens):
        self.calls = 0
        return self._logits(input_ids.shape[0]), None, None

    def decode_step(self, tokens, cache, rows):
        return self._logits(tokens.shape[0])

    def agree(self, tokens):  # one process: nothing to agree on
        return tokens


def test_repetition_penalty_ignores_left_padding():
    """A padded row must not be penalized for the pad tokens it would not have alone."""
    logits = torch.zeros(1, 151936)
    logits[0, PAD], logits[0, 10] = 5.0, 4.0  # penalized by 2, the pad token would lose to token 10
    stub = ScriptedModel(logits=logits)
    ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8]])
    solo = generation.generate(stub, torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False,
                               repetition_penalty=2.0, eos_token_id=None)
    batch = generation.generate(stub, ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                repetition_penalty=2.0, eos_token_id=None)
    assert solo[0, 3:].tolist() == [PAD, 10]  # alone: the pad id is fresh, then penalized once generated
    assert batch[0, ids.shape[1]:].tolist() == solo[0, 3:].tolist()


def byte_token(tokenizer, value: int) -> int:
    return tokenizer.mergeable_ranks[bytes([value])]


def scripted_reply(tokenizer):
    """'<ref>the dog</ref><box>(1,2),(300,400)</box> 好', with 好 (e5 a5 bd) split over three byte tokens."""
    ids = tokenizer.encode("<ref>the dog</ref><box>(1,2),(300,400)</box> ")
    return ids + [byte_token(tokenizer, b) for b in "好".encode()] + [tokenizer.im_end_id]


def test_stream_keeps_tags_and_never_splits_a_character(tokenizer):
    script = scripted_reply(tokenizer)
    texts = list(chat_module.chat_stream(ScriptedModel(script), tokenizer, "where is the dog?", do_sample=False))
    assert texts[-1] == "<ref>the dog</ref><box>(1,2),(300,400)</box> 好"
    assert "<ref>the dog</ref>" in texts and any(t.endswith("<box>(1,2),(300,400)</box>") for t in texts)
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before) and after != before
    assert not any("\ufffd" in t for t in texts)  # the half-built 好 is never shown
    response, _ = chat_module.chat(ScriptedModel(script), tokenizer, "where is the dog?", do_sample=False)
    assert response == texts[-1]


def test_stream_ends_with_an_incomplete_character_only_if_the_reply_does(tokenizer):
    script = tokenizer.encode("ok ") + [byte_token(tokenizer, 0xE5), byte_token(tokenizer, 0xA5), tokenizer.im_end_id]
    texts = list(chat_module.chat_stream(ScriptedModel(script), tokenizer, "hi", do_sample=False))
    assert texts == ["ok", "ok \ufffd"]  # the final text is the decode of everything generated


def test_stream_and_chat_stop_at_any_end_of_turn_token(tokenizer):
    for end in (tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id):
        script = tokenizer.encode("fine") + [end] + tokenizer.encode(" junk")
        model = ScriptedModel(script)
        assert chat_module.chat(model, tokenizer, "hi", do_sample=False)[0] == "fine"
        assert list(chat_module.chat_stream(model, tokenizer, "hi", do_sample=False)) == ["fine"]


# ---- chat on the golden model --------------------------------------------------------------------------------

CHAT = CASES["chat"]


def test_chat_appends_history(model, tokenizer, in_golden):
    case = CHAT[0]
    response, history = model.chat(tokenizer, case["query"], history=None, do_sample=False, max_new_tokens=12)
    assert response == case["response"]
    assert history == [(case["query"], case["response"])]
    response2, history2 = model.chat(tokenizer, CHAT[1]["query"], history=history, do_sample=False,
                                     max_new_tokens=12)
    assert response2 == CHAT[1]["response"]
    assert history2 == [(case["query"], case["response"]), (CHAT[1]["query"], response2)]


def test_chat_without_append_leaves_history(model, tokenizer, in_golden):
    case = CHAT[1]
    history = [tuple(h) for h in case["history"]]
    before = list(history)
    response, returned = model.chat(tokenizer, case["query"], history=history, append_history=False,
                                    do_sample=False, max_new_tokens=12)
    assert response == case["response"]
    assert history == before and returned == before


def test_chat_takes_a_list_format_query(model, tokenizer, in_golden):
    query = [{"image": "images/shapes_640x480.png"}, {"text": "这是什么?"}]
    response, history = model.chat(tokenizer, query, history=None, do_sample=False, max_new_tokens=12)
    assert response == CHAT[0]["response"]
    assert history == [(CHAT[0]["query"], response)]


def test_chat_refuses_an_empty_query(model, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        model.chat(tokenizer, "   ")


def test_chat_stream_on_the_golden_model(model, tokenizer, in_golden):
    case = CHAT[0]
    texts = list(model.chat_stream(tokenizer, case["query"], history=[], system=case["system"], do_sample=False,
                                   max_new_tokens=12))
    assert texts
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before) and after != before
    assert not any(t.endswith("\ufffd") for t in texts[:-1])
    new = greedy(model, torch.tensor([case["context_ids"]]), 12)[0, len(case["context_ids"]):].tolist()
    assert not set(new) & {151643, 151644, 151645}  # cut by max_new_tokens, not ended
    assert texts[-1] == tokenizer.decode(new, errors="replace").strip()
    assert texts[-1].startswith(case["response"])  # chat() drops the cut reply's last token, as the original


def test_unknown_or_unsupported_generation_options_are_refused(model, tokenizer):
    ids = torch.tensor([[9707, 11, 1879]])
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate(ids, max_new_token=3)  # a typo must not silently fall back to 512 tokens
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, max_new_tokens=2, num_beams=4)
    with pytest.raises(TypeError, match="temprature"):
        model.chat(tokenizer, "hi", history=None, temprature=0.1)
    out = model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=True, num_beams=1)
    assert out.shape == (1, 5)


def test_greedy_is_argmax_with_its_tie_rule():
    from qwenvl.generation import greedy

    generator = torch.Generator().manual_seed(0)
    ties = torch.randint(0, 4, (16, 5000), generator=generator).float()  # many equal maxima in every row
    assert torch.equal(greedy(ties), ties.argmax(-1))
    wide = torch.randn(32, 151936, generator=generator, dtype=torch.float64)
    wide[3, 100] = float("nan")
    assert torch.equal(greedy(wide), wide.float().argmax(-1))
    for logits in (ties, wide.float()):  # bf16 logits (as a bf16 model gives them): the same indices as widened
        logits = logits.bfloat16()
        assert torch.equal(greedy(logits), logits.float().argmax(-1))
    ties = torch.randint(0, 3, (32, 151936), generator=generator).bfloat16()  # the blocked path, ties across blocks
    ties[5] = -1.0
    ties[5, 151935] = 0.0  # the maximum in the last block only
    assert torch.equal(greedy(ties), ties.float().argmax(-1))
    assert torch.equal(greedy(ties[:, :5000]), ties[:, :5000].float().argmax(-1))  # not a multiple of the block
