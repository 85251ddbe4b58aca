"""Evaluation metrics: hand-computed values, the original scripts' quirks, CIDEr against a written-out CIDEr-D."""
import math
from collections import defaultdict

import pytest

from qwenvl.eval.metrics import (anls, box_iou, caption_scores, circular_accuracy, exact_match,
                                 extract_option_letter, gqa_clean, grounding_correct, java_available,
                                 levenshtein, parse_first_box, relaxed_accuracy, simple_tokenize,
                                 vqa_accuracy, vqa_normalize)


# --- VQA ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"), ("yes.", "yes"), ("dont", "don't"), ("a dog", "dog"), ("The Two dogs!", "2 dogs"),
    ("1,000", "1000"),  # digit-comma-digit: every mark is deleted, not spaced
    ("3.5", "3.5"),  # a period before a digit stays
    ("red/blue", "red blue"),  # a mark not next to a space becomes a space
    ("red / blue", "red blue"),  # next to a space it is deleted
    (" yes\n", "yes"),
])
def test_vqa_normalize(raw, normalized):
    assert vqa_normalize(raw) == normalized


@pytest.mark.parametrize("k, expected", [
    (0, 0.0),
    (1, 0.3),  # (1*min(1,0/3) + 9*min(1,1/3)) / 10 = 3/10
    (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = 6/10
    (3, 0.9),  # (3*(2/3) + 7*1) / 10 = 9/10
    (4, 1.0),  # (4*1 + 6*1) / 10
    (10, 1.0),  # 10*min(1, 9/3) / 10
])
def test_vqa_accuracy_leave_one_out(k, expected):
    gts = ["2"] * k + ["3", "4", "5", "6", "7", "8", "9", "10", "11", "12"][: 10 - k]
    assert vqa_accuracy("Two", gts) == pytest.approx(expected)


def test_vqa_accuracy_gt_only_punctuation_processed():
    # Human answers are not article-stripped (the annotation files already are): "a dog" never matches "dog".
    assert vqa_accuracy("dog", ["a dog"] * 5 + ["cat"] * 5) == 0.0
    # Disagreeing answers get the punctuation pass: "dog?" -> "dog " (a mark not next to a space becomes one)
    assert vqa_accuracy("the dog.", ["dog?"] * 3 + ["cat"] * 7) == 0.0
    assert vqa_accuracy("the dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)  # 3 matches: 9/10


# --- ANLS --------------------------------------------------------------------------------------------------

def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == 3


def test_anls_threshold_and_edges():
    assert anls(" Hello ", ["hello"]) == 1.0
    assert anls("abce", ["abcd"]) == pytest.approx(0.75)  # 1 - 1/4
    assert anls("abxy", ["abcd"]) == pytest.approx(0.5)  # 1 - 2/4, exactly at the threshold: kept
    assert anls("abxyz", ["abcde"]) == 0.0  # 1 - 3/5 = 0.4 < 0.5
    assert anls("abxyz", ["abcde"], threshold=0.4) == pytest.approx(0.4)
    assert anls("", [""]) == 1.0  # length 0 -> distance 0
    assert anls("", ["abc"]) == 0.0  # 1 - 3/3
    assert anls("abc", [""]) == 0.0
    assert anls("abce", ["zzzz", "abcd"]) == pytest.approx(0.75)  # max over gts: 0 and 0.75
    assert anls("The   cat", ["the cat"]) == 1.0  # whitespace runs collapse


# --- ChartQA relaxed accuracy ------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, target, expected", [
    ("104", "100", 1.0),  # 4/100 = 0.04
    ("105", "100", 1.0),  # 5/100 = 0.05, inclusive
    ("106", "100", 0.0),  # 0.06
    (" 96 ", "100", 1.0),
    ("45%", "0.45", 1.0),  # percentages are /100
    ("45%", "45", 0.0),  # 0.45 vs 45
    ("45%", "46%", 1.0),  # 0.01/0.46 = 0.022
    ("Yes", "yes", 1.0),  # non-numeric: case-insensitive exact match
    ("blue", "red", 0.0),
    ("-102", "-100", 1.0),  # |-2|/|-100| = 0.02
    ("102", "-100", 0.0),  # 202/100
    ("0", "0", 1.0),  # target 0 falls back to text
    ("0.0", "0", 0.0),  # ... so "0.0" is wrong
    ("0.01", "0", 0.0),
])
def test_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


def test_relaxed_accuracy_compat_measures_error_against_prediction():
    assert relaxed_accuracy("95.1", "100") == 1.0  # 4.9/100 = 0.049
    assert relaxed_accuracy("95.1", "100", compat=True) == 0.0  # 4.9/95.1 = 0.0515
    assert relaxed_accuracy("100", "95.1") == 0.0  # 4.9/95.1
    assert relaxed_accuracy("100", "95.1", compat=True) == 1.0  # 4.9/100
    assert relaxed_accuracy("7", ["3", "7.2"]) == 1.0  # max over targets: 0.2/7.2 = 0.028


# --- exact match and GQA clean-up ----------------------------------------------------------------------------

def test_exact_match():
    assert exact_match(" Yes ", "yes") == 1.0
    assert exact_match("yes", ["no", "YES"]) == 1.0
    assert exact_match("yes.", "yes") == 0.0  # no punctuation handling outside GQA's clean-up


@pytest.mark.parametrize("raw, cleaned", [
    ("Pizza", "pizza"),
    ("The dog.", "dog"),
    ("It is a red car, I think", "red car"),  # 'is ' -> "a red car" -> 'a ' -> "red car"
    ("cup of coffee", "cup"),  # cut at ' of'
    ("top of the table", "table"),  # 'the ' first: the original keeps what follows it
    ("this is yes", ""),  # "this " contains "is ": split("is ")[1] is the empty piece between them
])
def test_gqa_clean_reproduces_original(raw, cleaned):
    assert gqa_clean(raw) == cleaned


# --- boxes -------------------------------------------------------------------------------------------------

def test_box_iou_edge_cases():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)  # 50 / (100 + 100 - 50)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0  # disjoint
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching
    assert box_iou((0, 0, 10, 10), (2, 2, 7, 7)) == pytest.approx(0.25)  # contained: 25 / 100
    assert box_iou((10, 10, 0, 0), (0, 0, 10, 10)) == 1.0  # reversed corners: same box
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # zero area, zero union
    assert box_iou((0, 0, 0, 10), (0, 0, 10, 10)) == 0.0  # 0 / 100


def test_parse_first_box():
    assert parse_first_box("<ref>dog</ref><box>(12,34),(56,78)</box>") == (12.0, 34.0, 56.0, 78.0)
    assert parse_first_box("(1,2),(3,4)</box> and (5,6),(7,8)") == (1.0, 2.0, 3.0, 4.0)
    assert parse_first_box("(1, 2),(3, 4)") == (1.0, 2.0, 3.0, 4.0)
    assert parse_first_box("(1,2,3),(4,5)") is None
    assert parse_first_box("no box here") is None


def test_grounding_999_versus_1000():
    pred, gt, size = (0, 0, 500, 999), (0, 0, 999, 999), 999
    # /999: (0,0,500,999) inside gt -> IoU 500*999/(999*999) = 0.5005 >= 0.5
    assert grounding_correct(pred, gt, size, size, compat=True)
    # /1000: (0,0,499.5,998.001) inside gt -> IoU 499.5*998.001/998001 = 0.4995 < 0.5
    assert not grounding_correct(pred, gt, size, size)
    assert not grounding_correct(None, gt, size, size)
    # reversed corners: the same box here, a miss in the original's IoU
    assert grounding_correct((1000, 1000, 0, 0), (0, 0, 100, 100), 100, 100)
    assert not grounding_correct((1000, 1000, 0, 0), (0, 0, 100, 100), 100, 100, compat=True)


# --- multiple choice -----------------------------------------------------------------------------------------

def test_circular_accuracy_one_wrong_rotation_fails_question():
    records = [{"index": 1, "rotation": r, "prediction": "B", "answer": "B"} for r in range(4)]
    records += [{"index": 2, "rotation": r, "prediction": "A", "answer": "A"} for r in range(3)]
    records += [{"index": 2, "rotation": 3, "prediction": "C", "answer": "D"}]
    assert circular_accuracy(records) == 0.5  # question 1 right, question 2 wrong
    # option numbers (the original's 0-based argmin) compare with letters; missing rotations are not held against
    assert circular_accuracy([{"index": 7, "rotation": 0, "prediction": 1, "answer": "b"}]) == 1.0


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(C) a cat", "C"), ("D. red", "D"), ("The answer is A.", "A"), ("Answer: (b)", "b"),
    ("none of these", None),
])
def test_extract_option_letter(text, letter):
    assert extract_option_letter(text, "ABCDEabcde" if letter == "b" else "ABCDE") == letter


# --- captions ----------------------------------------------------------------------------------------------

def test_simple_tokenize_drops_punctuation_like_ptb():
    assert simple_tokenize("A man's dog, running.") == "a man 's dog running"
    assert simple_tokenize("They don't sit-down!") == "they do n't sit-down"


def cider_d(predictions: dict, references: dict, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D from the paper's definition, with the toolkit's details: idf = log(#images) - log(df), clipped
    tf-idf cosine per n-gram order, Gaussian penalty on the difference of *bigram* counts, x10."""
    def grams(sentence):
        words = sentence.split()
        counts = [defaultdict(int) for _ in range(n)]
        for k in range(1, n + 1):
            for i in range(len(words) - k + 1):
                counts[k - 1][tuple(words[i:i + k])] += 1
        return counts, max(0, len(words) - 1)

    refs = {key: [grams(r) for r in rs] for key, rs in references.items()}
    df = defaultdict(int)
    for rs in refs.values():
        for gram in {g for counts, _ in rs for order in counts for g in order}:
            df[gram] += 1

    def vector(counts):
        vec = [{g: tf * (math.log(len(refs)) - math.log(max(1, df[g]))) for g, tf in o.items()} for o in counts]
        return vec, [math.sqrt(sum(v * v for v in o.values())) for o in vec]

    total = 0.0
    for key, rs in refs.items():
        hyp_counts, hyp_len = grams(predictions[key])
        hyp_vec, hyp_norm = vector(hyp_counts)
        score = 0.0
        for ref_counts, ref_len in rs:
            ref_vec, ref_norm = vector(ref_counts)
            for k in range(n):
                dot = sum(min(v, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, v in hyp_vec[k].items())
                if hyp_norm[k] and ref_norm[k]:
                    dot /= hyp_norm[k] * ref_norm[k]
                score += dot * math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
        total += 10.0 * score / n / len(rs)
    return total / len(refs)


REFERENCES = {
    1: ["a man rides a red bike down the street", "a person riding a bicycle on a road"],
    2: ["two dogs play with a ball in the grass", "a pair of dogs playing on a lawn"],
    3: ["a plate of food with rice and vegetables", "a dish of rice with some green vegetables"],
}


@pytest.fixture
def no_java_scores():
    pytest.importorskip("pycocoevalcap")
    with pytest.warns(UserWarning, match="METEOR skipped"):
        yield lambda predictions, references: caption_scores(predictions, references, use_java=False)


def test_cider_identical_captions_two_images(no_java_scores):
    # Disjoint vocabularies: every n-gram has df 1, idf log(2/1); candidate == both refs -> cosine 1 for each
    # order, no length penalty -> 10 * mean(1, 1, 1, 1) = 10.
    refs = {"x": ["a cat sits on the mat"] * 2, "y": ["two dogs run across green grass"] * 2}
    scores = no_java_scores({k: v[0] for k, v in refs.items()}, refs)
    assert scores["CIDEr"] == pytest.approx(10.0)
    assert scores["Bleu_4"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert "METEOR" not in scores and "SPICE" not in scores


def test_cider_matches_written_out_cider_d_and_is_monotone(no_java_scores):
    good = {1: "a man riding a red bike on the street", 2: "two dogs playing with a ball",
            3: "a plate of rice and vegetables"}
    poor = {1: "a man on a street", 2: "an animal outside", 3: "some food"}
    tokenized_refs = {k: [simple_tokenize(r) for r in rs] for k, rs in REFERENCES.items()}
    for predictions in (good, poor):
        expected = cider_d({k: simple_tokenize(c) for k, c in predictions.items()}, tokenized_refs)
        assert no_java_scores(predictions, REFERENCES)["CIDEr"] == pytest.approx(expected)
    assert no_java_scores(good, REFERENCES)["CIDEr"] > no_java_scores(poor, REFERENCES)["CIDEr"] > 0


def test_caption_scores_rejects_mismatched_ids():
    pytest.importorskip("pycocoevalcap")
    with pytest.raises(ValueError, match="same image ids"):
        caption_scores({1: "a cat"}, {2: ["a cat"]}, use_java=False)


@pytest.mark.skipif(not java_available(), reason="needs Java for the PTB tokenizer and METEOR")
def test_caption_scores_java_tokenizer_agrees_on_plain_captions():
    pytest.importorskip("pycocoevalcap")
    predictions = {1: "A man riding a red bike on the street.", 2: "Two dogs playing with a ball.",
                   3: "A plate of rice and vegetables."}
    with_java = caption_scores(predictions, REFERENCES, use_java=True)
    with pytest.warns(UserWarning):
        without = caption_scores(predictions, REFERENCES, use_java=False)
    assert with_java["CIDEr"] == pytest.approx(without["CIDEr"])
    assert 0.0 < with_java["METEOR"] < 1.0
