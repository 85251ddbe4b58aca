"""Shared fixtures: the golden checkpoint (loaded once, fp32, CPU) and small random checkpoints in tmp dirs."""
import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import qwenvl
from qwenvl.bench import random_config, random_model

GOLDEN = Path(__file__).parent / "data" / "golden"
CHECKPOINT = GOLDEN / "checkpoint"
TOKENIZER_FILES = ("qwen.tiktoken", "tokenizer_config.json")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def model_cases() -> dict:
    return json.loads((GOLDEN / "model_cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def expected() -> dict:
    with np.load(GOLDEN / "expected.npz") as arrays:
        return {name: arrays[name] for name in arrays.files}


@pytest.fixture(scope="session")
def tokenizer():
    return qwenvl.AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="session")
def model():
    torch.manual_seed(0)
    return qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu")


@pytest.fixture
def in_golden(monkeypatch) -> Path:
    """Run the test with the golden folder as working directory: the cases' image paths are relative to it."""
    monkeypatch.chdir(GOLDEN)
    return GOLDEN


def make_checkpoint(folder: Path, seed: int = 0, max_shard_bytes: int = 2 << 30, **config_changes) -> Path:
    """A random tiny Qwen-VL checkpoint (the golden shape), fp32 safetensors, with the golden tokenizer files."""
    config = random_config("tiny")
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = random_model(config, torch.float32, torch.device("cpu"), seed=seed)
    qwenvl.save_pretrained(model, str(folder), max_shard_bytes=max_shard_bytes)
    for name in TOKENIZER_FILES:
        shutil.copy(CHECKPOINT / name, folder / name)
    return folder


@pytest.fixture
def random_checkpoint(tmp_path):
    """Factory: random_checkpoint(name="ckpt", seed=0, **config_changes) -> folder."""
    return lambda name="ckpt", **kwargs: make_checkpoint(tmp_path / name, **kwargs)


@pytest.fixture(scope="session")
def image_server():
    """An http server on 127.0.0.1 serving the golden folder; yields its base URL."""
    handler = partial(_QuietHandler, directory=str(GOLDEN))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


def float_twin(quantized):
    """The float model with a quantized model's dequantized decoder weights: the same function in float."""
    from qwenvl.model.quant import QuantLinear
    twin = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu")
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear):
            target = twin.get_submodule(name)
            target.weight.data = module.dequantize(torch.float32)
            if target.bias is not None:
                target.bias.data = module.bias.float()
    return twin
