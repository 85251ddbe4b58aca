"""from_pretrained(quantize="int8" | "int4"): a float checkpoint quantized layer by layer while it loads."""
import json

import pytest
import torch

import qwenvl
from qwenvl import cli, loading
from qwenvl.errors import OptionsError
from qwenvl.model import quant
from qwenvl.model.quant import QuantLinear

from conftest import CHECKPOINT, make_checkpoint

IDS = torch.tensor([[9707, 11, 1879, 0, 220, 6388, 12621]])


def greedy(model, n=8):
    with torch.no_grad():
        return model.generate(IDS, max_new_tokens=n, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def float_model():
    return qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu")


@pytest.mark.parametrize("mode,bits,bound", [("int8", 8, 0.03), ("int4", 4, 0.35)])
def test_quantize_on_load_equals_qwenvl_quantize_then_load(mode, bits, bound, float_model, tmp_path):
    model = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu", quantize=mode)
    names = quant.quantized_module_names(float_model)
    assert len(names) == 10 and all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert model.get_submodule(names[0]).bits == bits and not isinstance(model.lm_head, QuantLinear)
    assert model.config.quantization_config["bits"] == bits
    out = tmp_path / mode
    assert cli.main(["quantize", "-m", str(CHECKPOINT), "--out", str(out), "--bits", str(bits)]) == 0
    written = qwenvl.AutoModelForCausalLM.from_pretrained(out, fp32=True, device_map="cpu")
    assert torch.equal(greedy(model), greedy(written))
    state, other = model.state_dict(), written.state_dict()
    assert all(torch.equal(state[n + ".qweight"], other[n + ".qweight"]) for n in names)
    with torch.no_grad():
        got, want = model(IDS).logits, float_model(IDS).logits
    # round-to-nearest on the tiny golden weights (measured: int8 1.6%, int4 24% of the logits' norm; int4's
    # groups of 128 span all of this model's 128 inputs)
    assert float((got - want).norm()) <= bound * float(want.norm())
    if bits == 8:
        assert torch.equal(greedy(model), greedy(float_model))


def test_quantize_vision_too(float_model):
    model = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu", quantize="int8",
                                                        quantize_vision=True)
    vision = [n for n, m in model.named_modules() if n.startswith("transformer.visual") and isinstance(m, QuantLinear)]
    assert len(vision) == 4 * model.config.visual.layers
    assert model.config.quantization_config["quantized_vision"] is True
    image = torch.rand(3, model.config.visual.image_size, model.config.visual.image_size,
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model.encode_images([image]), float_model.encode_images([image])
    assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())


def test_a_model_quantized_with_its_vision_tower_saves_and_loads_as_such(tmp_path):
    model = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu", quantize="int4",
                                                        quantize_vision=True)
    qwenvl.save_pretrained(model, str(tmp_path / "q"))
    again = qwenvl.AutoModelForCausalLM.from_pretrained(tmp_path / "q", fp32=True, device_map="cpu")
    assert isinstance(again.transformer.visual.transformer.resblocks[0].mlp.c_fc, QuantLinear)
    assert torch.equal(greedy(again, 4), greedy(model, 4))


def test_the_float_decoder_is_never_held_whole(tmp_path, monkeypatch):
    folder = make_checkpoint(tmp_path / "ckpt", max_shard_bytes=300_000)  # many shards, a layer or less each
    assert len(loading.weight_files(str(folder))) > 5
    alive = []
    real = loading.quantize_linear

    def spy(model, name, group_size, bits):
        floats = [n for n in quant.quantized_module_names(model)
                  if not isinstance(model.get_submodule(n), QuantLinear) and not model.get_submodule(n).weight.is_meta]
        alive.append(len(floats))
        real(model, name, group_size, bits)
    monkeypatch.setattr(loading, "quantize_linear", spy)
    model = qwenvl.AutoModelForCausalLM.from_pretrained(folder, fp32=True, device_map="cpu", quantize="int4")
    assert len(alive) == 10 and max(alive) <= 3  # of 10 decoder linears, at most a shard's worth in float
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in quant.quantized_module_names(model))


def test_bad_quantize_values_are_refused_by_name(tmp_path):
    with pytest.raises(OptionsError, match=r"quantize must be 'int4', 'int8' or None, got 'int3'"):
        qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, quantize="int3")
    with pytest.raises(OptionsError, match=r"quantize_vision=True goes with quantize="):
        qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, quantize_vision=True)
    with pytest.raises(OptionsError, match=r"quantize_group_size must be"):
        qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, quantize="int4", quantize_group_size=0)
    out = tmp_path / "int8"
    assert cli.main(["quantize", "-m", str(CHECKPOINT), "--out", str(out), "--bits", "8"]) == 0
    with pytest.raises(OptionsError, match=r"already quantized \(GPTQ int8\): load it without quantize="):
        qwenvl.AutoModelForCausalLM.from_pretrained(out, quantize="int4")


def test_cli_quantize_option(capsys):
    assert cli.main(["generate", "-m", str(CHECKPOINT), "--dtype", "fp32", "--quantize", "int8", "--greedy",
                     "--max-new-tokens", "3", "--prompt", "hello"]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["bench", "-m", str(CHECKPOINT), "--dtype", "fp32", "--quant", "int8", "--repeats", "1",
                     "--decode-tokens", "2", "--prompt-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "fp32  decode" in out and "int8  decode" in out
