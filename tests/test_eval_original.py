"""`qwenvl eval` on benchmark files written here by hand in the original's formats (`eval_mm/*`), not by
`qwenvl data bench`: the caption prompt, few-shot prompts, the submission files of test splits, eval-table
folders, MME's image paths, and multiple-choice scoring on a model whose options really differ."""
import base64
import io
import json
import os
import re
import zipfile
from xml.etree import ElementTree

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import qwenvl
from qwenvl import cli
from qwenvl.eval import runner, tasks as T
from qwenvl.eval.runner import EvalArgs, evaluate

from conftest import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", seed=3)


def picture(path, colour) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)
    return path


COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fake_generate(seen, answer=lambda it: "a red picture"):
    """A stand-in for the model's generation that records the prompts it is given."""
    def predict(model, tokenizer, task, batch):
        seen.extend(it.prompt for it in batch)
        return [answer(it) for it in batch]
    return predict


# ---- 1. the caption prompt ----------------------------------------------------------------------------


def test_captions_get_the_picture_and_the_instruction(ckpt, tmp_path, monkeypatch):
    # flickr30k_karpathy_test.json as the original's evaluate_caption.py reads it
    for i in range(3):
        picture(str(tmp_path / "flickr30k" / f"{i}.jpg"), COLOURS[i])
    coco = {"images": [{"id": i, "image": f"flickr30k/{i}.jpg"} for i in range(3)],
            "annotations": [{"image_id": i, "caption": f"a {COLOURS[i]} picture", "id": 10 + i} for i in range(3)]}
    data = tmp_path / "flickr30k_karpathy_test.json"
    data.write_text(json.dumps(coco))
    seen = []
    monkeypatch.setitem(runner.PREDICT, "generate", fake_generate(seen))
    monkeypatch.chdir(tmp_path)  # the original opens the paths relative to the working folder
    result = evaluate(EvalArgs("flickr30k", str(ckpt), str(data), out=str(tmp_path / "out"), progress=False))
    assert seen == [f"<img>flickr30k/{i}.jpg</img>Describe the image in English:" for i in range(3)]
    assert result["count"] == 3 and result["CIDEr"] > 0


def test_nocaps_with_its_annotations_apart(tmp_path):
    picture(str(tmp_path / "0.jpg"), "red")
    data = tmp_path / "nocaps_val.json"
    data.write_text(json.dumps({"images": [{"id": 7, "image": "0.jpg"}]}))
    annotations = tmp_path / "nocaps_val_annotations.json"
    annotations.write_text(json.dumps({"annotations": [{"image_id": 7, "caption": "a red square"}]}))
    (item,) = T.load_items(T.TASKS["nocaps"], str(data), T.Images(str(tmp_path), str(tmp_path)), str(annotations))
    assert item.prompt == f"<img>{tmp_path / '0.jpg'}</img>Describe the image in English:"
    assert item.info["references"] == ["a red square"]


# ---- 2. few-shot ----------------------------------------------------------------------------------------


def vqa_file(tmp_path, n, answers=True):
    rows = []
    for i in range(n):
        picture(str(tmp_path / "images" / f"{i}.png"), COLOURS[i % len(COLOURS)])
        row = {"image": f"images/{i}.png", "question": f"What colour is picture {i}?", "question_id": 100 + i}
        if answers:
            row["answer"] = COLOURS[i % len(COLOURS)]
            row["answers"] = [COLOURS[i % len(COLOURS)]] * 10
        rows.append(row)
    return write_jsonl(tmp_path / "vqav2_val.jsonl", rows)


@pytest.mark.parametrize("scorer", ["fixed", "compat"])
def test_few_shot_examples_never_nest_and_small_files_suffice(ckpt, tmp_path, monkeypatch, scorer):
    data = vqa_file(tmp_path, 3)
    seen = []
    monkeypatch.setitem(runner.PREDICT, "generate", fake_generate(seen))
    evaluate(EvalArgs("vqav2", str(ckpt), str(data), images=str(tmp_path), out=str(tmp_path / "out"), few_shot=2,
                      scorer=scorer, progress=False))
    assert len(seen) == 3
    for i, prompt in enumerate(seen):
        pictures = re.findall(r"<img>(.*?)</img>", prompt)
        assert len(pictures) == 3  # two examples and the question, however many items came before
        assert pictures[-1].endswith(f"{i}.png") and prompt.endswith(f"What colour is picture {i}? Answer:")
        examples = re.findall(r"<img>[^<]*?(\d)\.png</img>What colour is picture (\d)\? Answer: (\w+)", prompt)
        assert len(examples) == 2 and all(a == b and c == COLOURS[int(a)] for a, b, c in examples)
        if scorer == "fixed":
            assert all(a != str(i) for a, _, _ in examples)


def test_caption_few_shot_finds_examples_and_leaves_the_pool_unchanged(tmp_path):
    task = T.TASKS["flickr30k"]
    for i in range(3):
        picture(str(tmp_path / f"{i}.jpg"), COLOURS[i])
    data = tmp_path / "f.json"
    data.write_text(json.dumps({"images": [{"id": i, "image": f"{i}.jpg"} for i in range(3)],
                                "annotations": [{"image_id": i, "caption": f"cap {i}"} for i in range(3)]}))
    items = T.load_items(task, str(data), T.Images(str(tmp_path), str(tmp_path)))
    before = [it.prompt for it in items]
    shown = T.add_few_shot(task, items, items, 2, seed=0, compat=False)
    assert [it.prompt for it in items] == before  # the pool is the items: nothing changed in place
    for i, it in enumerate(shown):
        assert it.prompt.endswith(before[i]) and it.prompt.count("Describe the image in English:") == 3
        assert f"{i}.jpg</img>Describe the image in English: cap" not in it.prompt  # never its own caption


# ---- 3. submission files of test splits -------------------------------------------------------------------


def test_vqav2_test_dev_writes_the_evalai_file(ckpt, tmp_path, monkeypatch, capsys):
    data = vqa_file(tmp_path, 3, answers=False)  # vqav2_testdev.jsonl: no answers
    monkeypatch.setitem(runner.PREDICT, "generate", fake_generate([], lambda it: "yes"))
    out = tmp_path / "out"
    assert cli.main(["eval", "vqav2", "-m", str(ckpt), "--data", str(data), "--images", str(tmp_path),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"submission (no answers to score: for the benchmark's server): {out / 'submission.json'}" in printed
    assert json.loads((out / "submission.json").read_text()) == [
        {"question_id": 100 + i, "answer": "yes"} for i in range(3)]
    assert json.loads((out / "metrics.json").read_text())["submission"] == str(out / "submission.json")
    assert (out / "predictions.jsonl").exists()


def test_vizwiz_and_docvqa_test_files(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(runner.PREDICT, "generate", fake_generate([], lambda it: "no"))
    picture(str(tmp_path / "VizWiz_test_00000000.jpg"), "red")
    vizwiz = write_jsonl(tmp_path / "vizwiz_test.jsonl", [
        {"image": "VizWiz_test_00000000.jpg", "question": "What is this?", "question_id": 0}])
    evaluate(EvalArgs("vizwiz", str(ckpt), str(vizwiz), images=str(tmp_path), out=str(tmp_path / "v"), progress=False))
    assert json.loads((tmp_path / "v" / "submission.json").read_text()) == [
        {"question_id": 0, "answer": "no", "image": "VizWiz_test_00000000.jpg"}]
    docvqa = write_jsonl(tmp_path / "test.jsonl", [
        {"image": "VizWiz_test_00000000.jpg", "question": "What is the date?", "questionId": 57349}])
    evaluate(EvalArgs("docvqa", str(ckpt), str(docvqa), images=str(tmp_path), out=str(tmp_path / "d"), progress=False))
    assert json.loads((tmp_path / "d" / "submission.json").read_text()) == [{"questionId": 57349, "answer": "no"}]


def test_half_answered_files_are_refused(ckpt, tmp_path):
    data = vqa_file(tmp_path, 2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    del rows[1]["answers"], rows[1]["answer"]
    write_jsonl(data, rows)
    with pytest.raises(T.EvalDataError, match="question 101 has no answers while others do"):
        evaluate(EvalArgs("vqav2", str(ckpt), str(data), images=str(tmp_path), out=str(tmp_path / "o"), progress=False))


def read_xlsx(path) -> list[list[str]]:
    main = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
    with zipfile.ZipFile(path) as z:
        sheet = ElementTree.fromstring(z.read("xl/worksheets/sheet1.xml"))
        assert "xl/workbook.xml" in z.namelist() and "[Content_Types].xml" in z.namelist()
    return [[(c.find(f"{main}v").text if c.find(f"{main}v") is not None else c.find(f"{main}is/{main}t").text)
             for c in row] for row in sheet.iter(f"{main}row")]


def mmbench_tsv(path, questions, answers=True):
    """mmbench_test_20230712.tsv: index, question, hint, A-D, (answer,) category, image as base64; rotation k of
    question i has index k * 1e6 + i."""
    header = ["index", "question", "hint", "A", "B", "C", "D"] + (["answer"] if answers else []) + ["category", "image"]
    lines = ["\t".join(header)]
    for i, (options, right) in enumerate(questions):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), COLOURS[i]).save(buffer, format="JPEG")
        encoded = base64.b64encode(buffer.getvalue()).decode()
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            row = [str(k * 1_000_000 + i), f"Which colour is shown? ({i})", "nan", *rotated]
            row += ["ABCD"[rotated.index(right)]] if answers else []
            lines.append("\t".join(row + ["attribute_recognition", encoded]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_mmbench_test_writes_the_sheet_its_server_takes(ckpt, tmp_path, capsys):
    options = ["red", "green", "blue", "yellow"]
    data = mmbench_tsv(tmp_path / "mmbench_test.tsv", [(options, "red"), (options, "blue")], answers=False)
    out = tmp_path / "out"
    assert cli.main(["eval", "mmbench", "-m", str(ckpt), "--data", str(data), "--out", str(out)]) == 0
    assert "submission (no answers to score" in capsys.readouterr().out
    rows = read_xlsx(out / "submission.xlsx")
    assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction"]
    chosen = {r["key"]: "ABCD"[r["prediction"]["choice"]] for r in map(json.loads, open(out / "predictions.jsonl"))}
    assert len(rows) == 9 and {r[0]: r[6] for r in rows[1:]} == chosen
    first = rows[2]  # rotation 1 of question 0
    assert first[0] == "1000000" and first[2:6] == ["green", "blue", "yellow", "red"]


def mme_folder(tmp_path):
    """eval_mm/mme as the original's eval.py reads it: Your_Results/<category>.txt and images/<category>/."""
    results = tmp_path / "Your_Results"
    results.mkdir()
    for category in ("existence", "count"):
        lines = []
        for i in range(2):
            picture(str(tmp_path / "images" / category / f"{i}.png"), COLOURS[i])
            lines += [f"{i}.png\tIs there a square in this image? Please answer yes or no.\tYes",
                      f"{i}.png\tIs there a circle in this image? Please answer yes or no.\tNo"]
        (results / f"{category}.txt").write_text("\n".join(lines) + "\n")
    return results


def test_mme_writes_the_files_calculation_py_reads(ckpt, tmp_path, monkeypatch):
    data = mme_folder(tmp_path)
    replies = {"existence/1": "Yes", "existence/2": "No, there\tis\nnone.", "existence/3": "yes", "existence/4": "Yes",
               "count/1": "No", "count/2": "No", "count/3": "No", "count/4": "No"}
    monkeypatch.setitem(runner.PREDICT, "chat", lambda m, t, task, batch: [replies[it.key] for it in batch])
    result = evaluate(EvalArgs("mme", str(ckpt), str(data), out=str(tmp_path / "out"), progress=False))
    folder = tmp_path / "out" / "mme_results"
    assert result["submission"] == str(folder) and sorted(os.listdir(folder)) == ["count.txt", "existence.txt"]
    # calculation.py: four tab-separated columns per line, two lines (Yes, No) per picture, in the source order
    scores = {}
    for category in ("existence", "count"):
        lines = (folder / f"{category}.txt").read_text().splitlines()
        assert len(lines) == 4 and all(len(line.split("\t")) == 4 for line in lines)
        assert [line.split("\t")[:3] for line in lines] == [
            line.split("\t") for line in (data / f"{category}.txt").read_text().splitlines()]
        right = [T._mme_answer(line.split("\t")[3]) == line.split("\t")[2].lower() for line in lines]
        pairs = [right[k:k + 2] for k in range(0, 4, 2)]
        scores[category] = 100 * (sum(right) / 4 + sum(all(p) for p in pairs) / 2)
    assert (folder / "existence.txt").read_text().splitlines()[1].split("\t")[3] == "No, there is none."
    assert result["categories"] == pytest.approx(scores)


def test_mme_resolves_images_like_the_other_tasks(ckpt, tmp_path, monkeypatch):
    data = mme_folder(tmp_path)
    task = T.TASKS["mme"]
    beside = T.load_items(task, str(data), T.Images(None, str(tmp_path)))  # the folder that holds the data folder
    assert beside[0].prompt.startswith(f"<img>{tmp_path / 'images' / 'count' / '0.png'}</img>\n")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    os.rename(tmp_path / "images", moved / "images")
    with pytest.raises(T.EvalDataError, match="images/count/0.png"):
        T.load_items(task, str(data), T.Images(None, str(tmp_path)))
    given = T.load_items(task, str(data), T.Images(str(moved), str(tmp_path)))  # --images: the original's folder
    assert given[0].prompt.startswith(f"<img>{moved / 'images' / 'count' / '0.png'}</img>")
    monkeypatch.chdir(moved)  # as the original: relative to the working folder
    assert T.load_items(task, str(data), T.Images(None, str(tmp_path)))[0].prompt.startswith(
        "<img>images/count/0.png</img>")


# ---- 4. eval-table carries the folder -------------------------------------------------------------------


def test_eval_table_tells_two_runs_of_one_task_apart(ckpt, tmp_path, monkeypatch, capsys):
    data = vqa_file(tmp_path, 2)
    monkeypatch.setitem(runner.PREDICT, "generate", fake_generate([], lambda it: it.info["answers"][0]))
    for name in ("run-a", "run-b"):
        evaluate(EvalArgs("vqav2", str(ckpt), str(data), images=str(tmp_path), out=str(tmp_path / "res" / name),
                          progress=False, limit=1 if name == "run-a" else None))
    assert cli.main(["eval-table", str(tmp_path / "res")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "folder"
    assert [line.split()[-1] for line in lines[2:]] == [str(tmp_path / "res" / "run-a"), str(tmp_path / "res" / "run-b")]


# ---- 5. multiple choice on a model whose options differ ------------------------------------------------


def reference_choices(model, tokenizer, items) -> list[int]:
    """The original's ranking, computed independently: full logits of prompt + " A" ..., mean loss over the
    option's tokens, lowest wins."""
    choices = []
    for it in items:
        losses = []
        for letter in "ABCDE"[:it.options]:
            prompt, target = tokenizer.encode(it.prompt), tokenizer.encode(" " + letter)
            ids = torch.tensor([prompt + target])
            with torch.no_grad():
                logits = model(ids[:, :-1]).logits[0, -len(target):]
            losses.append(float(F.cross_entropy(logits, ids[0, -len(target):])))
        choices.append(min(range(len(losses)), key=losses.__getitem__))
    return choices


@pytest.fixture(scope="module")
def distinct(tmp_path_factory):
    """A random checkpoint with the option letters' lm_head rows pushed apart, so each prompt prefers its own."""
    folder = make_checkpoint(tmp_path_factory.mktemp("distinct") / "model", seed=5)
    tokenizer = qwenvl.AutoTokenizer.from_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for letter in "ABCD":
        (token,) = tokenizer.encode(" " + letter)
        weights["lm_head.weight"][token] += 20 * torch.randn(weights["lm_head.weight"].shape[1], generator=generator)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def choice_files(tmp_path):
    """scienceqa_img, seed_bench and mmbench (dev) files with six questions each, by hand."""
    options = ["red", "green", "blue", "yellow"]
    for i in range(6):
        picture(str(tmp_path / "images" / f"{i}.png"), COLOURS[i])
    science = write_jsonl(tmp_path / "scienceqa_test_img.jsonl", [
        {"image": f"images/{i}.png", "hint": "A picture." if i % 2 else None, "question": f"Which colour? {i}",
         "choices": options[:2 + i % 3], "answer": i % (2 + i % 3), "question_id": f"q{i}"} for i in range(6)])
    seed = write_jsonl(tmp_path / "seed.jsonl", [
        {"question_id": 1000 + i, "answer": "ABCD"[i % 4],
         "prompt": f"<img>images/{i}.png</img>\nQuestion: Which colour? {i}\nOptions: "
                   + "\n".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)) + "\nAnswer:"} for i in range(6)])
    mmbench = mmbench_tsv(tmp_path / "mmbench_dev.tsv", [(options, options[i % 4]) for i in range(3)])
    return {"scienceqa_img": science, "seed_bench": seed, "mmbench": mmbench}


def test_choice_scoring_on_a_model_whose_options_differ(distinct, tmp_path):
    files = choice_files(tmp_path)
    model = qwenvl.from_pretrained(distinct, fp32=True, device_map="cpu")
    tokenizer = qwenvl.AutoTokenizer.from_pretrained(distinct)
    picked = set()
    for name, data in files.items():
        out = tmp_path / name
        result = evaluate(EvalArgs(name, str(distinct), str(data), images=str(tmp_path), out=str(out), batch_size=4,
                                   progress=False))
        items = T.load_items(T.TASKS[name], str(data), T.Images(str(tmp_path), str(tmp_path)), work_dir=str(out))
        expected = reference_choices(model, tokenizer, items)
        got = [r["prediction"]["choice"] for r in map(json.loads, open(out / "predictions.jsonl"))]
        assert got == expected, name
        picked.update(expected)
        right = [c == it.info["answer"] for c, it in zip(expected, items)]
        if name == "mmbench":  # circular: every rotation of a question right
            by_question = {}
            for it, ok in zip(items, right):
                by_question.setdefault(it.info["index"], []).append(ok)
            assert result["accuracy"] == pytest.approx(sum(all(v) for v in by_question.values()) / len(by_question))
        else:
            assert result["accuracy"] == pytest.approx(sum(right) / len(right))
    assert len(picked) >= 3  # the options really compete: a scorer answering "A" everywhere would fail
    seed_rows = [json.loads(line) for line in open(tmp_path / "seed_bench" / "submission.jsonl")]
    assert [r["question_id"] for r in seed_rows] == [1000 + i for i in range(6)]
    assert all(r["prediction"] in "ABCD" for r in seed_rows)
