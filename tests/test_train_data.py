"""Fine-tuning data: file checks, the original's ChatML loss mask, truncation at turn ends, batches, packing."""
import json
import shutil

import pytest
import torch

from qwenvl.chat import DEFAULT_SYSTEM, make_context
from qwenvl.images import load_image, preprocess
from qwenvl.train.data import (IGNORE, ConversationDataset, DataError, PackedDataset, collate, encode_record, fit,
                               load_records, make_dataloader, pack, record_images, MicroBatchSampler)

X = IGNORE
IMAGES = ("tiny_37x23.png", "shapes_640x480.jpg", "tall_300x700.png", "gray_37x23.png")
SIZE = 28  # small pixel tensors keep the tests fast; preprocessing is the same at any size


@pytest.fixture
def folder(tmp_path, golden_dir):
    """A data folder with the golden pictures under imgs/."""
    (tmp_path / "imgs").mkdir()
    for name in IMAGES:
        shutil.copy(golden_dir / "images" / name, tmp_path / "imgs" / name)
    return tmp_path


def write(path, records, jsonl=False):
    text = "\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records, indent=1)
    path.write_text(text, encoding="utf-8")
    return path


def convo(*values, roles=None):
    roles = roles or ["user", "assistant"] * len(values)
    return [{"from": role, "value": value} for role, value in zip(roles, values)]


def encode(tokenizer, text):
    return tokenizer.encode(text, allowed_special=set(tokenizer.IMAGE_ST))


# ---- the loss mask ----------------------------------------------------------------------------------


def test_ids_and_labels_token_by_token(tokenizer, folder):
    u1 = "Picture 1: <img>imgs/tiny_37x23.png</img>\nWhat is this?"
    a1 = "A tiny picture."
    u2 = "Picture 2: <img>imgs/shapes_640x480.jpg</img>\nWhere is the square?"
    a2 = "<ref>The square</ref><box>(100,200),(300,400)</box>"
    [record] = load_records(write(folder / "train.json", [{"id": "m", "conversations": convo(u1, a1, u2, a2)}]))
    ids, labels, turn_ends = encode_record(tokenizer, record)

    S, E = tokenizer.im_start_id, tokenizer.im_end_id
    NL, SYSTEM, USER, ASSISTANT = 198, 8948, 872, 77091
    assert [encode(tokenizer, w) for w in ("\n", "system", "user", "assistant")] == [[NL], [SYSTEM], [USER],
                                                                                      [ASSISTANT]]
    system = encode(tokenizer, DEFAULT_SYSTEM)
    user1, answer1 = encode(tokenizer, record["conversations"][0]["value"]), encode(tokenizer, a1)
    user2, answer2 = encode(tokenizer, record["conversations"][2]["value"]), encode(tokenizer, a2)
    for user, name in ((user1, "tiny_37x23.png"), (user2, "shapes_640x480.jpg")):
        start = user.index(tokenizer.img_start_id)
        assert user[start + 257] == tokenizer.img_end_id  # a whole 258-token span, holding the absolute path
        assert tokenizer.decode(user[start:start + 258]) == f"<img>{folder / 'imgs' / name}</img>"
    assert answer2[0] == tokenizer.ref_start_id and tokenizer.box_end_id in answer2

    assert ids == ([S, SYSTEM, NL] + system + [E, NL]
                   + [S, USER, NL] + user1 + [E, NL]
                   + [S, ASSISTANT, NL] + answer1 + [E, NL]
                   + [S, USER, NL] + user2 + [E, NL]
                   + [S, ASSISTANT, NL] + answer2 + [E, NL])
    assert labels == ([S, X, X] + [X] * len(system) + [E, NL]
                      + [S, X, X] + [X] * len(user1) + [E, NL]
                      + [S, X, X] + answer1 + [E, NL]
                      + [S, X, X] + [X] * len(user2) + [E, NL]
                      + [S, X, X] + answer2 + [E, NL])
    lengths = [len(system), len(user1), len(answer1), len(user2), len(answer2)]
    assert turn_ends == [sum(lengths[:k + 1]) + 5 * (k + 1) for k in range(5)]

    # the prompt part is exactly what inference builds for the same turns
    _, context = make_context(tokenizer, record["conversations"][2]["value"],
                              history=[(record["conversations"][0]["value"], a1)], system=DEFAULT_SYSTEM)
    assert ids[:len(context)] == context and ids[len(context):] == answer2 + [E, NL]


def test_record_system_and_typed_chatml_markers(tokenizer):
    record = {"conversations": convo("say <|im_end|>", "ok"), "system": "Be brief."}
    ids, labels, _ = encode_record(tokenizer, record)
    assert ids[3:3 + len(encode(tokenizer, "Be brief."))] == encode(tokenizer, "Be brief.")
    assert ids.count(tokenizer.im_end_id) == 3  # the typed marker is text, as at inference
    assert ids == make_context(tokenizer, "say <|im_end|>", system="Be brief.")[1] + encode(tokenizer, "ok") + [
        tokenizer.im_end_id, 198]


# ---- checking files ---------------------------------------------------------------------------------

BAD_RECORDS = [
    ({"id": "good", "conversations": convo("Hi <img>imgs/tiny_37x23.png</img>", "Hello.")}, None),
    ({"id": "role", "conversations": convo("a", "b", roles=["bot", "assistant"])}, "turn 0: unknown role 'bot'"),
    ({"id": 7, "conversations": convo("<ref>the dog", "b")}, "turn 0: unclosed <ref>"),
    ({"id": "img", "conversations": convo("<img>imgs/missing.png</img>", "b")}, "turn 0: image file not found: "),
    ({"id": "empty", "conversations": convo(" \n", "b")}, "turn 0 is empty"),
    ({"id": "lead", "conversations": convo("a", "b", "c", roles=["assistant", "user", "assistant"])},
     "starts with an assistant turn"),
    ({"id": "twice", "conversations": convo("a", "b", "c", roles=["user", "user", "assistant"])},
     "turn 1: two user turns in a row"),
    ({"id": "last", "conversations": convo("a", "b", "c")}, "ends with a user turn"),
    ({"id": "stray", "conversations": convo("a </box> b", "c")}, "turn 0: </box> without its opening tag"),
    ("just text", "is a JSON str, not an object"),
    ({"id": "noconv"}, "has no 'conversations' list"),
    ({"id": "blank", "conversations": []}, "'conversations' is empty"),
    ({"id": "many", "conversations": convo("<img>imgs/gone.png</img>", "", "<box>(1,2)")},
     ["turn 0: image file not found: ", "turn 1 is empty", "turn 2: unclosed <box>", "ends with a user turn"]),
]


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_every_problem_is_reported_with_position_and_id(folder, jsonl):
    # the wrong extension on purpose: the content decides the format
    path = write(folder / ("train.json" if jsonl else "train.jsonl"), [r for r, _ in BAD_RECORDS], jsonl=jsonl)
    with pytest.raises(DataError) as caught:
        load_records(path)
    problems = caught.value.problems
    expected = [(position, record, problem) for position, (record, problems) in enumerate(BAD_RECORDS)
                for problem in ([problems] if isinstance(problems, str) else problems or [])]
    assert len(problems) == len(expected), problems
    for (position, record, problem), line in zip(expected, problems):
        record_id = record.get("id") if isinstance(record, dict) else None
        assert line.startswith(f"record {position} (id {record_id!r}): {problem}"), line
    assert str(path) in str(caught.value) and all(line in str(caught.value) for line in problems)


def test_broken_lines_and_files(folder):
    good = json.dumps({"id": 1, "conversations": convo("a", "b")})
    path = folder / "train.jsonl"
    unanswered = json.dumps({"id": 3, "conversations": convo("a")})
    path.write_text(f"{good}\n\n{{\"id\": 2, \"conversations\": [\n{unanswered}\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_records(path)
    broken, unanswered = caught.value.problems  # the lines after a broken one are still read and checked
    assert broken.startswith("line 3: not valid JSON (")
    assert unanswered.startswith("record 2 (id 3): ends with a user turn")  # positions count non-blank lines

    path.write_text('[\n  {"id": 1},\n  {"id": 2,}\n]', encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON: .* at line 3"):
        load_records(path)
    path.write_text(json.dumps({"id": 1, "conversations": convo("a", "b")}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match="holds one JSON dict, not a list"):
        load_records(path)
    with pytest.raises(DataError, match="not found: .*nothing.json"):
        load_records(folder / "nothing.json")
    path.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_records(path)


def test_long_problem_lists_are_capped(folder):
    path = write(folder / "train.json", [{"id": i, "conversations": convo("a")} for i in range(60)])
    with pytest.raises(DataError) as caught:
        load_records(path)
    lines = str(caught.value).splitlines()
    assert len(caught.value.problems) == 60 and "60 problems" in lines[0]
    assert len(lines) == 1 + 50 + 1 and lines[-1].strip() == "... and 10 more"


def test_image_paths_resolve_against_the_data_folder_when_the_working_folder_lacks_them(folder, monkeypatch):
    data = folder / "sub"
    (data / "pics").mkdir(parents=True)
    shutil.copy(folder / "imgs" / "gray_37x23.png", data / "pics" / "g.png")
    absolute = folder / "imgs" / "tiny_37x23.png"
    url = "https://example.com/a.png"
    text = f"<img>pics/g.png</img><img>{absolute}</img><img>{url}</img><img>../imgs/tall_300x700.png</img>"
    monkeypatch.chdir(folder / "imgs")  # holds none of the relative paths but ../imgs/tall (the same file)
    [record] = load_records(write(data / "train.json", [{"id": 0, "conversations": convo(text, "ok"),
                                                         "from_user": "kept"}]))
    images = [str(data / "pics" / "g.png"), str(absolute), url, str(folder / "imgs" / "tall_300x700.png")]
    assert record_images(record) == images
    assert record["conversations"][0]["value"] == "".join(f"<img>{p}</img>" for p in images)
    assert record["from_user"] == "kept"

    with pytest.raises(DataError, match=r"image file not found: .*nowhere.png \(working folder\) nor "
                                        f"{data / 'nowhere.png'} \\(beside the data file\\)"):
        load_records(write(data / "train.json", [{"id": 0, "conversations": convo("<img>nowhere.png</img>", "ok")}]))


def test_roles_are_normalized(folder):
    [record] = load_records(write(folder / "t.json", [{"conversations": convo("a", "b", roles=["human", "gpt"])}]))
    assert [t["from"] for t in record["conversations"]] == ["user", "assistant"]


# ---- truncation -------------------------------------------------------------------------------------


def long_records(folder):
    img = [folder / "imgs" / name for name in IMAGES]
    answer = "<ref>the red square</ref><box>(10,20),(300,400)</box> and <ref>it</ref><box>(1,2),(3,4)</box>"
    return [
        {"id": "one", "conversations": convo(f"<img>{img[0]}</img>What?", answer)},
        {"id": "three", "conversations": convo(f"<img>{img[0]}</img>a", answer, f"<img>{img[1]}</img>b", "plain",
                                               f"<img>{img[2]}</img><img>{img[3]}</img>c", answer)},
        {"id": "four", "system": "S", "conversations": convo("no image", answer, f"<img>{img[1]}</img>x", answer,
                                                             "more", "text " * 30, f"<img>{img[2]}</img>", answer)},
    ]


def assert_whole_spans_and_tags(tokenizer, ids):
    starts = [i for i, t in enumerate(ids) if t == tokenizer.img_start_id]
    ends = [i for i, t in enumerate(ids) if t == tokenizer.img_end_id]
    assert ends == [s + 257 for s in starts]
    for open_id, close_id in ((tokenizer.ref_start_id, tokenizer.ref_end_id),
                              (tokenizer.box_start_id, tokenizer.box_end_id)):
        marks = [t for t in ids if t in (open_id, close_id)]
        assert marks == [open_id, close_id] * (len(marks) // 2)


def test_truncation_never_cuts_a_turn(tokenizer, folder):
    for record in long_records(folder):
        ids, labels, turn_ends = encode_record(tokenizer, record)
        pair_ends = turn_ends[2::2]
        for max_len in range(1, len(ids) + 2):
            kept = fit(ids, labels, turn_ends, max_len)
            if max_len < pair_ends[0]:
                assert kept is None
                continue
            kept_ids, kept_labels = kept
            n = len(kept_ids)
            assert n <= max_len and n in pair_ends and kept_ids == ids[:n] and kept_labels == labels[:n]
            assert n == len(ids) or pair_ends[pair_ends.index(n) + 1] > max_len  # the most that fits
            assert kept_ids[-2:] == [tokenizer.im_end_id, 198]
            assert_whole_spans_and_tags(tokenizer, kept_ids)


@pytest.mark.parametrize("max_len", [200, 400, 700, 900, 1300, 5000])
def test_truncated_and_skipped_counts(tokenizer, folder, max_len):
    records = long_records(folder)
    encoded = [encode_record(tokenizer, r) for r in records]
    dataset = ConversationDataset(records, tokenizer, image_size=SIZE, max_len=max_len) \
        if any(e[2][2] <= max_len for e in encoded) else None
    skipped = [e[2][2] > max_len for e in encoded]
    truncated = [len(e[0]) > max_len and not s for e, s in zip(encoded, skipped)]
    if dataset is None:
        with pytest.raises(DataError, match=f"no sample fits in max_len={max_len}"):
            ConversationDataset(records, tokenizer, image_size=SIZE, max_len=max_len)
        return
    assert (dataset.num_skipped, dataset.num_truncated) == (sum(skipped), sum(truncated))
    assert [s.id for s in dataset.samples] == [r["id"] for r, s in zip(records, skipped) if not s]
    for sample in dataset.samples:
        ids = sample.input_ids.tolist()
        assert len(ids) <= max_len
        assert sample.images == record_images(records[sample.position])[:ids.count(tokenizer.img_start_id)]
        assert_whole_spans_and_tags(tokenizer, ids)


# ---- batches ----------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tokenizer, folder):
    records = [{"id": "two-images", "conversations": convo("<img>imgs/tall_300x700.png</img>a "
                                                           "<img>imgs/tiny_37x23.png</img>b", "c" * 40)},
               {"id": "text", "conversations": convo("hello", "world")},
               {"id": "one-image", "conversations": convo("<img>imgs/shapes_640x480.jpg</img>q", "r", "s", "t")},
               {"id": "gray", "conversations": convo("<img>imgs/gray_37x23.png</img>", "u v w")},
               {"id": "more text", "conversations": convo("x " * 50, "y " * 20)}]
    return ConversationDataset(load_records(write(folder / "train.json", records)), tokenizer, image_size=SIZE,
                               max_len=4096)


def pixels(folder, *names):
    return torch.stack([preprocess(load_image(str(folder / "imgs" / n)), SIZE) for n in names])


def test_dynamic_padding(dataset, folder, tokenizer):
    items = [dataset[1], dataset[0], dataset[2]]
    lengths = [len(i["input_ids"]) for i in items]
    batch = collate(items, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (3, max(lengths)) and max(lengths) < dataset.max_len
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert torch.equal(batch["pixel_values"], pixels(folder, "tall_300x700.png", "tiny_37x23.png",
                                                     "shapes_640x480.jpg"))
    no_images = collate([dataset[1], dataset[4]], pad_id=tokenizer.pad_token_id)
    assert no_images["pixel_values"].shape == (0, 3, SIZE, SIZE)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}


def test_broken_image_names_record_and_image(dataset, folder):
    (folder / "imgs" / "shapes_640x480.jpg").write_bytes(b"not a picture")
    with pytest.raises(DataError, match=r"record 2 \(id 'one-image'\): cannot load image .*shapes_640x480.jpg"):
        dataset[2]


def test_pack_best_fit():
    assert pack([6, 4, 5, 5, 3, 7], 10) == [[4, 5], [0, 1], [2, 3]]
    rows = pack([3, 9, 1, 4, 4, 2, 8, 5], 9)
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum([3, 9, 1, 4, 4, 2, 8, 5][i] for i in row) <= 9 for row in rows) and len(rows) == 4
    with pytest.raises(ValueError, match="more than a packed row"):
        pack([11], 10)


def test_packed_rows(dataset, folder, tokenizer):
    max_len = max(dataset.lengths) + 40
    packed = PackedDataset(dataset, max_len)
    assert len(packed) < len(dataset)
    seen, total = [], 0
    rows = [packed[r] for r in range(len(packed))]
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        assert n <= max_len and total + n > total
        total += n
        segments = row["segment_ids"].tolist()
        assert segments == sorted(segments) and segments[0] == 1 and set(segments) == set(range(1, max(segments) + 1))
        for k, j in enumerate(packed.rows[r]):  # each sample whole and contiguous, positions from 0
            where = torch.nonzero(row["segment_ids"] == k + 1).flatten()
            item = dataset[j]
            assert len(where) == len(item["input_ids"]) and where[-1] - where[0] == len(where) - 1
            assert torch.equal(row["input_ids"][where], item["input_ids"])
            assert row["position_ids"][where].tolist() == list(range(len(where)))
            assert row["labels"][where][0] == IGNORE and torch.equal(row["labels"][where][1:], item["labels"][1:])
            seen.append(j)
        assert torch.equal(row["pixel_values"], torch.cat([dataset[j]["pixel_values"] for j in packed.rows[r]]))
    assert sorted(seen) == list(range(len(dataset))) and total == sum(dataset.lengths)

    batch = collate(rows[:2], pad_id=tokenizer.pad_token_id)
    width = max(len(row["input_ids"]) for row in rows[:2])
    assert batch["segment_ids"].shape == (2, width)
    for b, row in enumerate(rows[:2]):
        n = len(row["input_ids"])
        assert (batch["segment_ids"][b, n:] == 0).all() and (batch["position_ids"][b, n:] == 0).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        assert torch.equal(batch["position_ids"][b, :n], row["position_ids"])
    with pytest.raises(ValueError, match="packed and unpacked"):
        collate([rows[0], dataset[0]], pad_id=tokenizer.pad_token_id)


def batches(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_loader_order_is_seeded_and_resumable(dataset, packed):
    items = PackedDataset(dataset, max(dataset.lengths) + 40) if packed else dataset
    n = len(items)
    steps = 2 * (n // 2)  # two epochs of steps of 2 samples

    def make(num_workers=0, **kw):
        sampler = MicroBatchSampler(n, batch_size=1, grad_accum=2, seed=3, **{"steps": steps, **kw})
        return batches(make_dataloader(items, sampler, num_workers))

    serial = make()
    assert len(serial) == 2 * steps
    assert_same(make(num_workers=2), serial)
    assert_same(make(steps=steps - 1, step_in_epoch=1), serial[2:])  # resume at step 1
    per_epoch = n // 2
    assert_same(make(steps=per_epoch, epoch=1), serial[2 * per_epoch:])  # the next epoch is a new order
    # two ranks with one micro-batch each cover exactly one rank's two micro-batches
    ranks = [MicroBatchSampler(n, 1, 1, 3, steps, rank=r, world=2) for r in (0, 1)]
    one = MicroBatchSampler(n, 1, 2, 3, steps)
    assert [i for pair in zip(*ranks) for i in pair] == list(one)


def test_sampler_refuses_a_dataset_smaller_than_a_batch():
    with pytest.raises(ValueError, match="global batch"):
        MicroBatchSampler(3, batch_size=2, grad_accum=1, seed=0, steps=1, world=2)


def test_image_span_inside_an_answer_is_not_learned(tokenizer):
    record = {"id": "a", "conversations": [
        {"from": "user", "value": "Show the picture again."},
        {"from": "assistant", "value": "Here: <img>pic.png</img> done"}]}
    ids, labels, _ = encode_record(tokenizer, record)
    start = ids.index(tokenizer.img_start_id)
    assert ids[start + 257] == tokenizer.img_end_id
    assert labels[start] == tokenizer.img_start_id and labels[start + 257] == tokenizer.img_end_id
    assert labels[start + 1:start + 257] == [IGNORE] * 256  # image features, not tokens to predict
    done = ids.index(tokenizer.encode(" done")[0], start + 258)
    assert labels[done] == ids[done]
