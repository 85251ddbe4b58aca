"""What trains: freeze plans per group, stage presets, LoRA through PEFT, adapter files and merging."""
import copy
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TOKENIZER_FILES, make_checkpoint

import qwenvl
from qwenvl.model.language import Linear, pack_for_cpu
from qwenvl.train import adapters

SPAN = 256
IMG, IMG_END, IMG_PAD = 151857, 151858, 151859
LAYERS, VIT_LAYERS = 2, 2  # the tiny config's depth
LLM_DEFAULT = {f"transformer.h.{i}.{m}" for i in range(LAYERS) for m in ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2")}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("adapters") / "base", seed=7)


@pytest.fixture(scope="module")
def base(ckpt):
    return qwenvl.AutoModelForCausalLM.from_pretrained(ckpt, fp32=True, device_map="cpu")


@pytest.fixture
def fresh(base):
    """A private copy of the base model in training mode."""
    return lambda: copy.deepcopy(base).train()


def batch(seed: int = 0, text: int = 24, image_size: int = 448):
    """One row: an image span then text, the second half of the text supervised; one pixel tensor."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([IMG]), torch.full((SPAN,), IMG_PAD), torch.tensor([IMG_END]),
                     torch.randint(0, 150000, (text,), generator=g)])[None]
    labels = ids.clone()
    labels[:, : SPAN + 2 + text // 2] = -100
    pixels = torch.randn(1, 3, image_size, image_size, generator=g)
    return ids, labels, list(pixels)


def sgd_steps(model, steps: int = 3, lr: float = 1e-2, image_size: int = 448) -> None:
    """Plain SGD over *all* parameters: a parameter that should be frozen but has requires_grad moves."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        ids, labels, images = batch(step, image_size=image_size)
        loss = model(input_ids=ids, labels=labels, images=images).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(model, images: bool = False):
    """Logits of a fixed prompt (with its image, or its text alone), in the model's current mode."""
    ids, _, pixels = batch(11)
    with torch.no_grad():
        if images:
            return model(input_ids=ids, images=pixels).logits
        return model(input_ids=ids[:, SPAN + 2:]).logits


def randomize_lora(model, seed: int = 0) -> None:
    """Nonzero B (as after training), so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if adapters.is_lora(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---- groups and freeze plans ----------------------------------------------------------------------

def test_group_of_known_names():
    expected = {
        "transformer.visual.conv1.weight": "vit",
        "transformer.visual.positional_embedding": "vit",
        "transformer.visual.transformer.resblocks.3.mlp.c_proj.weight": "vit",
        "transformer.visual.attn_pool.kv_proj.weight": "resampler",
        "transformer.visual.attn_pool.attn.in_proj_weight": "resampler",
        "transformer.visual.ln_post.bias": "resampler",
        "transformer.visual.proj": "resampler",
        "transformer.wte.weight": "llm",
        "transformer.h.0.attn.c_attn.base_layer.weight": "llm",  # PEFT's wrapped name
        "transformer.ln_f.weight": "llm",
        "lm_head.weight": "llm",
    }
    assert {name: adapters.group_of(name) for name in expected} == expected


def test_unknown_group_is_rejected(fresh):
    with pytest.raises(ValueError, match="valid groups are vit, resampler, llm"):
        adapters.apply_freeze_plan(fresh(), {"llm", "vision"})


@pytest.mark.parametrize("plan", [{"vit", "resampler"}, {"resampler", "llm"}, {"llm"}])
def test_freeze_plan_trains_exactly_its_groups(fresh, plan):
    model = fresh()
    counts = adapters.apply_freeze_plan(model, plan)
    for group in adapters.GROUPS:
        if group in plan:
            assert counts[group]["trainable"] > 0
        else:
            assert counts[group]["trainable"] == 0 and counts[group]["frozen"] > 0
    before = snapshot(model)
    sgd_steps(model)
    pos_embed = "transformer.visual.attn_pool.pos_embed"
    for name, p in model.named_parameters():
        if adapters.group_of(name) in plan and name != pos_embed:
            assert not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(p, before[name]), f"{name} should be frozen"
    assert not model.get_parameter(pos_embed).requires_grad


def test_stage_presets():
    assert adapters.stage_settings(1) == {"train": {"vit", "resampler"}, "image_size": 224}
    assert adapters.stage_settings(2) == {"train": {"vit", "resampler", "llm"}, "image_size": 448}
    assert adapters.stage_settings(3) == {"train": {"resampler", "llm"}, "image_size": 448}
    with pytest.raises(ValueError, match="stages are 1, 2, 3"):
        adapters.stage_settings(4)


def test_stage1_at_224_sees_256_patches_and_trains_the_vision_side(fresh):
    model = fresh()
    preset = adapters.stage_settings(1)
    model.config.visual.image_size = preset["image_size"]
    adapters.apply_freeze_plan(model, preset["train"])
    seen = []
    hooks = [model.transformer.visual.transformer.register_forward_hook(lambda m, a, out: seen.append(a[0].shape)),
             model.transformer.visual.register_forward_hook(lambda m, a, out: seen.append(out.shape))]
    ids, labels, _ = batch(0)
    image = Image.new("RGB", (300, 200), (200, 40, 90))  # preprocessed to the configured 224x224
    loss = model(input_ids=ids, labels=labels, images=[image]).loss
    for h in hooks:
        h.remove()
    assert seen[0][1] == (224 // 14) ** 2 == 256  # the ViT's tokens: a 16x16 grid, the position table's own
    assert tuple(seen[1]) == (1, SPAN, model.config.hidden_size)  # still 256 resampler outputs per image
    assert torch.isfinite(loss)
    before = snapshot(model)
    sgd_steps(model, steps=1, image_size=224)
    assert not torch.equal(model.transformer.visual.conv1.weight, before["transformer.visual.conv1.weight"])
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])


# ---- LoRA -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, added", [
    ((), set()),
    (("mlp.c_proj",), {f"transformer.h.{i}.mlp.c_proj" for i in range(LAYERS)}),
    (("vit",), {f"transformer.visual.transformer.resblocks.{i}.{m}" for i in range(VIT_LAYERS)
                for m in ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")}),
    (("resampler",), {"transformer.visual.attn_pool.kv_proj", "transformer.visual.attn_pool.attn.out_proj"}),
])
def test_lora_wraps_exactly_the_expected_modules(fresh, extra, added):
    model = adapters.add_lora(fresh(), r=4, extra=extra)
    assert set(adapters.lora_modules(model)) == LLM_DEFAULT | added
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(adapters.is_lora(n) for n in trainable)
    assert len(trainable) == 2 * len(LLM_DEFAULT | added)  # lora_A and lora_B of each


def test_lora_rejects_unknown_targets_and_a_second_call(fresh):
    with pytest.raises(ValueError, match="valid targets are c_attn, attn.c_proj, w1, w2, mlp.c_proj, vit, resampler"):
        adapters.add_lora(fresh(), extra=("c_proj",))
    model = adapters.add_lora(fresh(), r=4)
    with pytest.raises(ValueError, match="already has LoRA"):
        adapters.add_lora(model, r=4)


def test_lora_trains_only_the_adapter(fresh):
    model = adapters.add_lora(fresh(), r=4, extra=("vit", "resampler"))
    randomize_lora(model)  # a zero B would give A only a second-order, possibly sub-ulp, update
    before = snapshot(model)
    sgd_steps(model)
    for name, p in model.named_parameters():
        if adapters.is_lora(name):
            assert not torch.equal(p, before[name]), f"{name} should have trained"
        else:
            assert torch.equal(p, before[name]), f"base weight {name} changed"


def test_lora_honours_r_alpha_dropout(fresh):
    model = adapters.add_lora(fresh(), r=8, alpha=32, dropout=0.3)
    layer = model.transformer.h[1].mlp.w2
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (8, model.config.hidden_size) and b.shape == (model.config.intermediate_size // 2, 8)
    assert a.dtype == b.dtype == torch.float32
    assert layer.scaling["default"] == 32 / 8 and layer.lora_dropout["default"].p == 0.3
    randomize_lora(model)
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        layer.eval()
        expected = layer.base_layer(x) + (32 / 8) * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
        assert torch.equal(layer(x), layer(x))
        layer.train()  # dropout on the adapter's input only while training
        assert not torch.equal(layer(x), layer(x))
    no_dropout = adapters.add_lora(fresh(), r=8, dropout=0.0).transformer.h[1].mlp.w2
    randomize_lora(no_dropout)
    with torch.no_grad():
        assert torch.equal(no_dropout(x), no_dropout(x))


def test_fresh_lora_leaves_the_output_unchanged(fresh):
    model = fresh()
    reference = logits(model.eval())
    assert torch.equal(logits(adapters.add_lora(model.train()).eval()), reference)


def test_lora_on_packed_bf16_linear(ckpt):
    """add_lora on a bf16 model straight from from_pretrained (oneDNN-packed Linear subclass on CPU)."""
    model = qwenvl.AutoModelForCausalLM.from_pretrained(ckpt, bf16=True, device_map="cpu")
    c_attn = model.transformer.h[0].attn.c_attn
    packable = c_attn.packed
    adapters.add_lora(model, r=4)
    wrapped = model.transformer.h[0].attn.c_attn
    assert isinstance(wrapped.base_layer, Linear) and not wrapped.base_layer.packed
    assert wrapped.lora_A["default"].weight.dtype == torch.float32  # adapters in fp32 on a bf16 base
    randomize_lora(model)
    ids, labels, images = batch(0)
    model.train()
    model(input_ids=ids, labels=labels, images=images).loss.backward()
    assert wrapped.lora_A["default"].weight.grad is not None and wrapped.base_layer.weight.grad is None
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids[:, SPAN + 2:]).logits
        assert plain.dtype == torch.bfloat16
        pack_for_cpu(model)  # the base linears under LoRA re-pack for inference; the adapter still applies
        assert wrapped.base_layer.packed == packable
        torch.testing.assert_close(model(input_ids=ids[:, SPAN + 2:]).logits, plain, atol=0.05, rtol=0.02)
        adapters.merge_lora(model)  # merging unpacks first
        assert model.transformer.h[0].attn.c_attn is wrapped.base_layer
        torch.testing.assert_close(model(input_ids=ids[:, SPAN + 2:]).logits, plain, atol=0.05, rtol=0.02)


# ---- saving, loading, merging -----------------------------------------------------------------------

def trained_lora_model(fresh, groups=()):
    model = adapters.add_lora(fresh(), r=4, extra=("resampler",))
    if groups:
        adapters.apply_freeze_plan(model, groups)
    sgd_steps(model, lr=0.05)
    return model.eval()


def test_adapter_round_trip(fresh, tmp_path):
    model = trained_lora_model(fresh)
    expected = logits(model)
    adapters.save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    wrapped = adapters.lora_modules(model)
    assert keys == {f"base_model.model.{m}.lora_{ab}.weight" for m in wrapped for ab in "AB"}  # PEFT's names
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 4, 16, 0.05)
    loaded = adapters.load_adapter(fresh().eval(), tmp_path / "adapter")
    assert not any(m.training for m in loaded.modules())  # an eval model stays in eval: no LoRA dropout
    assert torch.equal(logits(loaded), expected)
    with pytest.raises(ValueError, match="already has LoRA"):
        adapters.load_adapter(loaded, tmp_path / "adapter")


def test_adapter_round_trip_with_a_fully_trained_group(fresh, tmp_path):
    model = trained_lora_model(fresh, groups={"resampler"})
    expected = logits(model, images=True)
    adapters.save_adapter(model, tmp_path / "adapter")
    trained = load_file(tmp_path / "adapter" / adapters.TRAINED_WEIGHTS)
    resampler = {n for n, _ in fresh().named_parameters() if adapters.group_of(n) == "resampler"}
    assert set(trained) == resampler - {"transformer.visual.attn_pool.pos_embed"}  # official names, no base_layer
    loaded = adapters.load_adapter(fresh(), tmp_path / "adapter").eval()
    assert torch.equal(logits(loaded, images=True), expected)


def test_original_style_adapter_loads(fresh, tmp_path):
    """The original's finetune.py: suffix target list, and modules_to_save weights (wte, lm_head) in the file."""
    model = trained_lora_model(fresh)
    folder = tmp_path / "adapter"
    adapters.save_adapter(model, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn", "attn.c_proj", "w1", "w2", "kv_proj", "attn_pool.attn.out_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(folder / "adapter_model.safetensors")
    new_head = torch.randn_like(model.lm_head.weight) * 0.02
    state["base_model.model.lm_head.weight"] = new_head
    save_file(state, folder / "adapter_model.safetensors")
    loaded = adapters.load_adapter(fresh().eval(), folder)
    assert set(adapters.lora_modules(loaded)) == set(adapters.lora_modules(model))
    assert torch.equal(loaded.lm_head.weight, new_head)
    with torch.no_grad():
        model.lm_head.weight.copy_(new_head)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("groups", [set(), {"resampler"}])
def test_merge_gives_a_plain_checkpoint_with_the_same_logits(fresh, ckpt, tmp_path, groups):
    model = trained_lora_model(fresh, groups=groups)
    expected = logits(model, images=True)
    adapters.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert adapters.merge_adapter(ckpt, tmp_path / "adapter", out) == str(out)
    keys = set()
    for file in out.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            keys |= set(f.keys())
    assert keys == set(fresh().state_dict())  # the official key set: no lora_*, no base_layer
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (ckpt / name).read_bytes()
    merged = qwenvl.AutoModelForCausalLM.from_pretrained(out, fp32=True, device_map="cpu")
    torch.testing.assert_close(logits(merged, images=True), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(fresh().eval(), images=True), expected, atol=1e-3)  # the adapter mattered
    assert sorted(os.listdir(tmp_path)) == ["adapter", "merged"]  # no temporary folder left behind


def test_merge_stores_the_requested_dtype(fresh, ckpt, tmp_path):
    adapters.save_adapter(trained_lora_model(fresh), tmp_path / "adapter")
    adapters.merge_adapter(ckpt, tmp_path / "adapter", tmp_path / "merged", dtype=torch.bfloat16)
    with safe_open(tmp_path / "merged" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").dtype == torch.bfloat16


def test_merge_errors_name_the_input_and_leave_nothing(fresh, tmp_path):
    adapter = tmp_path / "adapter"
    adapters.save_adapter(trained_lora_model(fresh), adapter)
    out = tmp_path / "out"
    other = make_checkpoint(tmp_path / "other", intermediate_size=256)  # w1/w2 of another shape
    with pytest.raises(qwenvl.CheckpointError, match=r"adapter_model\.safetensors: .*mlp\.w1.* has shape"):
        adapters.merge_adapter(other, adapter, out)
    deeper = make_checkpoint(tmp_path / "deeper", num_hidden_layers=3)
    with pytest.raises(qwenvl.CheckpointError, match=r"adapter_model\.safetensors lacks 8 LoRA weights.*h\.2"):
        adapters.merge_adapter(deeper, adapter, out)
    with pytest.raises(qwenvl.CheckpointError, match="adapter folder not found: .*missing"):
        adapters.merge_adapter(other, tmp_path / "missing", out)
    with pytest.raises(qwenvl.CheckpointError, match="checkpoint folder not found: .*nowhere"):
        adapters.merge_adapter(tmp_path / "nowhere", adapter, out)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "deeper", "other"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="taken"):
        adapters.merge_adapter(other, adapter, tmp_path / "taken")
