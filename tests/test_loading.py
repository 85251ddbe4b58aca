"""Loading checkpoints: dtypes and devices, the four weight layouts, save/reload, clear errors, the README quickstart."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import qwenvl
from qwenvl import CheckpointError

GOLDEN = Path(__file__).parent / "data" / "golden"
CHECKPOINT = GOLDEN / "checkpoint"
CASES = json.loads((GOLDEN / "model_cases.json").read_text(encoding="utf-8"))
TEXT_IDS = torch.tensor([CASES["logits"][0]["input_ids"]])  # 9 tokens, no image
META_FILES = ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json")


def logits(model, ids=TEXT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


def copy_meta(folder: Path, source: Path = CHECKPOINT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in META_FILES:
        shutil.copy(source / name, folder / name)
    return folder


def golden_state() -> dict:
    """The golden weights as stored (bf16), read straight from the shards."""
    state = {}
    for shard in sorted(CHECKPOINT.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def write_index(folder: Path, name: str, shards: list[dict], file_pattern: str) -> None:
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = file_pattern.format(i=i, n=len(shards))
        (save_file(shard, folder / file) if file.endswith(".safetensors") else torch.save(shard, folder / file))
        weight_map.update({key: file for key in shard})
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def halves(state: dict) -> list[dict]:
    keys = sorted(state)
    return [{k: state[k] for k in keys[::2]}, {k: state[k] for k in keys[1::2]}]


def write_layout(folder: Path, state: dict, layout: str) -> Path:
    copy_meta(folder)
    if layout == "model.safetensors":
        save_file(state, folder / "model.safetensors")
    elif layout == "sharded safetensors":
        write_index(folder, "model.safetensors.index.json", halves(state), "model-{i:05d}-of-{n:05d}.safetensors")
    elif layout == "pytorch_model.bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout == "legacy pytorch_model.bin":
        torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    elif layout == "sharded bin":
        write_index(folder, "pytorch_model.bin.index.json", halves(state), "pytorch_model-{i:05d}-of-{n:05d}.bin")
    return folder


# ---- dtypes and devices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, dtype, tolerance", [
    (dict(), torch.bfloat16, 0.5),  # config.json says bf16: true
    (dict(torch_dtype="auto"), torch.bfloat16, 0.5),
    (dict(fp32=True), torch.float32, 1e-3),
    (dict(torch_dtype="float16"), torch.float16, 0.2),
    (dict(torch_dtype=torch.float32), torch.float32, 1e-3),
    (dict(bf16=True, torch_dtype="float32"), torch.bfloat16, 0.5),  # an explicit flag wins
], ids=str)
def test_checkpoint_loads_in_each_dtype(model, kwargs, dtype, tolerance):
    loaded = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, device_map="cpu", **kwargs)
    assert loaded.dtype == dtype
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    got, want = logits(loaded), logits(model)
    assert (got - want).abs().max() <= tolerance
    assert torch.equal(got[-1].topk(3).indices, want[-1].topk(3).indices)


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}, None], ids=str)
def test_device_maps(model, device_map):
    loaded = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, fp32=True, device_map=device_map,
                                                        trust_remote_code=True)
    expected = "cuda" if torch.cuda.is_available() and device_map in ("auto", None) else "cpu"
    assert loaded.device.type == expected and {p.device.type for p in loaded.parameters()} == {expected}
    assert not loaded.training
    torch.testing.assert_close(logits(loaded).cpu(), logits(model), atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA"):
        qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, device_map="cuda")


def test_bad_dtype_arguments_are_named():
    with pytest.raises(ValueError, match="'float8'"):
        qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, torch_dtype="float8")
    with pytest.raises(ValueError, match="at most one of bf16"):
        qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, bf16=True, fp32=True)


def test_checkpoint_folder_may_be_a_str_or_path(model):
    loaded = qwenvl.from_pretrained(str(CHECKPOINT), fp32=True, device_map="cpu")
    assert torch.equal(logits(loaded), logits(model))


# ---- layouts and save/reload -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden_fp32_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["model.safetensors", "sharded safetensors", "pytorch_model.bin",
                                    "legacy pytorch_model.bin", "sharded bin"])
def test_weight_layouts_load_identically(model, golden_fp32_state, tmp_path, in_golden, layout):
    folder = write_layout(tmp_path / "ckpt", golden_fp32_state, layout)
    loaded = qwenvl.AutoModelForCausalLM.from_pretrained(folder, fp32=True, device_map="cpu")
    state = loaded.state_dict()
    assert state.keys() == golden_fp32_state.keys()
    assert all(torch.equal(state[k], golden_fp32_state[k]) for k in state)
    image_ids = torch.tensor([CASES["logits"][1]["input_ids"]])
    assert torch.equal(logits(loaded, image_ids)[-8:], logits(model, image_ids)[-8:])


def test_bf16_weights_are_converted_on_load(model, tmp_path):
    folder = write_layout(tmp_path / "ckpt", golden_state(), "model.safetensors")
    loaded = qwenvl.AutoModelForCausalLM.from_pretrained(folder, fp32=True, device_map="cpu")
    assert torch.equal(logits(loaded), logits(model))


def test_extra_buffers_are_ignored(model, golden_fp32_state, tmp_path):
    state = dict(golden_fp32_state)
    state["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(32)
    state["transformer.rotary_emb.inv_freq"] = torch.ones(32)
    folder = write_layout(tmp_path / "ckpt", state, "model.safetensors")
    loaded = qwenvl.AutoModelForCausalLM.from_pretrained(folder, fp32=True, device_map="cpu")
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("max_shard_bytes", [2 << 30, 20 << 20])
def test_save_pretrained_reloads_identically(model, tmp_path, in_golden, max_shard_bytes):
    folder = tmp_path / "saved"
    qwenvl.save_pretrained(model, str(folder), max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if max_shard_bytes == 2 << 30:
        assert shards == ["model.safetensors"]
    else:
        assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    assert not list(folder.glob("*.tmp"))
    config = json.loads((folder / "config.json").read_text())
    original = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["visual"] == original["visual"] and config["seq_length"] == 256
    assert config["auto_map"] == original["auto_map"]  # unknown keys survive the round trip
    loaded = qwenvl.AutoModelForCausalLM.from_pretrained(folder, fp32=True, device_map="cpu")
    assert loaded.generation_config == model.generation_config
    image_ids = torch.tensor([CASES["logits"][2]["input_ids"]])
    assert torch.equal(logits(loaded, image_ids)[-8:], logits(model, image_ids)[-8:])


def test_random_checkpoints_differ_by_seed_and_reload(random_checkpoint):
    first = random_checkpoint("a", seed=0)
    second = random_checkpoint("b", seed=1)
    a = qwenvl.from_pretrained(first, fp32=True, device_map="cpu")
    b = qwenvl.from_pretrained(second, fp32=True, device_map="cpu")
    assert not torch.equal(logits(a), logits(b))
    assert torch.equal(logits(a), logits(qwenvl.from_pretrained(first, fp32=True, device_map="cpu")))
    tokenizer = qwenvl.AutoTokenizer.from_pretrained(first)
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]


# ---- errors -----------------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint folder not found: {tmp_path / 'nope'}"):
        qwenvl.AutoModelForCausalLM.from_pretrained(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path} has no config.json"):
        qwenvl.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("content, message", [
    ('{"model_type": "llama", "hidden_size": 4096}', "not a Qwen-VL config.json"),
    ('[1, 2]', "not a Qwen-VL config.json"),
    ('{"hidden_size": 128, ', "not valid JSON"),
])
def test_bad_config(tmp_path, content, message):
    folder = copy_meta(tmp_path / "ckpt")
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=f"config.json.*{message}|{message}.*config.json"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_bad_generation_config(tmp_path, golden_fp32_state):
    folder = write_layout(tmp_path / "ckpt", golden_fp32_state, "model.safetensors")
    (folder / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json is not valid JSON"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_missing_generation_config_uses_the_chat_defaults(tmp_path, golden_fp32_state):
    folder = write_layout(tmp_path / "ckpt", golden_fp32_state, "model.safetensors")
    (folder / "generation_config.json").unlink()
    loaded = qwenvl.AutoModelForCausalLM.from_pretrained(folder, fp32=True, device_map="cpu")
    assert loaded.generation_config == qwenvl.GenerationConfig()


def test_no_weight_files(tmp_path):
    folder = copy_meta(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=f"no weights in {folder}.*model.safetensors"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_index_with_a_missing_shard(tmp_path, golden_fp32_state):
    folder = write_layout(tmp_path / "ckpt", golden_fp32_state, "sharded safetensors")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-00002.safetensors, which is missing"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_broken_index(tmp_path, golden_fp32_state):
    folder = write_layout(tmp_path / "ckpt", golden_fp32_state, "sharded safetensors")
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a valid shard index"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_missing_tensor(tmp_path, golden_fp32_state):
    state = dict(golden_fp32_state)
    del state["transformer.h.1.mlp.w2.weight"]
    folder = write_layout(tmp_path / "ckpt", state, "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors .*: transformer\.h\.1\.mlp\.w2\.weight$"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_unexpected_tensor(tmp_path, golden_fp32_state):
    state = {**golden_fp32_state, "transformer.h.0.mlp.w3.weight": torch.zeros(2, 2)}
    folder = write_layout(tmp_path / "ckpt", state, "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin has a tensor the model does not know: "
                                              r"transformer\.h\.0\.mlp\.w3\.weight"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_config_with_more_layers_than_the_weights(tmp_path, golden_fp32_state):
    folder = write_layout(tmp_path / "ckpt", golden_fp32_state, "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"lacks \d+ tensors .*transformer\.h\.2\."):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_config_with_another_hidden_size(tmp_path, golden_fp32_state):
    folder = write_layout(tmp_path / "ckpt", golden_fp32_state, "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 256
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \S+ has shape \(\d+, \d+\), config\.json "
                                              r"implies \(\d+, 256\)|model\.safetensors: \S+ has shape"
                                              r"|config\.json: visual\.output_dim 128 must equal hidden_size 256"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("layout, file", [("model.safetensors", "model.safetensors"),
                                          ("pytorch_model.bin", "pytorch_model.bin")])
def test_truncated_weight_file(tmp_path, golden_fp32_state, layout, file):
    folder = write_layout(tmp_path / "ckpt", golden_fp32_state, layout)
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read weight file {folder / file}"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


def test_missing_vocabulary_for_the_tokenizer(tmp_path):
    folder = copy_meta(tmp_path / "ckpt")
    (folder / "qwen.tiktoken").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt/qwen\.tiktoken not found"):
        qwenvl.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@pytest.mark.parametrize("scheme", [{"quant_method": "awq", "bits": 4}, {"quant_method": "gptq", "bits": 3}])
def test_unsupported_quantization_is_refused(tmp_path, scheme):
    folder = copy_meta(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"group_size": 128, "desc_act": False, "sym": True, **scheme}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: quantization .* not supported"):
        qwenvl.AutoModelForCausalLM.from_pretrained(folder)


# ---- the README quickstart ---------------------------------------------------------------------------------

def test_readme_quickstart(in_golden):
    """The original README's chat quickstart with only the import changed (and a local image)."""
    from qwenvl import AutoModelForCausalLM, AutoTokenizer
    from qwenvl import GenerationConfig
    torch.manual_seed(1234)

    checkpoint = str(CHECKPOINT)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu", trust_remote_code=True).eval()
    model.generation_config = GenerationConfig.from_pretrained(checkpoint, trust_remote_code=True)

    query = tokenizer.from_list_format([
        {'image': 'images/shapes_640x480.png'},
        {'text': '这是什么?'},
    ])
    response, history = model.chat(tokenizer, query=query, history=None)
    assert isinstance(response, str)
    response, history = model.chat(tokenizer, '框出图中击掌的位置', history=history)
    assert [q for q, _ in history] == [query, '框出图中击掌的位置'] and history[1][1] == response

    image = tokenizer.draw_bbox_on_latest_picture(response, history)
    assert image is None or image.size == (640, 480)
    boxed = tokenizer.draw_bbox_on_latest_picture('<ref>击掌</ref><box>(100,200),(500,600)</box>', history)
    assert isinstance(boxed, Image.Image) and boxed.size == (640, 480)
    original = Image.open("images/shapes_640x480.png").convert("RGB")
    assert boxed.getpixel((64, 480 * 4 // 10)) != original.getpixel((64, 480 * 4 // 10))  # the left edge
    assert boxed.getpixel((600, 20)) == original.getpixel((600, 20))  # far from the box: untouched


def test_unknown_keyword_is_refused(golden_dir):
    with pytest.raises(TypeError, match="fp23"):
        qwenvl.AutoModelForCausalLM.from_pretrained(golden_dir / "checkpoint", fp23=True)


def test_visual_that_is_not_an_object_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8, "visual": 3}')
    with pytest.raises(qwenvl.CheckpointError, match="visual"):
        qwenvl.AutoModelForCausalLM.from_pretrained(tmp_path)
