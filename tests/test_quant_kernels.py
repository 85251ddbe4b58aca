"""The packed int4/int8 kernels (quant_kernels) against the GPTQ formula (QuantLinear's dequantize path)."""
import json

import pytest
import torch

import qwenvl
from qwenvl import cli
from qwenvl.model import quant_kernels as kernels
from qwenvl.model.quant import QuantLinear, pack

from conftest import CHECKPOINT, float_twin

IDS = torch.tensor([[9707, 11, 1879, 0, 220, 6388, 12621]])
needs_int4 = pytest.mark.skipif(not kernels.available(4, "cpu", torch.float32), reason="no CPU int4 kernel")
needs_int8 = pytest.mark.skipif(not kernels.available(8, "cpu", torch.float32), reason="no CPU int8 kernel")


def random_layer(in_features, out_features, group_size, bits=4, act_order=False, sym=True, seed=0):
    """A QuantLinear with random codes, zeros and scales (GPTQ's general case, not only what quantize makes)."""
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(in_features, out_features, group_size, bits)
    top = 2 ** bits
    layer.qweight.copy_(pack(torch.randint(0, top, (in_features, out_features), generator=g), 0, bits))
    groups = layer.scales.shape[0]
    zeros = torch.full((groups, out_features), top // 2 - 1) if sym else \
        torch.randint(0, top - 1, (groups, out_features), generator=g)
    layer.qzeros.copy_(pack(zeros, 1, bits))
    layer.scales.copy_((torch.rand(groups, out_features, generator=g) / 50 + 1e-3).half())
    layer.bias.copy_(torch.randn(out_features, generator=g).half())
    if act_order:  # GPTQ desc_act: groups follow a permutation of the inputs
        layer.g_idx.copy_((torch.randperm(in_features, generator=g).argsort() // layer.group_size).int())
    return layer


def reference(layer, x):
    with torch.no_grad():
        return torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32), layer.bias.float())


@needs_int4
@pytest.mark.parametrize("group_size,act_order", [(32, False), (128, False), (256, False), (128, True), (512, False)])
def test_int4_kernel_equals_the_gptq_formula(group_size, act_order):
    layer = random_layer(512, 48, group_size, act_order=act_order)
    x = torch.randn(3, 5, 512)
    want = reference(layer, x)
    layer.eval()
    assert layer._kernel is not None and layer.qweight is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        got = layer(x.bfloat16()).float()  # bf16 activations, scales and zeros: within bf16 rounding
    assert float((got - want).norm() / want.norm()) < 1e-2


@needs_int8
@pytest.mark.parametrize("sym", [True, False])
def test_int8_kernel_equals_the_gptq_formula(sym):
    layer = random_layer(256, 40, -1, bits=8, sym=sym)
    x = torch.randn(4, 256)
    want = reference(layer, x)
    layer.eval()
    assert layer._kernel is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert float((layer(x.bfloat16()).float() - want).norm() / want.norm()) < 1e-2


@pytest.mark.parametrize("in_features,out_features,group_size,bits", [(64, 24, 32, 4), (96, 32, 16, 4),
                                                                      (128, 32, 64, 8)])
def test_layers_no_kernel_takes_stay_on_the_reference_path(in_features, out_features, group_size, bits):
    # outputs not a multiple of 16 (CPU int4), a group of 16, grouped int8 (the int8 kernel has one scale per output)
    layer = random_layer(in_features, out_features, group_size, bits)
    x = torch.randn(2, in_features)
    want = reference(layer, x)
    layer.eval()
    assert layer._kernel is None and layer.qweight is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)


@needs_int4
@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (8, False)])
def test_packing_round_trips_through_state_dict_train_and_load(bits, act_order):
    layer = random_layer(256, 64, 64 if bits == 4 else -1, bits, act_order=act_order, sym=False)
    plain = {k: v.clone() for k, v in layer.state_dict().items()}
    codes = torch.randint(0, 16, (48, 160), dtype=torch.int32)
    assert torch.equal(kernels.unpack_int4(kernels.pack_int4(codes), 48, 160), codes)
    layer.eval()
    state = layer.state_dict()
    assert set(state) == set(plain) and all(torch.equal(state[k], plain[k]) for k in plain)
    other = random_layer(256, 64, 64 if bits == 4 else -1, bits, act_order=act_order, seed=1).eval()
    other.load_state_dict(state)
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert other._kernel is not None and torch.equal(other(x), layer(x))
    layer.train()
    assert layer._kernel is None and torch.equal(layer.qweight, plain["qweight"])


@needs_int4
def test_packed_int4_holds_under_0_3x_the_bf16_bytes():
    layer = random_layer(1024, 1024, 128).eval()
    assert layer._kernel is not None
    assert layer.weight_bytes() <= 0.3 * 1024 * 1024 * 2


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    assert cli.main(["quantize", "-m", str(CHECKPOINT), "--out", str(out), "--bits", "8"]) == 0
    return out


def test_int8_checkpoint_loads_packed_and_computes_its_dequantized_function(int8_checkpoint):
    config = json.loads((int8_checkpoint / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 8 and config["quantization_config"]["group_size"] == -1
    model = qwenvl.AutoModelForCausalLM.from_pretrained(int8_checkpoint, fp32=True, device_map="cpu")
    layer = model.transformer.h[0].mlp.w1
    assert isinstance(layer, QuantLinear) and layer.bits == 8
    assert (layer._kernel is not None) == kernels.available(8, "cpu", torch.float32)
    twin = float_twin(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, twin(IDS).logits, atol=1e-3, rtol=1e-3)
        assert torch.equal(model.generate(IDS, max_new_tokens=5, do_sample=False, eos_token_id=None),
                           twin.generate(IDS, max_new_tokens=5, do_sample=False, eos_token_id=None))


def test_bad_quantize_options_name_themselves(tmp_path):
    from qwenvl.errors import OptionsError
    from qwenvl.quantize import quantize_checkpoint
    with pytest.raises(OptionsError, match="bits must be 4 or 8"):
        quantize_checkpoint(CHECKPOINT, tmp_path / "a", bits=3)
    with pytest.raises(OptionsError, match="group_size"):
        quantize_checkpoint(CHECKPOINT, tmp_path / "b", group_size=0)


def test_bench_quantizes_in_memory_and_keeps_the_float_layers_packed():
    from qwenvl import bench
    from qwenvl.model import language
    model = bench.random_model(bench.random_config("tiny"), torch.bfloat16, torch.device("cpu"))
    want = model.lm_head.packed
    assert want == language._onednn_bf16_reorder()
    bench.quantize_random(model, "int4")
    layer = model.transformer.h[0].mlp.w1
    assert isinstance(layer, QuantLinear) and (layer._kernel is not None) == kernels.available(4, "cpu", torch.bfloat16)
    assert model.lm_head.packed == want  # a float lm_head unpacked by the quantizing would decode 2x slower
    model = bench.random_model(bench.random_config("tiny"), torch.bfloat16, torch.device("cpu"))
    bench.quantize_random(model, "int8", lm_head=True)  # a packed lm_head quantizes from its plain weight
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8


@needs_int4
@pytest.mark.parametrize("bits,group_size,act_order,sym", [(4, 32, False, True), (4, 128, True, False),
                                                           (8, -1, False, True), (8, -1, False, False)])
def test_many_rows_take_a_gemm_on_the_dequantized_weight_with_the_same_result(bits, group_size, act_order, sym,
                                                                              monkeypatch):
    layer = random_layer(256, 128, group_size, bits, act_order=act_order, sym=sym)
    rows = kernels.DEQUANTIZE_ROWS[bits]
    x = torch.randn(rows + 3, 256)
    want = reference(layer, x)
    layer.eval()
    if layer._kernel["dense"] is None:
        pytest.skip("this CPU's int4 layout is not the blocked one: the kernel reads it")
    calls = []
    for op in ("int4_mm", "int8_mm"):
        real = getattr(kernels, op)
        monkeypatch.setattr(kernels, op, lambda *a, real=real: calls.append(a[0].shape[0]) or real(*a))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        assert calls == []  # the GEMM
        assert float((layer(x.bfloat16()).float() - want).norm() / want.norm()) < 1e-2
        torch.testing.assert_close(layer(x[:rows - 1]), want[:rows - 1], rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert calls == [rows - 1]  # fewer rows: the kernel


def test_int4_block_layout_matches_the_probes():
    block = kernels.int4_block("cpu")
    if block is None:
        pytest.skip("not the blocked layout here")
    codes = torch.randint(0, 16, (2 * block, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    sz = torch.stack([torch.ones(1, 2 * block), torch.full((1, 2 * block), 8.0)], -1)  # W = code - 8 + 8 = code
    assert torch.equal(kernels.dequantize_int4(kernels.pack_int4(codes), 2 * block, 64, block, 64, sz), codes.float())
