"""The fine-tuning loop end to end on the golden tiny checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import qwenvl
from qwenvl import cli
from qwenvl.train.data import DataError
from qwenvl.train import loop
from qwenvl.train.loop import TrainArgs, train

from conftest import CHECKPOINT, GOLDEN

RECORDS = [
    {"id": "img", "conversations": [
        {"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat colour is the square?"},
        {"from": "assistant", "value": "The square is red."}]},
    {"id": "txt", "conversations": [
        {"from": "user", "value": "Say hello."}, {"from": "assistant", "value": "Hello there!"}]},
]


@pytest.fixture
def data_file(tmp_path):
    shutil.copy(GOLDEN / "images" / "shapes_640x480.png", tmp_path / "a.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def args(data_file, output, **changes):
    base = dict(model=str(CHECKPOINT), data=str(data_file), output=str(output), batch_size=2, max_steps=4,
                lr=5e-3, warmup_ratio=0.0, precision="fp32", num_workers=0, train=("resampler", "llm"))
    base.update(changes)
    return TrainArgs(**base)


def test_loss_falls_and_the_answer_is_memorized(data_file, tmp_path):
    # measured: 50 steps at this rate bring the loss to 4e-4 of the first and both answers out exactly; 40 do not
    result = train(args(data_file, tmp_path / "out", max_steps=55, lr=1e-2, train=("llm",), num_workers=1))
    losses = [r["loss"] for r in result["history"]]
    assert losses[-1] < losses[0] / 100
    folder = tmp_path / "out" / "model"
    tokenizer = qwenvl.AutoTokenizer.from_pretrained(folder)
    model = qwenvl.AutoModelForCausalLM.from_pretrained(folder, fp32=True, device_map="cpu")
    image = str(tmp_path / "a.png")
    query = f"Picture 1: <img>{image}</img>\nWhat colour is the square?"
    assert model.chat(tokenizer, query, history=None, do_sample=False, max_new_tokens=12)[0] == "The square is red."
    assert model.chat(tokenizer, "Say hello.", history=None, do_sample=False, max_new_tokens=12)[0] == "Hello there!"


def test_saved_checkpoint_reloads_to_identical_logits(data_file, tmp_path):
    result = train(args(data_file, tmp_path / "out", max_steps=2, save_dtype="fp32"))  # default: config.json's bf16
    trained = result["model"].eval()
    reloaded = qwenvl.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model", fp32=True, device_map="cpu")
    ids = torch.tensor([[9707, 11, 1879, 0, 220, 6388]])
    with torch.no_grad():
        assert torch.equal(trained(ids).logits, reloaded(ids).logits)
    expected = {"config.json", "generation_config.json", "model.safetensors", "qwen.tiktoken", "tokenizer_config.json"}
    assert set(os.listdir(tmp_path / "out" / "model")) == expected


def test_resume_gives_the_identical_next_losses(data_file, tmp_path, monkeypatch):
    straight = train(args(data_file, tmp_path / "a", max_steps=6, batch_size=1, save_every=3))["history"]
    # a second run is cut by Ctrl-C in step 4, after the state of step 3 was saved; then it resumes
    calls, forward = [], loop.forward_loss

    def interrupted_in_step_4(*a, **k):  # one forward per step here
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward(*a, **k)

    monkeypatch.setattr(loop, "forward_loss", interrupted_in_step_4)
    with pytest.raises(KeyboardInterrupt, match="holds step 3"):
        train(args(data_file, tmp_path / "b", max_steps=6, batch_size=1, save_every=3))
    monkeypatch.setattr(loop, "forward_loss", forward)
    assert not (tmp_path / "b" / "model").exists()
    resumed = train(args(data_file, tmp_path / "b", max_steps=6, batch_size=1, save_every=3, resume=True))["history"]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight[3:], resumed[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_two_processes_match_one(data_file, tmp_path):
    one = train(args(data_file, tmp_path / "one", max_steps=3, batch_size=2))["history"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qwenvl.cli",
               "finetune", "-m", str(CHECKPOINT), "--data", str(data_file), "--output", str(tmp_path / "two"),
               "--batch-size", "1", "--max-steps", "3", "--lr", "5e-3", "--warmup-ratio", "0", "--precision", "fp32",
               "--num-workers", "0", "--train", "resampler,llm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    reloaded = qwenvl.AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model", fp32=True, device_map="cpu")
    assert reloaded.lm_head.weight.shape[0] == 151936  # rank 0 wrote the full, gathered weights


def test_lora_run_saves_an_adapter_that_merges(data_file, tmp_path, capsys):
    result = train(args(data_file, tmp_path / "out", lora=True, train=(), lora_r=4, max_steps=3, lr=1e-2))
    adapter = tmp_path / "out" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and not (tmp_path / "out" / "model").exists()
    assert cli.main(["merge", "--base", str(CHECKPOINT), "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    merged = qwenvl.AutoModelForCausalLM.from_pretrained(tmp_path / "m", fp32=True, device_map="cpu")
    ids = torch.tensor([[9707, 11, 1879, 0, 220, 6388]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, result["model"].eval()(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite(data_file, tmp_path, precision):
    history = train(args(data_file, tmp_path / "out", max_steps=2, precision=precision))["history"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in history)


def test_gradient_checkpointing_gives_the_same_losses(data_file, tmp_path):
    plain = train(args(data_file, tmp_path / "a", max_steps=2))["history"]
    checkpointed = train(args(data_file, tmp_path / "b", max_steps=2, gradient_checkpointing=True))["history"]
    for a, b in zip(plain, checkpointed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_eval_loss_is_logged(data_file, tmp_path):
    history = train(args(data_file, tmp_path / "out", max_steps=2, eval_data=str(data_file), eval_every=1))["history"]
    assert all(r["eval_loss"] > 0 for r in history)
    assert history[1]["eval_loss"] < history[0]["eval_loss"]  # trained on the same samples


def test_bad_data_is_reported_before_training(tmp_path, capsys):
    bad = [{"id": "x", "conversations": [{"from": "robot", "value": "hi"}]},
           {"id": "y", "conversations": [{"from": "user", "value": "<img>missing.png</img> what?"},
                                         {"from": "assistant", "value": "no"}]}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError) as error:
        train(args(path, tmp_path / "out"))
    assert "'x'" in str(error.value) and "'y'" in str(error.value) and "missing.png" in str(error.value)
    code = cli.main(["finetune", "-m", str(CHECKPOINT), "--data", str(path), "--output", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "o").exists()


def test_packed_run_equals_the_padded_run(data_file, tmp_path):
    padded = train(args(data_file, tmp_path / "a", max_steps=1, batch_size=2))["history"]
    packed = train(args(data_file, tmp_path / "b", max_steps=1, batch_size=1, pack=True, max_len=1024))["history"]
    assert packed[0]["tokens"] == padded[0]["tokens"]  # both samples in one row, nothing learned across them
    assert packed[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-5)


def test_stage_1_trains_vision_at_224_with_the_llm_frozen(data_file, tmp_path):
    base = qwenvl.AutoModelForCausalLM.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu")
    result = train(args(data_file, tmp_path / "out", max_steps=2, stage=1, train=()))
    trained = result["model"]
    assert trained.config.visual.image_size == 224
    assert torch.equal(trained.transformer.h[0].mlp.w1.weight, base.transformer.h[0].mlp.w1.weight)
    assert torch.equal(trained.lm_head.weight, base.lm_head.weight)
    assert not torch.equal(trained.transformer.visual.conv1.weight, base.transformer.visual.conv1.weight)
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["visual"]["image_size"] == 224
