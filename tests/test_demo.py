"""The demo model's recipe: shared rows for unseen ids (and training keeps them shared), the quality judge,
and the bundled checkpoint itself: an official-layout model that answers held-out questions."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import qwenvl
from qwenvl import demo
from qwenvl.bench import random_config
from qwenvl.train.loop import TrainArgs, train

from conftest import CHECKPOINT, GOLDEN


def test_init_shares_one_row_among_unseen_ids():
    config = random_config("tiny")
    seen = {0, 5, 9707, 151643, 151935}
    model = demo.init_model(config, seen, seed=1)
    for table in (model.transformer.wte.weight, model.lm_head.weight):
        unseen = [i for i in range(config.vocab_size) if i not in seen]
        assert torch.equal(table[unseen], table[unseen[0]].expand(len(unseen), -1))
        rows = table[sorted(seen)]
        assert len({tuple(r.tolist()) for r in rows}) == len(seen)  # seen ids keep their own rows
        assert not torch.equal(rows[0], table[unseen[0]])
    pos = model.transformer.visual.attn_pool.pos_embed  # the resampler's fixed 2-D sin-cos table, 16 x 16
    torch.testing.assert_close(pos, demo.sincos_2d(pos.shape[1], 16), rtol=0, atol=0)


def test_training_keeps_tied_rows_bit_identical(tmp_path):
    shutil.copy(GOLDEN / "images" / "shapes_640x480.png", tmp_path / "a.png")
    records = [{"id": "x", "conversations": [
        {"from": "user", "value": "Picture 1: <img>a.png</img>\nWhat colour is the square?"},
        {"from": "assistant", "value": "The square is red."}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    tokenizer = qwenvl.QWenTokenizer.from_pretrained(str(CHECKPOINT))
    seen = demo.tokens_of(records, tokenizer)
    model = demo.init_model(random_config("tiny"), seen, seed=0)
    qwenvl.save_pretrained(model, str(tmp_path / "init"))
    for name in ("qwen.tiktoken", "tokenizer_config.json"):
        shutil.copy(CHECKPOINT / name, tmp_path / "init" / name)
    before = model.lm_head.weight.detach().clone()
    resampler_before = {k: v.clone() for k, v in model.transformer.visual.attn_pool.state_dict().items()}
    result = train(TrainArgs(model=str(tmp_path / "init"), data=str(tmp_path / "d.json"), output=str(tmp_path / "o"),
                             max_steps=3, lr=1e-2, warmup_ratio=0.0, precision="bf16", num_workers=0,
                             train=("resampler", "llm"), keep_tied_rows=True, frozen=("transformer.visual.attn_pool",)))
    trained = result["model"]
    for name, value in trained.transformer.visual.attn_pool.state_dict().items():  # frozen despite its group
        assert torch.equal(value, resampler_before[name]), name
    assert not torch.equal(trained.transformer.visual.proj, model.transformer.visual.proj)  # the rest trained
    unseen = [i for i in range(151936) if i not in seen]
    for table in (trained.transformer.wte.weight, trained.lm_head.weight):
        assert torch.equal(table[unseen], table[unseen[0]].expand(len(unseen), -1))
    assert not torch.equal(trained.lm_head.weight[unseen[0]], before[unseen[0]])  # the shared row did learn
    seen_ids = sorted(seen)
    assert not torch.equal(trained.lm_head.weight[seen_ids], before[seen_ids])


def test_shared_rows_loss_equals_the_full_vocabulary_loss():
    """The training loss over the distinct lm_head rows (the shared one weighted by its count) has the full
    vocabulary's value, its gradients and its clipping norm (in float64: float32 sums over 150k rows differ by
    more than a tolerance that still tells a wrong gradient apart)."""
    from qwenvl.model.qwen_vl import SharedRows
    from qwenvl.train.loop import clip_gradients

    config = random_config("tiny")
    seen = {0, 5, 17, 9707, 151643, 151935}
    model = demo.init_model(config, seen, seed=3).double()
    unseen = torch.tensor([i for i in range(config.vocab_size) if i not in seen])
    shared = SharedRows.from_shared(unseen, config.vocab_size)
    ids = torch.tensor([[5, 17, 9707, 0, 151643, 5, 151935]])
    labels = ids.clone()
    labels[0, :2] = -100
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = []
    for rows in (None, shared):
        model.zero_grad()
        loss = model(ids, labels=labels, reduction="sum", shared_rows=rows).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        norm = clip_gradients(trainable, 1e9, model, rows)
        results.append((loss.detach(), grads, norm))
    (full, full_grads, full_norm), (fast, fast_grads, fast_norm) = results
    torch.testing.assert_close(fast, full)
    torch.testing.assert_close(fast_norm, full_norm)
    assert set(fast_grads) == set(full_grads)
    for name, grad in full_grads.items():
        if name != "lm_head.weight":
            torch.testing.assert_close(fast_grads[name], grad)
    head, fast_head = full_grads["lm_head.weight"], fast_grads["lm_head.weight"]
    kept = sorted(seen) + [int(unseen[0])]  # what training updates; the post-step copy does the rest
    torch.testing.assert_close(fast_head[kept], head[kept])
    assert head[unseen[0]].abs().sum() > 0
    with pytest.raises(ValueError, match="shared lm_head rows"):
        model(torch.tensor([[5, 6]]), labels=torch.tensor([[5, 6]]), shared_rows=shared)


def test_frozen_names_must_match_a_parameter(tmp_path):
    from qwenvl.train.loop import freeze_named
    model = demo.init_model(random_config("tiny"), {1, 2}, seed=0)
    with pytest.raises(ValueError, match="match no parameter: transformer.visual.nope"):
        freeze_named(model, ("transformer.visual.nope",))
    freeze_named(model, ("transformer.visual.transformer",))
    assert not any(p.requires_grad for p in model.transformer.visual.transformer.parameters())
    assert model.transformer.visual.proj.requires_grad


def test_judge_reads_boxes_captions_and_exact_answers():
    thing = {"shape": "circle", "colour": "red", "size": "small", "horizontal": "left", "vertical": "top",
             "pixel_box": [0, 0, 10, 10], "box": [100, 100, 300, 300]}
    record = {"meta": {"images": [{"things": [thing, {**thing, "shape": "star", "colour": "orange",
                                                        "box": [600, 600, 900, 900]}]}]}}
    grounding = {"task": "grounding", "box": [100, 100, 300, 300]}
    assert demo.judge(record, "en", "<ref>the red circle</ref><box>(110,100),(300,310)</box>", grounding)
    assert not demo.judge(record, "en", "<ref>the red circle</ref><box>(400,400),(600,600)</box>", grounding)
    assert not demo.judge(record, "en", "a red circle", grounding)
    caption = {"task": "caption"}
    assert demo.judge(record, "en", "A red circle at the top left and an orange star at the bottom right.", caption)
    assert not demo.judge(record, "en", "A red circle at the top left.", caption)
    assert demo.judge(record, "zh", "左上方有一个红色的圆形，右下方有一个橙色的五角星。", caption)
    assert demo.judge(record, "en", "3", {"task": "count", "answer": "3"})
    assert not demo.judge(record, "en", "3 shapes", {"task": "count", "answer": "3"})


# ---- the bundled checkpoint --------------------------------------------------------------------------

MIN_HELD_OUT_ACCURACY = 0.15  # the shipped model: 16 of 45 right on these (v1: 12; README); random weights: 0
needs_model = pytest.mark.skipif(not (demo.DEMO_MODEL / "config.json").exists(), reason="demo model not built")


@needs_model
def test_bundled_model_is_an_official_checkpoint_with_shared_rows():
    config = json.loads((demo.DEMO_MODEL / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["visual"]["image_size"] == 224
    model = qwenvl.from_pretrained(str(demo.DEMO_MODEL), fp32=True, device_map="cpu")  # plain (unpacked) weights
    for table in (model.transformer.wte.weight, model.lm_head.weight):
        distinct = torch.unique(table.float(), dim=0).shape[0]
        assert distinct < 5000  # ~150k rows share one value: the file compresses to a few MB


def test_init_resampler_maps_each_cell_to_its_own_output():
    """Output (r, c) of the freshly initialized tower follows the picture at cell (r, c): changing one 14-pixel
    cell moves that output far more than any other (random projections average the picture into every output)."""
    model = demo.init_model(demo.demo_config(), set(range(300)), seed=0).eval()
    visual = model.transformer.visual
    cells = ((9, 14), (15, 0), (2, 3))
    pixels = torch.zeros(1 + len(cells), 3, 224, 224)  # picture 0 blank, picture k: one bright cell
    for k, (r, c) in enumerate(cells, 1):
        pixels[k, :, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 2.0
    with torch.no_grad():
        features = visual(pixels)
    for k, (r, c) in enumerate(cells, 1):
        moved = (features[k] - features[0]).norm(dim=-1)
        assert moved.argmax() == r * 16 + c
        assert moved[r * 16 + c] > 3 * moved.topk(2).values[1]


def test_cell_labels_follow_the_drawn_pixels(tmp_path):
    """Stage 0's labels: every cell whose centre lies on a drawn shape is labelled with that shape's colour,
    shape and box; cells whose centre pixel is background are labelled as nothing."""
    from PIL import Image

    from qwenvl.data import synth

    synth.generate(tmp_path, 12, seed=5, split="train", image_size=224, langs=("en",), progress=False,
                   tasks=("caption",))
    colours, shapes = ["none", *synth.COLOURS], ["none", *synth.SHAPES]
    checked = 0
    for record in json.loads((tmp_path / "train.json").read_text()):
        image = record["meta"]["images"][0]
        pixels = np.asarray(Image.open(tmp_path / image["file"]).convert("RGB"))
        labels = demo.cell_labels(image)
        assert labels.shape == (256, len(demo.CELL_HEADS) + 4)
        for cell in range(256):
            x, y = (cell % 16) * 14 + 7, (cell // 16) * 14 + 7
            rgb = tuple(int(v) for v in pixels[y, x])
            colour = labels[cell, 0]
            if colour:
                thing = next(t for t in image["things"]  # (colour, shape) names one thing in a picture
                             if (t["colour"], t["shape"]) == (colours[colour], shapes[labels[cell, 1]]))
                assert labels[cell, 3:].tolist() == list(thing["box"])
                x0, y0, x1, y1 = thing["pixel_box"]
                assert x0 <= x < x1 and y0 <= y < y1
            if rgb in [tuple(v) for v in synth.COLOURS.values()]:  # a shape's pixel (backgrounds never match)
                assert colours[colour] in synth.COLOURS and synth.COLOURS[colours[colour]] == rgb
                checked += 1
    assert checked > 20


# The demo recipe at a small shape (the golden checkpoint's widths, one block each, 112-pixel pictures): the
# same code paths as DEMO_CONFIG at a fraction of the work (bf16 is slow on CPUs without AVX-512 BF16).
SMALL_CONFIG = dict(hidden_size=128, num_hidden_layers=1, num_attention_heads=2, kv_channels=64, intermediate_size=256,
                    seq_length=2048, bf16=True, visual=dict(image_size=112, patch_size=14, width=64, layers=1, heads=2,
                                                            mlp_ratio=2.0, output_dim=128))


def test_pretrain_vision_fits_a_few_pictures(tmp_path):
    from qwenvl.data import synth

    synth.generate(tmp_path, 4, seed=2, split="train", image_size=224, langs=("en",), progress=False,
                   tasks=("caption",))
    pictures = [(str(tmp_path / r["meta"]["images"][0]["file"]), r["meta"]["images"][0])
                for r in json.loads((tmp_path / "train.json").read_text())]
    model = demo.init_model(demo.demo_config(SMALL_CONFIG), set(range(300)), seed=0)
    frozen = model.transformer.visual.attn_pool.pos_embed.clone()
    log, finished = demo.pretrain_vision(model.transformer.visual, pictures, steps=30, batch_size=4, lr=2e-3,
                                         log_every=1)
    assert finished
    assert [r["step"] for r in log] == list(range(1, 31))
    first, last = (sum(r["loss"] for r in part) / 5 for part in (log[:5], log[-5:]))
    assert last < 0.75 * first, log  # measured: 0.11 of the first five steps' loss
    assert torch.equal(model.transformer.visual.attn_pool.pos_embed, frozen)  # the sin-cos table stays fixed


TINY_BUILD = dict(n_train=24, steps=4, batch_size=1, vision_steps=2, num_workers=0,  # stages 1, 3, 1 steps
                  config=demo.demo_config(SMALL_CONFIG))


def build_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def straight_build(tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted tiny build (its output folder and build's result), shared by the resume tests."""
    folder = tmp_path_factory.mktemp("straight")
    result = demo.build(str(folder / "a"), str(folder / "a.work"), **TINY_BUILD)
    return folder / "a", result


def test_build_stopped_by_the_clock_resumes_to_the_same_model(tmp_path, straight_build):
    """Stopped in stage 0, then in stage 2, then run to the end: the same bf16 weights as one straight build."""
    straight_out, straight = straight_build
    assert straight["finished"] and straight["total_seconds"] > 0
    out, work = str(tmp_path / "b"), str(tmp_path / "b.work")
    first = demo.build(out, work, minutes=0, **TINY_BUILD)  # one stage-0 step, then the clock stops it
    assert not first["finished"] and (tmp_path / "b.work" / "init.stage0.pt").exists()
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="--resume"):  # a build in progress is never restarted by accident
        demo.build(out, work, **TINY_BUILD)
    for bad in (dict(more_steps=0), dict(minutes=-1.0), dict(minutes=float("nan"))):  # refused before any work
        with pytest.raises(ValueError, match="--more-steps|--minutes"):
            demo.build(out, work, resume=True, **TINY_BUILD, **bad)
    second = demo.build(out, work, minutes=0, resume=True, **TINY_BUILD)  # stage 0 ends, stage 1, one step of 2
    assert not second["finished"] and (tmp_path / "b.work" / "stage1" / "model" / "config.json").exists()
    assert not (tmp_path / "b.work" / "stage2" / "model").exists()
    third = demo.build(out, work, resume=True, **TINY_BUILD)
    assert third["finished"] and set(third["seconds"]) == {"init", "stage1", "stage2", "stage3"}
    a, b = build_weights(straight_out), build_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "b" / "build.json").read_text())
    assert record["total_seconds"] == round(third["total_seconds"]) and record["devices"]


def test_resume_without_a_work_folder_warm_starts_from_the_shipped_checkpoint(tmp_path, straight_build):
    base = straight_build[0]
    base_seconds = json.loads((base / "build.json").read_text())["total_seconds"]
    result = demo.build(str(tmp_path / "next"), str(tmp_path / "new-machine"), resume=True, more_steps=2,
                        base=str(base), **TINY_BUILD)
    assert result["finished"] and list(result["seconds"]) == ["more1"]
    assert result["total_seconds"] > base_seconds
    written = json.loads((tmp_path / "next" / "build.json").read_text())  # the base's own record kept inside
    assert written["base"] == json.loads((base / "build.json").read_text()) and written["parts"][0]["name"] == "more1"
    history = json.loads((tmp_path / "new-machine" / "more1" / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    before, after = build_weights(base), build_weights(tmp_path / "next")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained on
    for name in demo.MORE_FROZEN:  # ... but left the embedding tables (the shipped big shards) as they were
        assert torch.equal(before[name + ".weight"], after[name + ".weight"])
    more = json.loads((tmp_path / "new-machine" / "data" / "more1.json").read_text(encoding="utf-8"))
    assert not (tmp_path / "new-machine" / "data" / "train.json").exists()  # a warm start needs only its own data
    assert sum(r["meta"]["task"] == "grounding" for r in more) > len(more) / 4  # box questions weighted up
    assert all((tmp_path / "new-machine" / "data" / im["file"]).exists() for r in more for im in r["meta"]["images"])
    assert all(f"<img>{im['file']}</img>" in r["conversations"][0]["value"] for r in more for im in r["meta"]["images"])
    again = demo.build(str(tmp_path / "next"), str(tmp_path / "new-machine"), resume=True, more_steps=1,
                       **TINY_BUILD)  # a finished work folder: another round from its own last model
    assert list(again["seconds"]) == ["more1", "more2"]


def test_quality_command_scores_every_question_and_keeps_the_replies(tmp_path, capsys):
    """`qwenvl demo quality` end to end on the golden checkpoint (its replies are noise; the bookkeeping is real):
    one verdict per assistant turn, the table, the counts and the replies files agree."""
    from qwenvl import cli

    counts, replies = tmp_path / "counts.json", tmp_path / "replies.jsonl"
    assert cli.main(["demo", "quality", "-m", str(CHECKPOINT), "--work", str(tmp_path / "q"), "--n", "3",
                     "--seed", "5", "--json", str(counts), "--replies", str(replies)]) == 0
    table = capsys.readouterr().out
    results = json.loads(counts.read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in replies.read_text(encoding="utf-8").splitlines()]
    records = json.loads((tmp_path / "q" / "quality-5-3" / "test.json").read_text(encoding="utf-8"))
    assert len(rows) == sum(len(r["meta"]["answers"]) for r in records) == sum(r["total"] for r in results.values())
    assert sum(row["right"] for row in rows) == sum(r["right"] for r in results.values())
    assert {f"{row['task']}/{row['lang']}" for row in rows} == set(results)
    assert all("<img>" in row["query"] and isinstance(row["reply"], str) for row in rows)
    assert "grounding" in table and ">= 0.85" in table
    assert not list(tmp_path.glob("*.tmp"))


def test_quality_judges_replies_with_their_box_tags(tmp_path, monkeypatch):
    """The judge sees the reply as `qwenvl chat` shows it: a model that answers every question with the
    right box of the first grounding question gets that one right (the tags are special tokens and must not
    be dropped on decoding)."""
    from qwenvl import loading
    from qwenvl.tokenizer import QWenTokenizer

    path = demo.synth.generate(tmp_path / "q" / "quality-9-12", 12, seed=9, split="test",
                               image_size=demo.DEMO_CONFIG["visual"]["image_size"], langs=("en",))
    records = json.loads(path.read_text(encoding="utf-8"))
    tokenizer = QWenTokenizer.from_pretrained(str(CHECKPOINT))
    answer = next(a for r in records for a in r["meta"]["answers"] if a["task"] == "grounding")["answer"]
    reply = tokenizer.encode(answer) + [tokenizer.im_end_id]

    class Parrot:
        def generate(self, ids, **kwargs):
            return torch.cat([ids, torch.tensor(reply).expand(len(ids), -1)], dim=1)

    monkeypatch.setattr(loading, "from_pretrained", lambda *args, **kwargs: Parrot())
    replies = tmp_path / "replies.jsonl"
    results = demo.quality(str(CHECKPOINT), str(tmp_path / "q"), n=12, seed=9, progress=False,
                           replies_path=str(replies))
    rows = [json.loads(line) for line in replies.read_text(encoding="utf-8").splitlines()]
    assert all(row["reply"] == answer for row in rows)
    assert results["grounding/en"]["right"] >= 1


@needs_model
def test_bundled_model_answers_held_out_questions(tmp_path):
    """A regression guard: the shipped model on 40 held-out pictures (a seed neither the build nor the README's
    quality table uses), scored by the same judge as `qwenvl demo quality`; the random-weight checkpoint scores 0."""
    results = demo.quality(str(demo.DEMO_MODEL), str(tmp_path), n=40, seed=777, progress=False)
    right = sum(r["right"] for r in results.values())
    total = sum(r["total"] for r in results.values())
    assert total >= 40 and right / total >= MIN_HELD_OUT_ACCURACY, results
    count = [r for k, r in results.items() if k.startswith("count/")]
    assert sum(r["right"] for r in count) >= 0.5 * sum(r["total"] for r in count), results


def readme_example(tmp_path, capsys) -> dict:
    from qwenvl import cli

    example = Path(__file__).parents[1] / "examples" / "shapes.png"
    assert cli.main(["generate", "--image", str(example), "--prompt", "Output the bounding box of the red circle.",
                     "--json", "--draw", str(tmp_path / "out.png")]) == 0
    return json.loads(capsys.readouterr().out)


@needs_model
def test_readme_example_answers_with_a_box_drawn_on_the_picture(tmp_path, capsys):
    answer = readme_example(tmp_path, capsys)
    assert answer["boxes"] and answer["boxes"][0]["ref"] and (tmp_path / "out.png").exists()


@needs_model
def test_readme_example_grounds_the_red_circle(tmp_path, capsys):
    from qwenvl.eval.metrics import box_iou

    answer = readme_example(tmp_path, capsys)
    assert answer["boxes"] and answer["boxes"][0]["ref"] == "the red circle"
    assert box_iou(answer["boxes"][0]["box"], (411, 638, 527, 754)) >= 0.5  # drawn by synth: its exact box
