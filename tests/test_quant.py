"""Int4 (GPTQ format, SPEC 8): the bit layout, the dequantization formula, int4 checkpoints, Q-LoRA."""
import json

import pytest
import torch
from safetensors import safe_open

import qwenvl
from qwenvl import cli
from qwenvl.model.quant import QuantLinear, pack, unpack
from qwenvl.train import adapters

from conftest import CHECKPOINT, float_twin

IDS = torch.tensor([[9707, 11, 1879, 0, 220, 6388, 12621]])


def test_bit_layout_of_qweight_and_qzeros():
    codes = torch.arange(16 * 3).reshape(16, 3) % 16  # [in=16, out=3]
    words = pack(codes, 0)
    assert words.shape == (2, 3) and words.dtype == torch.int32
    for r in range(2):
        for o in range(3):  # input row 8r + j sits in bits 4j..4j+3 of word r
            assert int(words[r, o]) & 0xFFFFFFFF == sum(int(codes[8 * r + j, o]) << (4 * j) for j in range(8))
    assert torch.equal(unpack(words, 0), codes)
    zeros = torch.arange(2 * 16).reshape(2, 16) % 16  # packed along the output axis
    assert torch.equal(unpack(pack(zeros, 1), 1), zeros)
    assert int(pack(torch.full((8, 1), 15), 0)) == -1  # the high bit set: int32 stores it negative


def test_dequantize_follows_the_formula():
    layer = QuantLinear(16, 8, group_size=8)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16, 8), generator=g)
    stored_zeros = torch.randint(0, 15, (2, 8), generator=g)
    scales = torch.rand(2, 8, generator=g).half()
    layer.qweight.copy_(pack(codes, 0))
    layer.qzeros.copy_(pack(stored_zeros, 1))
    layer.scales.copy_(scales)
    w = layer.dequantize()  # [out, in]
    for i in range(16):
        for o in range(8):
            expected = float(scales[i // 8, o]) * (int(codes[i, o]) - (int(stored_zeros[i // 8, o]) + 1))
            assert float(w[o, i]) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_round_to_nearest_error_is_at_most_half_a_step():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    layer = QuantLinear.quantize(w, group_size=128)
    step = w.reshape(64, 2, 128).abs().amax(-1) * 2 / 15  # per output and group
    error = (layer.dequantize() - w).abs().reshape(64, 2, 128)
    assert bool((error <= step[..., None] / 2 * 1.01 + 1e-3).all())


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int4"
    assert cli.main(["quantize", "-m", str(CHECKPOINT), "--out", str(out)]) == 0
    return out


def test_int4_checkpoint_has_the_official_layout(int4_checkpoint):
    config = json.loads((int4_checkpoint / "config.json").read_text())
    assert config["quantization_config"] == {"bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                                             "quant_method": "gptq"}
    with safe_open(str(int4_checkpoint / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("transformer.h.0.mlp.c_proj.qweight").get_shape() == [256 // 8, 128]
        assert f.get_slice("transformer.h.0.mlp.c_proj.qzeros").get_shape() == [2, 128 // 8]
        assert f.get_tensor("transformer.h.0.mlp.c_proj.scales").dtype == torch.float16
    for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        assert f"transformer.h.1.attn.c_attn.{part}" in names
    assert "transformer.h.0.attn.c_attn.weight" not in names and "lm_head.weight" in names


def test_int4_model_computes_its_dequantized_function(int4_checkpoint):
    model = qwenvl.AutoModelForCausalLM.from_pretrained(int4_checkpoint, fp32=True, device_map="cpu")
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLinear)
    twin = float_twin(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, twin(IDS).logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.generate(IDS, max_new_tokens=5, do_sample=False, eos_token_id=None),
                           twin.generate(IDS, max_new_tokens=5, do_sample=False, eos_token_id=None))


def test_qlora_trains_only_adapters_and_merges_into_the_dequantized_base(int4_checkpoint, tmp_path):
    model = qwenvl.AutoModelForCausalLM.from_pretrained(int4_checkpoint, fp32=True, device_map="cpu").train()
    adapters.add_lora(model, r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    model.eval()
    with torch.no_grad():
        qlora = model(IDS).logits
    adapters.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(int4_checkpoint), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(out), "--dtype", "fp32"]) == 0
    merged = qwenvl.AutoModelForCausalLM.from_pretrained(out, fp32=True, device_map="cpu")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, qlora, atol=1e-3, rtol=1e-4)
    in_memory = adapters.merge_lora(model)
    assert set(in_memory.state_dict()) == set(merged.state_dict())


def test_bench_train_modes_measure_what_they_train():
    from qwenvl.train.bench import run_mode
    rows = {m: run_mode(m, "tiny", seq_len=280, steps=1, precision="fp32", device="cpu") for m in ("full", "lora", "qlora")}
    assert rows["lora"]["trainable_m"] == rows["qlora"]["trainable_m"] < rows["full"]["trainable_m"]
    assert all(r["tokens_per_s"] > 0 and r["peak_gb"] > 0 and r["seq_len"] == 280 for r in rows.values())
