"""The oneDNN CPU paths of `Linear` against the plain F.linear, and the packed weight's round trips."""
import pytest
import torch
import torch.nn.functional as F

import qwenvl
from qwenvl.model import language
from qwenvl.model.language import Linear

from conftest import CHECKPOINT

pytestmark = pytest.mark.skipif(not language._ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")


def packed_linear(out_features=96, in_features=64, bias=True, seed=0):
    torch.manual_seed(seed)
    if not language._onednn_bf16_reorder():
        pytest.skip("oneDNN's bf16 reorder needs an AVX512-class CPU")
    layer = Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    dense = layer.weight.detach().clone()
    layer.pack()
    assert layer.packed
    return layer, dense


@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 5, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_bf16_equals_plain(shape, bias):
    layer, dense = packed_linear(bias=bias)
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.inference_mode():
        got = layer(x)
    want = F.linear(x.float(), dense.float(), None if layer.bias is None else layer.bias.float())
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)  # bf16 output rounding


@pytest.mark.parametrize("shape", [(1, 64), (3, 4, 64)])
def test_float32_onednn_path_equals_plain(shape):
    torch.manual_seed(1)
    layer = Linear(64, 96)
    x = torch.randn(shape)
    with torch.inference_mode():
        fast = layer(x)
    plain = F.linear(x, layer.weight, layer.bias)  # grad mode: the plain path
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_state_dict_is_dense_and_exact():
    layer, dense = packed_linear()
    state = layer.state_dict()
    assert not state["weight"].is_mkldnn and torch.equal(state["weight"], dense)
    assert layer.packed  # reading the state does not unpack the layer


def test_load_state_dict_train_and_to_unpack():
    layer, dense = packed_linear()
    layer.load_state_dict({"weight": dense * 2, "bias": layer.bias.detach()})
    assert not layer.packed and torch.equal(layer.weight, dense * 2)

    layer, dense = packed_linear()
    layer.train()
    assert not layer.packed and torch.equal(layer.weight, dense)
    loss = layer(torch.randn(3, 64).to(torch.bfloat16)).float().sum()
    loss.backward()
    assert layer.weight.grad is not None

    layer, dense = packed_linear()
    layer.to(torch.float32)
    assert not layer.packed and torch.equal(layer.weight, dense.float())


@pytest.mark.skipif(not language._onednn_bf16_reorder(), reason="oneDNN's bf16 reorder needs an AVX512-class CPU")
def test_bf16_checkpoint_on_cpu_is_packed_and_matches_the_plain_model(tmp_path):
    fast = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, bf16=True, device_map="cpu")
    assert fast.lm_head.packed and fast.transformer.h[0].attn.c_attn.packed
    plain = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, bf16=True, device_map="cpu")
    for module in plain.modules():
        if isinstance(module, Linear):
            module.unpack()
    ids = torch.tensor([[9707, 11, 1879, 0, 220, 6388, 12621, 271, 3244]])
    with torch.inference_mode():
        a = fast.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        b = plain.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
        la, lb = fast(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(la.float(), lb.float(), atol=0.1, rtol=0.02)

    qwenvl.save_pretrained(fast, str(tmp_path))
    again = qwenvl.AutoModelForCausalLM.from_pretrained(tmp_path, bf16=True, device_map="cpu")
    saved, loaded = plain.state_dict(), again.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
