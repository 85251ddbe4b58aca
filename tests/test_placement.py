"""device_map: plans on given memory budgets (no GPU needed), explicit-map refusals, and the pipeline path."""
import pytest
import torch

import qwenvl
from qwenvl.bench import random_config
from qwenvl.errors import OptionsError
from qwenvl.loading import resolve_device
from qwenvl.model import placement

from conftest import CHECKPOINT

BIG = random_config("9.6b")
GB = 10 ** 9


def blocks(plan: dict) -> list[str]:
    return [plan[f"transformer.h.{i}"] for i in range(BIG.num_hidden_layers)]


def test_plans_on_given_budgets():
    head, block = placement.sizes(BIG, torch.bfloat16)
    assert 6 * GB < head < 7 * GB and 0.35 * GB < block < 0.45 * GB  # the 9.6B shape in bf16
    one = placement.plan(BIG, torch.bfloat16, {"cuda:0": 21 * GB})
    assert set(one.values()) == {"cuda:0"}
    two = placement.plan(BIG, torch.bfloat16, {"cuda:0": 16 * GB, "cuda:1": 16 * GB})
    assert {two[name] for name in placement.HEAD} == {"cuda:0"}
    counts = [blocks(two).count(d) for d in ("cuda:0", "cuda:1")]
    assert sum(counts) == 32 and abs(counts[0] - counts[1]) <= 1  # balanced: both cards have room for 16
    assert blocks(two) == sorted(blocks(two))  # in order: the hidden state crosses once
    offload = placement.plan(BIG, torch.bfloat16, {"cuda:0": 8 * GB, "cpu": 64 * GB})
    on_gpu = (8 * GB - head) // block
    assert blocks(offload) == ["cuda:0"] * on_gpu + ["cpu"] * (32 - on_gpu)  # the last blocks offloaded
    small_head = placement.plan(BIG, torch.bfloat16, {"cuda:0": 1 * GB, "cpu": 64 * GB})
    assert set(small_head.values()) == {"cpu"}
    with pytest.raises(OptionsError, match="does not fit: .* CPU budget is 1.00 GB"):
        placement.plan(BIG, torch.bfloat16, {"cuda:0": 8 * GB, "cpu": 1 * GB})
    with pytest.raises(OptionsError, match="does not fit: no GPU is given"):
        placement.plan(BIG, torch.bfloat16, {"cpu": 1 * GB})


def test_memory_budgets():
    assert placement.parse_size("cpu", "1.5GiB") == 3 << 29
    assert placement.parse_size(0, 500) == 500
    assert placement.available({"cpu": "2GB", 1: "10MiB", 0: "1GB"}) == \
        {"cuda:0": GB, "cuda:1": 10 << 20, "cpu": 2 * GB}
    with pytest.raises(OptionsError, match=r"max_memory\['cpu'\] must be bytes"):
        placement.available({"cpu": "lots"})
    with pytest.raises(OptionsError, match="max_memory key 'disk' is not a device"):
        placement.available({"disk": "1GB"})


@pytest.mark.parametrize("device_map, message", [
    ({"transformer": "cpu", "lm_head": "cpu", "transformer.h.0.attn": "cpu"}, "'transformer.h.0.attn' is inside"),
    ({"transformer": "cpu", "lm_head": "cpu", "decoder": "cpu"}, "'decoder' names no module"),
    ({"transformer.wte": "cpu", "transformer.h": "cpu", "lm_head": "cpu"}, "no device for transformer.visual"),
    ({"transformer": "cpu", "lm_head": "cuda:0"}, "must be on one device"),
    ({"transformer": "cpu", "lm_head": "tpu"}, r"device_map\['lm_head'\]: unknown device 'tpu'"),
])
def test_explicit_map_refusals(device_map, message):
    as_if_gpus = lambda d: torch.device(d) if str(d).startswith("cuda") else resolve_device(d)
    with pytest.raises(OptionsError, match=message):
        placement.check_map(qwenvl.QWenConfig.from_json(str(CHECKPOINT / "config.json")), device_map, as_if_gpus)


def test_max_memory_needs_auto():
    with pytest.raises(OptionsError, match="max_memory goes with device_map='auto'"):
        qwenvl.from_pretrained(CHECKPOINT, device_map="cpu", max_memory={"cpu": "1GB"})


def test_explicit_map_runs_the_pipeline_path(model, capsys):
    from qwenvl.engine import LLMEngine

    spread = qwenvl.from_pretrained(CHECKPOINT, fp32=True, device_map={
        "transformer": "cpu", "transformer.h.1": "cpu", "lm_head": "cpu"})
    assert "decoder blocks 0-1 on cpu" in capsys.readouterr().err
    assert spread.transformer.layer_devices == [torch.device("cpu")] * 2
    assert spread.hf_device_map["transformer.h.1"] == "cpu"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        _, cache, _ = spread.prefill(ids, None, None, 4)
    assert isinstance(cache.k, list) and len(cache.k) == 2  # one cache tensor per block, beside it
    greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(spread.generate(ids, **greedy), model.generate(ids, **greedy))
    assert LLMEngine(spread, max_num_seqs=1, kv_cache_tokens=64).generate([[1, 2, 3, 4, 5]], **greedy)[0] == \
        model.generate(ids, **greedy)[0, 5:].tolist()  # one device in all: the engine runs it


def test_auto_with_a_cpu_budget_loads_on_one_device():
    loaded = qwenvl.from_pretrained(CHECKPOINT, fp32=True, device_map="auto", max_memory={"cpu": "1GB"})
    assert loaded.transformer.layer_devices is None and loaded.hf_device_map == {"": "cpu"}
    with pytest.raises(OptionsError, match="the model does not fit"):
        qwenvl.from_pretrained(CHECKPOINT, fp32=True, device_map="auto", max_memory={"cpu": "1MB"})
