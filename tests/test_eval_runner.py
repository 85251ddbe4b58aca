"""`qwenvl eval`: every benchmark's reader, prompt and scorer end to end on synthetic files in its format,
resume, batch and process invariance, the compat scorer's quirks, and bad inputs."""
import base64
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import qwenvl
from qwenvl import cli
from qwenvl.data import bench, synth
from qwenvl.eval import runner, tasks as T
from qwenvl.eval.runner import EvalArgs, evaluate

from conftest import make_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if "en" not in synth.fonts():
        pytest.skip("no TrueType font for the words in the pictures")
    out = tmp_path_factory.mktemp("bench")
    return out, bench.generate(out, n=4, seed=0, image_size=112)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # a random checkpoint: the golden one has identical lm_head rows for most ids, so options would tie
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", seed=3)


def run(task, ckpt, files, out, **kwargs):
    argv = files[1][task].split()
    options = dict(zip([a.lstrip("-").replace("-", "_") for a in argv[::2]], argv[1::2]))
    options.update(kwargs)
    options.setdefault("progress", False)
    return evaluate(EvalArgs(task=task, model=str(ckpt), out=str(out), **options))


def predictions(out):
    return [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"), encoding="utf-8")]


@pytest.mark.parametrize("task", bench.BENCHMARKS)
def test_every_benchmark_runs_and_scores(task, ckpt, files, tmp_path):
    # a random model never stops: 8 new tokens keep MME's 24 answers (512 tokens by its protocol) quick
    result = run(task, ckpt, files, tmp_path / "out", batch_size=3, max_new_tokens=8)
    assert result["task"] == task and result["scorer"] == "fixed"
    value = result[result["metric"]]
    assert (0.0 <= value <= 2 * 100 * 14) if task == "mme" else (0.0 <= value <= 10.0)
    rows = predictions(tmp_path / "out")
    expected = 4 * (4 if task == "mmbench" else 6 if task == "mme" else 1)
    assert len(rows) == result["count"] == expected
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())[result["metric"]] == value
    assert json.loads((tmp_path / "out" / runner.RUN_FILE).read_text())["settings"]["max_new_tokens"] == 8


def test_a_model_that_answers_right_scores_full_marks(ckpt, files, tmp_path, monkeypatch):
    """The scorers agree with the synthetic files' answers: feed the right answers as predictions."""
    folder = files[0]
    truth = {str(r["question_id"]): r["answer"] for r in T.read_jsonl(folder / "gqa" / "val.jsonl")}
    monkeypatch.setitem(runner.PREDICT, "generate", lambda m, t, task, batch: [truth[it.key] for it in batch])
    assert run("gqa", ckpt, files, tmp_path / "gqa")["accuracy"] == 1.0
    boxes = {str(r["id"]): r["bbox"] for r in T.read_jsonl(folder / "refcoco" / "val.jsonl")}
    as_text = lambda b: f"({round(b[0] / 112 * 1000)},{round(b[1] / 112 * 1000)}),({round(b[2] / 112 * 1000)},{round(b[3] / 112 * 1000)})</box>"
    monkeypatch.setitem(runner.PREDICT, "generate", lambda m, t, task, batch: [as_text(boxes[it.key]) for it in batch])
    assert run("refcoco", ckpt, files, tmp_path / "ref")["accuracy"] == 1.0


def test_option_scoring_matches_the_originals_full_logits(ckpt, files):
    """predict_choice (lm_head on the option tokens only) == the original's cross-entropy over all logits."""
    model = qwenvl.from_pretrained(str(ckpt), fp32=True, device_map="cpu")
    tokenizer = qwenvl.QWenTokenizer.from_pretrained(str(ckpt))
    task = T.TASKS["scienceqa_img"]
    items = T.load_items(task, str(files[0] / "scienceqa_img" / "test.jsonl"),
                         T.Images(str(files[0] / "scienceqa_img"), "."))[:2]
    got = runner.predict_choice(model, tokenizer, task, items)
    rows = [tokenizer.encode(it.prompt) + tokenizer.encode(" " + l) for it in items for l in "ABCD"[:it.options]]
    ids, mask = runner.left_pad(rows, tokenizer.eod_id)
    with torch.no_grad():
        logits = model(ids[:, :-1], attention_mask=mask[:, :-1]).logits
    losses = F.cross_entropy(logits.permute(0, 2, 1), ids[:, 1:], reduction="none")[:, -1]
    flat = [loss for r in got for loss in r["losses"]]
    assert flat == pytest.approx(losses.tolist(), rel=1e-4)
    assert len(set(flat)) == len(flat)  # a random model really ranks the options
    assert [r["choice"] for r in got] == [int(torch.argmin(losses[4 * i:4 * i + 4])) for i in range(2)]


@pytest.mark.parametrize("task", ["vqav2", "mmbench", "refcoco"])
def test_batch_size_does_not_change_predictions(task, ckpt, files, tmp_path):
    run(task, ckpt, files, tmp_path / "b1", batch_size=1)
    run(task, ckpt, files, tmp_path / "b4", batch_size=4)
    one, four = predictions(tmp_path / "b1"), predictions(tmp_path / "b4")
    if task == "mmbench":
        assert [r["prediction"]["choice"] for r in one] == [r["prediction"]["choice"] for r in four]
        for a, b in zip(one, four):
            assert a["prediction"]["losses"] == pytest.approx(b["prediction"]["losses"], rel=1e-4)
    else:
        assert one == four


def test_an_interrupted_run_resumes_without_redoing_items(ckpt, files, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run("vqav2", ckpt, files, out, batch_size=2)
    complete = predictions(out)
    part = out / "predictions.rank0.jsonl"
    lines = part.read_text(encoding="utf-8").splitlines(keepends=True)
    part.write_text("".join(lines[:2]) + lines[2][:10], encoding="utf-8")  # killed while writing item 3
    calls = []
    original = runner.PREDICT["generate"]
    monkeypatch.setitem(runner.PREDICT, "generate", lambda *a: calls.append(len(a[3])) or original(*a))
    second = run("vqav2", ckpt, files, out, batch_size=2)
    assert calls == [2]  # only the two unfinished items ran again
    assert predictions(out) == complete and second == first


def test_reusing_an_output_folder_for_another_run_is_refused(ckpt, files, tmp_path):
    run("gqa", ckpt, files, tmp_path / "out", limit=2)
    with pytest.raises(ValueError, match="different run.*items"):
        run("gqa", ckpt, files, tmp_path / "out", limit=3)
    run("gqa", ckpt, files, tmp_path / "out", limit=2, scorer="compat")  # rescoring the same run is fine


def test_two_processes_give_the_same_predictions_as_one(ckpt, files, tmp_path):
    for task in ("vqav2", "mmbench"):
        run(task, ckpt, files, tmp_path / f"one-{task}", batch_size=2)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qwenvl.cli",
                   "eval", task, "-m", str(ckpt), *files[1][task].split(), "--batch-size", "2",
                   "--out", str(tmp_path / f"two-{task}")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(list((tmp_path / f"two-{task}").glob("predictions.rank*.jsonl"))) == 2
        one, two = predictions(tmp_path / f"one-{task}"), predictions(tmp_path / f"two-{task}")
        if task == "mmbench":
            one = [(r["key"], r["prediction"]["choice"]) for r in one]
            two = [(r["key"], r["prediction"]["choice"]) for r in two]
        assert one == two
        metrics = [json.loads((tmp_path / f"{n}-{task}" / "metrics.json").read_text()) for n in ("one", "two")]
        for m, n in zip(metrics, ("one", "two")):  # each run names its own submission file
            assert m.pop("submission", str(tmp_path / f"{n}-{task}" / "x")).startswith(str(tmp_path / f"{n}-{task}"))
        assert metrics[0] == metrics[1]


# ---- the compat scorer -----------------------------------------------------------------------------


def test_shards_are_contiguous_like_the_originals_sampler():
    assert [list(runner.shard(7, 3, r)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]


def test_compat_grounding_drops_each_ranks_last_incomplete_batch():
    keys = [str(i) for i in range(7)]
    assert runner.compat_dropped(keys, 1, 3) == {"6"}
    assert runner.compat_dropped(keys, 2, 3) == {"3"}  # slices 0-3 (one batch of 3 + "3") and 4-6
    assert runner.compat_dropped(keys, 3, 2) == {"2"}  # slices 0-2, 3-4, 5-6
    assert runner.compat_dropped(keys, 1, 1) == set()


def test_compat_and_fixed_scores_differ_where_the_original_erred():
    task = T.TASKS["chartqa"]
    items = [T.Item("0", "", {"answers": "100"})]
    # 104 vs target 100: 4 % off target; relative to the prediction 100 / 104 is 3.8 % off, so both pass ...
    assert T.score(task, items, {"0": "104"}, compat=False)["relaxed_accuracy"] == 1.0
    # ... 95.1 is 4.9 % below 100 (fixed passes) but 5.15 % relative to itself (the original fails it)
    assert T.score(task, items, {"0": "95.1"}, compat=False)["relaxed_accuracy"] == 1.0
    assert T.score(task, items, {"0": "95.1"}, compat=True)["relaxed_accuracy"] == 0.0
    grounding = T.TASKS["refcoco"]
    items = [T.Item("0", "", {"bbox": [0, 0, 500, 500], "width": 1000, "height": 1000})]
    assert T.score(grounding, items, {"0": "(0,0),(500,500)"}, compat=False)["accuracy"] == 1.0
    assert T.score(grounding, items, {"0": "(0,0),(500,500)"}, compat=True)["accuracy"] == 1.0  # /999: IoU .998
    assert T.score(grounding, items, {"0": "no box"}, compat=False)["accuracy"] == 0.0


def test_mmbench_compat_is_the_majority_vote_and_fixed_is_circular():
    task = T.TASKS["mmbench"]
    choices = [["cat", "dog"], ["dog", "cat"], ["cat", "dog"], ["dog", "cat"]]
    items = [T.Item(str(k), "", {"index": 0, "rotation": k, "choices": c, "answer": c.index("cat")}, options=2)
             for k, c in enumerate(choices)]
    # three rotations pick "cat", one picks "dog": circular fails, the vote passes
    picks = {"0": 0, "1": 1, "2": 0, "3": 0}
    preds = {k: {"choice": v} for k, v in picks.items()}
    assert T.score(task, items, preds, compat=False)["accuracy"] == 0.0
    assert T.score(task, items, preds, compat=True)["accuracy"] == 1.0
    # a 2-2 tie is broken at random, seeded: the same seed gives the same answer
    tie = {k: {"choice": v} for k, v in {"0": 0, "1": 1, "2": 1, "3": 0}.items()}
    results = {T.score(task, items, tie, compat=True, seed=s)["accuracy"] for s in range(20)}
    assert results == {0.0, 1.0}
    assert T.score(task, items, tie, compat=True, seed=5) == T.score(task, items, tie, compat=True, seed=5)


def test_few_shot_fixed_never_shows_an_item_its_own_image():
    task = T.TASKS["vqav2"]
    pool = [T.Item(str(i), f"<img>{i}.png</img>q{i} Answer:", {"answers": [f"a{i}"]}) for i in range(3)]
    items = [T.Item(str(i), f"<img>{i}.png</img>q{i} Answer:", {"answers": [f"a{i}"]}) for i in range(3)]
    items = T.add_few_shot(task, items, pool, 2, seed=0, compat=False)
    for i, item in enumerate(items):
        examples = item.prompt.rsplit("<img>", 1)[0]
        assert f"<img>{i}.png</img>" not in examples and examples.count("<img>") == 2
        assert item.prompt.endswith(f"<img>{i}.png</img>q{i} Answer:")
    compat_items = [T.Item(str(i), f"<img>{i}.png</img>q{i} Answer:", {"answers": [f"a{i}"]}) for i in range(3)]
    compat_items = T.add_few_shot(task, compat_items, pool, 3, seed=0, compat=True)  # all three, its own included
    assert all(it.prompt.count(f"<img>{i}.png</img>") == 2 for i, it in enumerate(compat_items))


def test_mme_score_is_accuracy_plus_accuracy_plus():
    task = T.TASKS["mme"]
    items = [T.Item(f"count/{k}", "", {"category": "count", "image": img, "answer": gt})
             for k, (img, gt) in enumerate([("a", "Yes"), ("a", "No"), ("b", "Yes"), ("b", "No")])]
    preds = {"count/0": "Yes, there are.", "count/1": "No", "count/2": "yes", "count/3": "I think so"}
    result = T.score(task, items, preds, compat=False)
    assert result["categories"]["count"] == pytest.approx(100 * (3 / 4 + 1 / 2))
    assert result["perception"] == result["total_score"] and result["cognition"] == 0.0


# ---- bad inputs ------------------------------------------------------------------------------------


def test_bad_inputs_get_errors_that_name_them(ckpt, files, tmp_path, capsys):
    data = tmp_path / "v.jsonl"
    data.write_text('{"image": "nowhere.png", "question": "q", "question_id": 1, "answers": ["a"]}\n')
    with pytest.raises(T.EvalDataError, match=r"v.jsonl:1: image 'nowhere.png' not found"):
        evaluate(EvalArgs("vqav2", str(ckpt), str(data), out=str(tmp_path / "o"), progress=False))
    data.write_text('{"image": "x.png", "question": "q"\n')
    with pytest.raises(T.EvalDataError, match=r"v.jsonl:1: not valid JSON"):
        evaluate(EvalArgs("gqa", str(ckpt), str(data), out=str(tmp_path / "o2"), progress=False))
    tsv = tmp_path / "m.tsv"
    tsv.write_text("index\tquestion\thint\tA\tB\tanswer\timage\n0\tq\t\tx\ty\tA\tnot*base64\n")
    with pytest.raises(T.EvalDataError, match=r"m.tsv:2: bad index or base64"):
        evaluate(EvalArgs("mmbench", str(ckpt), str(tsv), out=str(tmp_path / "o3"), progress=False))
    no_answers = tmp_path / "n.jsonl"
    no_answers.write_text(json.dumps({"image": str(files[0] / "gqa" / "images" / "0.png"), "question": "q",
                                      "question_id": 1}) + "\n")
    with pytest.raises(T.EvalDataError, match="no answers to score gqa with, and gqa has no server"):
        evaluate(EvalArgs("gqa", str(ckpt), str(no_answers), out=str(tmp_path / "o4"), progress=False))
    assert cli.main(["eval", "gqa", "-m", str(ckpt), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_eval_table_collects_metrics(ckpt, files, tmp_path, capsys):
    run("gqa", ckpt, files, tmp_path / "res" / "gqa", limit=2)
    run("refcoco", ckpt, files, tmp_path / "res" / "refcoco", limit=2)
    assert cli.main(["eval-table", str(tmp_path / "res")]) == 0
    table = capsys.readouterr().out
    assert "gqa" in table and "refcoco" in table and "59.3" in table and "89.36" in table


def test_mmbench_tsv_pictures_are_decoded_once(ckpt, files, tmp_path):
    run("mmbench", ckpt, files, tmp_path / "out", limit=4)
    pictures = tmp_path / "out" / "images"
    assert len(os.listdir(pictures)) == 16 and (pictures / "3000000.jpg").exists()
    stamp = (pictures / "0.jpg").stat().st_mtime_ns
    run("mmbench", ckpt, files, tmp_path / "out", limit=4)
    assert (pictures / "0.jpg").stat().st_mtime_ns == stamp
    row = (files[0] / "mmbench" / "dev.tsv").read_text().splitlines()[1].split("\t")
    assert (tmp_path / "out" / "images" / "0.jpg").read_bytes() == base64.b64decode(row[-1])


def test_synthetic_benchmark_files_are_deterministic(tmp_path):
    if "en" not in synth.fonts():
        pytest.skip("no TrueType font for the words in the pictures")
    bench.generate(tmp_path / "a", n=2, seed=7, image_size=96, tasks=("gqa", "mmbench", "mme"))
    bench.generate(tmp_path / "b", n=2, seed=7, image_size=96, tasks=("gqa", "mmbench", "mme"))
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
