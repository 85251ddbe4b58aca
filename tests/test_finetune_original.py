"""`qwenvl finetune` as a user of the original finds it: data files written here by hand in its finetune.py
format, its finetune/*.sh flags, LoRA on a base checkpoint, Ctrl-C and --resume, the saved dtype, tiny data
sets, adapters loaded by from_pretrained, and training state that cannot carry code."""
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import qwenvl
from qwenvl import cli
from qwenvl.train import loop, original_flags
from qwenvl.train.data import load_records
from qwenvl.train.loop import TrainArgs, TrainingInterrupted, TrainStateError, train

from conftest import CHECKPOINT, GOLDEN

PICTURE = GOLDEN / "images" / "shapes_640x480.png"
IDS = torch.tensor([[9707, 11, 1879, 0, 220, 6388]])


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def data_file(tmp_path):
    """finetune.py's format: a JSON list of {"id", "conversations": [{"from": "user"|"assistant", "value"}]}."""
    shutil.copy(PICTURE, tmp_path / "a.png")
    return write(tmp_path / "data.json", [
        {"id": "identity_0", "conversations": [
            {"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat is in the picture?"},
            {"from": "assistant", "value": "Shapes on a white background."}]},
        {"id": "identity_1", "conversations": [
            {"from": "user", "value": "Hello"}, {"from": "assistant", "value": "Hi, how can I help?"},
            {"from": "user", "value": "Nothing."}, {"from": "assistant", "value": "Goodbye."}]},
    ])


def args(data_file, output, **changes):
    base = dict(model=str(CHECKPOINT), data=str(data_file), output=str(output), batch_size=1, max_steps=2, lr=5e-3,
                warmup_ratio=0.0, precision="fp32", num_workers=0)
    base.update(changes)
    return TrainArgs(**base)


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


# ---- 6. every data problem, with id and position ----------------------------------------------------------


def test_every_data_problem_is_printed_with_id_and_position(tmp_path, capsys):
    records = [
        {"id": "ok", "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}]},
        {"id": "robot", "conversations": [{"from": "robot", "value": "beep"}, {"from": "assistant", "value": "?"}]},
        {"id": "lonely", "conversations": [{"from": "user", "value": "anyone?"}]},
        {"id": "no-picture", "conversations": [{"from": "user", "value": "<img>gone.jpg</img> what?"},
                                               {"from": "assistant", "value": "nothing"}]},
        {"id": "open-tag", "conversations": [{"from": "user", "value": "<ref>a dog"},
                                             {"from": "assistant", "value": "yes"}]},
        {"id": "empty", "conversations": []},
        {"conversations": [{"from": "user", "value": "q"}, {"from": "user", "value": "q again"},
                           {"from": "assistant", "value": "a"}]},
        {"id": 7, "conversations": [{"from": "user", "value": 5}, {"from": "assistant"}]},
    ]
    data = write(tmp_path / "train.json", records)
    code = cli.main(["finetune", "-m", str(CHECKPOINT), "--data", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists()
    listed = [line.strip() for line in err.splitlines() if line.strip().startswith("record ")]
    assert len(listed) == 8 and "8 problems" in err.splitlines()[0]
    for position, marker in [(1, "'robot'): turn 0: unknown role 'robot'"), (2, "'lonely'): ends with a user turn"),
                             (3, "'no-picture'): turn 0: image file not found"), (4, "'open-tag'): turn 0"),
                             (5, "'empty'): 'conversations' is empty"), (6, "None): turn 1: two user turns"),
                             (7, "7): turn 0: 'value' is a int")]:
        assert any(line.startswith(f"record {position} (id ") and marker in line for line in listed), marker
    assert any(line.startswith("record 7 (id 7): turn 1 has no 'value'") for line in listed)


# ---- 7. image paths: the working folder first, then the data file's folder ----------------------------------


def test_image_paths_try_the_working_folder_then_the_data_folder(tmp_path, monkeypatch, capsys):
    work, data_dir = tmp_path / "work", tmp_path / "data"
    (work / "pics").mkdir(parents=True)
    (data_dir / "pics").mkdir(parents=True)
    shutil.copy(PICTURE, work / "pics" / "both.png")
    shutil.copy(GOLDEN / "images" / "gray_37x23.png", data_dir / "pics" / "both.png")  # another file, same name
    shutil.copy(PICTURE, work / "pics" / "cwd_only.png")
    shutil.copy(PICTURE, data_dir / "pics" / "data_only.png")
    shutil.copy(PICTURE, data_dir / "shared.png")
    os.symlink(data_dir / "shared.png", work / "shared.png")  # one file under both names: nothing to say
    monkeypatch.chdir(work)
    value = "<img>pics/both.png</img><img>pics/cwd_only.png</img><img>pics/data_only.png</img><img>shared.png</img>"
    data = write(data_dir / "train.json", [{"id": "x", "conversations": [
        {"from": "user", "value": value}, {"from": "assistant", "value": "ok"}]}])
    (record,) = load_records(data)
    assert record["conversations"][0]["value"] == (
        f"<img>{work / 'pics' / 'both.png'}</img><img>{work / 'pics' / 'cwd_only.png'}</img>"
        f"<img>{data_dir / 'pics' / 'data_only.png'}</img><img>{work / 'shared.png'}</img>")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 image path(s) name a file both in the working folder and beside the data file" in err[0]
    assert f"record 0 (id 'x'): pics/both.png -> {work / 'pics' / 'both.png'}, not {data_dir / 'pics' / 'both.png'}" in err[0]


# ---- 8. LoRA on a base checkpoint trains wte and lm_head too ------------------------------------------------


def test_lora_on_a_base_checkpoint_trains_the_embeddings_and_merge_keeps_them(data_file, tmp_path, capsys):
    base = qwenvl.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu")
    result = train(args(data_file, tmp_path / "out", lora=True, train=(), lora_r=4, lr=1e-2))
    assert "LoRA on a base checkpoint: wte and lm_head train in full too" in capsys.readouterr().err
    trained = result["model"]
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)
    assert not torch.equal(trained.transformer.wte.weight, base.transformer.wte.weight)
    adapter = tmp_path / "out" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["wte", "lm_head"]
    saved = load_file(adapter / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.lm_head.weight"], trained.lm_head.weight)
    assert torch.equal(saved["base_model.model.transformer.wte.weight"], trained.transformer.wte.weight)
    assert not (adapter / "trained_weights.safetensors").exists()
    # merge includes them, and from_pretrained(base, adapter=DIR) gives the same model (10: the adapter loads)
    assert cli.main(["merge", "--base", str(CHECKPOINT), "--adapter", str(adapter), "--out", str(tmp_path / "m"),
                     "--dtype", "fp32"]) == 0
    merged = qwenvl.from_pretrained(tmp_path / "m", fp32=True, device_map="cpu")
    assert torch.equal(merged.lm_head.weight, trained.lm_head.weight)
    attached = qwenvl.from_pretrained(CHECKPOINT, fp32=True, device_map="cpu", adapter=str(adapter))
    assert not any("lora" in name for name, _ in attached.named_parameters())  # merged: the plain model
    expected = logits(trained)
    torch.testing.assert_close(logits(merged), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(attached), expected, atol=1e-4, rtol=1e-4)


def test_lora_embeddings_off_by_flag_and_for_chat_checkpoints(data_file, tmp_path):
    train(args(data_file, tmp_path / "off", lora=True, train=(), lora_r=4, max_steps=1, lora_embeddings=False))
    chat = tmp_path / "Qwen-VL-Chat-small"
    os.symlink(CHECKPOINT, chat)  # the original tells a chat checkpoint by its name
    train(args(data_file, tmp_path / "chat", model=str(chat), lora=True, train=(), lora_r=4, max_steps=1))
    for run in ("off", "chat"):
        adapter = tmp_path / run / "adapter"
        assert json.loads((adapter / "adapter_config.json").read_text()).get("modules_to_save") is None
        assert all(".lora_" in key for key in load_file(adapter / "adapter_model.safetensors"))


# ---- 9. the original's launch form ----------------------------------------------------------------------------


def test_the_original_sh_flags_run_and_say_what_they_became(data_file, tmp_path, capsys):
    ds = tmp_path / "ds_config_zero2.json"  # finetune/ds_config_zero2.json, the parts that matter
    ds.write_text(json.dumps({"bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}))
    out = tmp_path / "output_qwen"
    # finetune/finetune_lora_ds.sh, shortened to two steps
    code = cli.main(["finetune", "--model_name_or_path", str(CHECKPOINT), "--data_path", str(data_file),
                     "--bf16", "True", "--fix_vit", "True", "--output_dir", str(out), "--num_train_epochs", "5",
                     "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
                     "--gradient_accumulation_steps", "2", "--evaluation_strategy", "no", "--save_strategy", "steps",
                     "--save_steps", "1000", "--save_total_limit", "10", "--learning_rate", "1e-5",
                     "--weight_decay", "0.1", "--adam_beta2", "0.95", "--warmup_ratio", "0.01",
                     "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--report_to", "none",
                     "--model_max_length", "512", "--lazy_preprocess", "True", "--use_lora", "--lora_r", "4",
                     "--gradient_checkpointing", "--deepspeed", str(ds), "--max_steps", "1", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    notes = [line for line in err.splitlines() if line.startswith("original flag: ")]
    assert any(f"--deepspeed {ds} (ZeRO-2) -> --sharding grad-op" in n for n in notes)
    assert any("--fix_vit has no effect with --use_lora" in n for n in notes)
    assert any("--bf16 True -> --precision bf16" in n for n in notes)
    assert any("--save_total_limit 10: one resumable state is kept" in n for n in notes)
    assert any("--per_device_eval_batch_size 1" in n for n in notes)
    assert not any("learning_rate" in n or "model_max_length" in n for n in notes)  # plain renames pass silently
    saved = json.loads((out / "train_args.json").read_text())
    assert (saved["lr"], saved["max_len"], saved["grad_accum"], saved["batch_size"], saved["epochs"]) == \
        (1e-5, 512, 2, 1, 5.0)
    assert (saved["lora"], saved["lora_r"], saved["precision"], saved["sharding"], saved["betas"]) == \
        (True, 4, "bf16", "grad-op", [0.9, 0.95])
    assert saved["gradient_checkpointing"] and saved["save_every"] == 1000 and saved["max_steps"] == 1
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def parse(*argv):
    parsed = cli.build_parser().parse_args(["finetune", *argv])
    return parsed, original_flags.apply(parsed)


def test_full_fine_tune_flags_map_to_the_native_options(tmp_path):
    ds = tmp_path / "ds_config_zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    parsed, notes = parse("--model_name_or_path", str(CHECKPOINT), "--data_path", "d.json", "--output_dir", "o",
                          "--fix_vit", "False", "--deepspeed", str(ds), "--max_steps", "-1", "--fp16", "True",
                          "--lora_target_modules", "c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj")
    assert (parsed.model, parsed.data, parsed.output) == (str(CHECKPOINT), "d.json", "o")
    assert parsed.train == "vit,resampler,llm" and parsed.max_steps is None and parsed.precision == "fp16"
    assert parsed.sharding == "full" and parsed.lora_extra == "mlp.c_proj"
    assert any("(ZeRO-3) -> --sharding full" in n and "offload_param is not done" in n for n in notes)
    assert any("--fix_vit False -> --train vit,resampler,llm" in n for n in notes)
    parsed, _ = parse("--fix_vit", "True")
    assert parsed.train == "resampler,llm"


@pytest.mark.parametrize("argv, message", [
    (["--lr_scheduler_type", "linear"], "--lr_scheduler_type linear is not available; .*nearest: --warmup-ratio"),
    (["--cache_dir", "/tmp/hf"], "--cache_dir has no meaning in qwenvl finetune; nearest: -m/--model"),
    (["--warmup_steps", "10"], "--warmup_steps has no meaning .*nearest: --warmup-ratio"),
    (["--report_to", "wandb"], "--report_to wandb is not available; .*nearest: --log-every"),
    (["--save_strategy", "epoch"], "--save_strategy epoch is not available; nearest: --save-every"),
    (["--use_lora", "--q_lora"], "--q_lora trains LoRA over an Int4 checkpoint .* drop --q_lora"),
    (["--lora_target_modules", "c_attn"], "without attn.c_proj, w1, w2.*nearest: --lora-extra"),
    (["--deepspeed", "missing.json"], "--deepspeed missing.json: cannot read it"),
])
def test_flags_with_no_meaning_here_are_refused_by_name(argv, message, capsys):
    with pytest.raises(original_flags.FlagError, match=message):
        parse("--model_name_or_path", str(CHECKPOINT), *argv)
    assert cli.main(["finetune", "--model_name_or_path", str(CHECKPOINT), "--data_path", "d.json", "--output_dir",
                     "o", *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_finetune_without_a_model_says_which_flag(capsys):
    assert cli.main(["finetune", "--data_path", "d.json", "--output_dir", "o"]) == 2
    assert "needs -m/--model (or --model_name_or_path)" in capsys.readouterr().err


# ---- 10. interrupting, resuming, the saved dtype, tiny data, adapters ----------------------------------------


def test_ctrl_c_during_a_save_keeps_the_previous_state(data_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    calls = []
    real = loop.rng_state

    def interrupted_second_save():
        calls.append(1)
        if len(calls) == 2:  # while the step-4 state is being written, after its model and optimizer
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(loop, "rng_state", interrupted_second_save)
    argv = ["finetune", "-m", str(CHECKPOINT), "--data", str(data_file), "--output", str(out), "--max-steps", "6",
            "--save-every", "2", "--lr", "5e-3", "--warmup-ratio", "0", "--precision", "fp32", "--num-workers", "0",
            "--train", "llm"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"qwenvl finetune: interrupted; {out / 'train_state'} holds step 2: run again with --resume " \
                      "to continue from there"
    assert not any("Traceback" in line for line in err)
    assert sorted(os.listdir(out)) == ["train_state"]  # no train_state.tmp
    assert loop.read_plain(str(out / "train_state" / "trainer.pt"))["step"] == 2
    monkeypatch.setattr(loop, "rng_state", real)
    assert cli.main(argv + ["--resume"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_during_the_swap_finishes_it_first(data_file, tmp_path, monkeypatch):
    replaced = []
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("train_state") and not replaced:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C between the two renames of the swap
        replaced.append(dst)
        real(src, dst)

    monkeypatch.setattr(loop.os, "replace", replace)
    with pytest.raises(TrainingInterrupted, match="holds step 1: run again with --resume"):
        train(args(data_file, tmp_path / "out", max_steps=3, save_every=1, train=("llm",)))
    state = tmp_path / "out" / "train_state"
    assert sorted(os.listdir(tmp_path / "out")) == ["train_state"]
    assert {"trainer.pt", "rng-0.pt", ".metadata"} <= set(os.listdir(state))


def test_resume_with_nothing_saved_says_so(data_file, tmp_path, capsys):
    (tmp_path / "out" / "train_state.tmp").mkdir(parents=True)  # what an interrupted save used to leave
    assert cli.main(["finetune", "-m", str(CHECKPOINT), "--data", str(data_file), "--output", str(tmp_path / "out"),
                     "--resume", "--max-steps", "1", "--num-workers", "0", "--precision", "fp32", "--train", "llm"]) == 0
    err = capsys.readouterr().err
    assert f"--resume: nothing saved to resume from ({tmp_path / 'out' / 'train_state'} does not exist); " \
           "starting at step 1" in err
    assert [r["step"] for r in json.loads((tmp_path / "out" / "history.json").read_text())] == [1]
    assert not (tmp_path / "out" / "train_state.tmp").exists()


def test_a_state_saved_before_this_version_still_resumes(data_file, tmp_path):
    """rng-0.pt once held Python's and numpy's generator states as they are (tuples, a numpy array)."""
    import random

    import numpy as np
    out = tmp_path / "out"
    train(args(data_file, out, max_steps=1, save_every=1, train=("llm",)))
    old = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(old, out / "train_state" / "rng-0.pt")
    history = train(args(data_file, out, max_steps=2, save_every=1, train=("llm",), resume=True))["history"]
    assert [r["step"] for r in history] == [1, 2]


def test_the_final_step_is_saved_and_the_model_has_its_declared_dtype(data_file, tmp_path):
    result = train(args(data_file, tmp_path / "out", max_steps=3, save_every=2, train=("llm",)))
    assert loop.read_plain(str(tmp_path / "out" / "train_state" / "trainer.pt"))["step"] == 3
    with safe_open(tmp_path / "out" / "model" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16  # the golden config.json says bf16
        assert torch.equal(f.get_tensor("lm_head.weight"), result["model"].lm_head.weight.detach().bfloat16())
    train(args(data_file, tmp_path / "fp32", max_steps=1, train=("llm",), save_dtype="fp32"))
    with safe_open(tmp_path / "fp32" / "model" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.float32


def test_grad_accum_larger_than_the_data_takes_the_whole_epoch_per_step(data_file, tmp_path, capsys):
    big = train(args(data_file, tmp_path / "big", grad_accum=8, epochs=2, max_steps=None, train=("llm",)))["history"]
    assert "2 samples are fewer than one global batch (8)" in capsys.readouterr().err
    exact = train(args(data_file, tmp_path / "two", grad_accum=2, epochs=2, max_steps=None, train=("llm",)))["history"]
    assert len(big) == len(exact) == 2  # one optimizer step per epoch, as the HF Trainer
    assert [r["tokens"] for r in big] == [r["tokens"] for r in exact]
    for a, b in zip(big, exact):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


# ---- 16. training state cannot carry code ----------------------------------------------------------------------


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted", ["trainer.pt", "rng-0.pt", ".metadata"])
def test_a_planted_pickle_in_the_state_is_refused_unrun(data_file, tmp_path, planted, capsys):
    out = tmp_path / "out"
    train(args(data_file, out, max_steps=1, save_every=1, train=("llm",)))
    marker = tmp_path / "ran"
    target = out / "train_state" / planted
    if planted == ".metadata":
        import pickle
        target.write_bytes(pickle.dumps(RunsACommand(marker)))
    else:
        torch.save(RunsACommand(marker), target)
    with pytest.raises(TrainStateError, match=f"{planted}.*refused without running"):
        train(args(data_file, out, max_steps=2, save_every=1, train=("llm",), resume=True))
    assert not marker.exists()
    assert cli.main(["finetune", "-m", str(CHECKPOINT), "--data", str(data_file), "--output", str(out),
                     "--max-steps", "2", "--resume", "--num-workers", "0", "--precision", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "refused without running" in err[-1] and not marker.exists()
