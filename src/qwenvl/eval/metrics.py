"""Benchmark metrics of the original Qwen-VL evaluation (`eval_mm/`), as pure functions of model outputs.

Each function says which original script it follows. Where the original had a quirk, the default is the
documented metric and `compat=True` reproduces the quirk, so published numbers can be matched either way.
"""
import re
import shutil
import warnings
from collections import defaultdict

# ---------------------------------------------------------------------------------------------------------
# VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz): the official vqaEval.py that the original ships as vqa_eval.py
# ---------------------------------------------------------------------------------------------------------

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
# Verbatim from vqaEval.py: "(?!<=\d)" is a lookahead typo for a lookbehind, so every period not followed by
# a digit goes ("yes." -> "yes", "3.5" kept, "3." -> "3").
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _vqa_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any text with a digit-comma-digit) is deleted,
    otherwise it becomes a space; then periods go."""
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The original passes re.UNICODE (32) as sub's *count*: at most 32 periods are removed.
    return _PERIOD_STRIP.sub("", out, count=32)


def _vqa_digits_articles(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
    """The official VQA processing of a predicted answer: "Two dogs." -> "2 dogs", "dont" -> "don't"."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(answer))


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """Official VQA accuracy: mean over the 10 leave-one-out subsets of min(1, matches among the rest / 3).

    As in vqaEval.py, the prediction is fully normalized but the human answers (already normalized in the
    annotation files) only get the punctuation pass, and only when they disagree among themselves."""
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = vqa_normalize(prediction)
    gts = [_vqa_punctuation(a) for a in gt_answers] if len(set(gt_answers)) > 1 else list(gt_answers)
    matches = [g == pred for g in gts]
    total = sum(matches)
    # Leaving out answer i: the others match `total - matches[i]` times (leave out by position, not value).
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


# ---------------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicsVQA): the original's infographicsvqa_eval.py
# ---------------------------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1)."""
    if len(a) > len(b):
        a, b = b, a
    previous = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        current = [j]
        for i, ca in enumerate(a, 1):
            current.append(previous[i - 1] if ca == cb else 1 + min(previous[i - 1], previous[i], current[-1]))
        previous = current
    return previous[-1]


def anls(prediction: str, gt_answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer: max over ground truths of 1 - dist / length,
    set to 0 when below `threshold` (a score exactly at the threshold is kept).

    Both strings are stripped, lower-cased and have whitespace runs collapsed before the distance; the
    length is the longer *raw* string, as in the official script (differs only for padded whitespace)."""
    if not gt_answers:
        raise ValueError("anls needs at least one ground-truth answer")
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in gt_answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else levenshtein(gt, pred) / length)
    score = 1.0 - min(distances)
    return 0.0 if score < threshold else score


# ---------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy: pix2struct's relaxed_correctness, as copied into the original's evaluate_vqa.py
# ---------------------------------------------------------------------------------------------------------

def _to_float(text: str) -> float | None:
    """pix2struct's number parsing: Python float(), with "45%" read as 0.45."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def _relaxed_correctness(target: str, prediction: str, tolerance: float) -> bool:
    """pix2struct metrics.relaxed_correctness, verbatim: a zero (or unparsable) target falls back to text."""
    prediction_float, target_float = _to_float(prediction), _to_float(target)
    if prediction_float is not None and target_float:
        return abs(prediction_float - target_float) / abs(target_float) <= tolerance
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, target: str | list[str], tolerance: float = 0.05,
                     compat: bool = False) -> float:
    """1.0 if `prediction` is within `tolerance` relative error of a numeric target, or equals a non-numeric
    (or zero) target case-insensitively; max over a list of targets.

    Percentages are numbers divided by 100 on either side ("45%" matches "0.45", not "45"), as in pix2struct.
    compat=True reproduces the original evaluate_vqa.py, which calls relaxed_correctness(answer, annotation)
    against its (target, prediction) signature: the error is measured relative to the *prediction*, and a
    prediction of 0 (not a target of 0) is what falls back to text comparison."""
    targets = [target] if isinstance(target, str) else list(target)
    prediction = prediction.strip()
    if compat:
        return float(max(_relaxed_correctness(prediction, t, tolerance) for t in targets))
    return float(max(_relaxed_correctness(t.strip(), prediction, tolerance) for t in targets))


# ---------------------------------------------------------------------------------------------------------
# Exact match (GQA, OCR-VQA, AI2D): the original's evaluate_exact_match_accuracy and GQA clean-up
# ---------------------------------------------------------------------------------------------------------

def exact_match(prediction: str, target: str | list[str]) -> float:
    """1.0 if the stripped, lower-cased prediction equals a stripped, lower-cased target (max over a list)."""
    targets = [target] if isinstance(target, str) else list(target)
    return float(any(prediction.strip().lower() == t.strip().lower() for t in targets))


def gqa_clean(answer: str) -> str:
    """The original's GQA answer clean-up, verbatim (apply before exact_match).

    Keeps the text before the first '.', ',' or '!', lower-cases, then for each of 'is ', 'are ', 'a ',
    'an ', 'the ' found *anywhere* (substrings too: "this " contains "is ") keeps what follows its first
    occurrence up to the next one, and cuts at ' of'. Quirks kept so scores match the published 59.3."""
    response = answer.strip().split(".")[0].split(",")[0].split("!")[0].lower()
    for word in ("is ", "are ", "a ", "an ", "the "):
        if word in response:
            response = response.split(word)[1]
    if " of" in response:
        response = response.split(" of")[0]
    return response.strip()


# ---------------------------------------------------------------------------------------------------------
# Grounding (RefCOCO/+/g): the original's evaluate_grounding.py
# ---------------------------------------------------------------------------------------------------------

_BOX_PATTERN = re.compile(r"\((.*?)\),\((.*?)\)")  # the original's PATTERN: tags optional, no space at "),("


def parse_first_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "(x1,y1),(x2,y2)" in a model output (with or without <box> tags), else None.

    The original scored an unparsable answer as the box (0, 0, 0, 0), i.e. wrong; None means the same here."""
    found = _BOX_PATTERN.search(text)
    if found is None:
        return None
    try:
        x1, y1 = (float(v) for v in found.group(1).split(","))
        x2, y2 = (float(v) for v in found.group(2).split(","))
    except ValueError:  # not exactly two numbers in a pair
        return None
    return x1, y1, x2, y2


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; corners may come in either order.
    Boxes that only touch give 0, and two zero-area boxes give 0 (the original's 0/0 = nan, also a miss)."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def grounding_correct(pred_box, gt_box_pixels, width: int, height: int, compat: bool = False) -> bool:
    """True iff the predicted 0-1000 box, scaled to a width x height image, has IoU >= 0.5 with the ground
    truth (x1, y1, x2, y2 in pixels). `pred_box` may be None (unparsable output: wrong).

    compat=True divides by 999 as the original's evaluation did (the format and its drawing helper use
    1000), and, like its torchvision-based IoU, scores a box with reversed corners as wrong."""
    if pred_box is None:
        return False
    if compat and (pred_box[2] < pred_box[0] or pred_box[3] < pred_box[1]):
        return False
    scale = 999.0 if compat else 1000.0
    x1, y1, x2, y2 = pred_box
    pixels = (x1 / scale * width, y1 / scale * height, x2 / scale * width, y2 / scale * height)
    return box_iou(pixels, gt_box_pixels) >= 0.5


# ---------------------------------------------------------------------------------------------------------
# Multiple choice (MMBench circular evaluation, ScienceQA, SEED-Bench)
# ---------------------------------------------------------------------------------------------------------

OPTION_LETTERS = "ABCDE"


def extract_option_letter(text: str, letters: str = OPTION_LETTERS) -> str | None:
    """The option letter a free-text answer names: "B", "(B) cat", "B. cat", "The answer is B." -> "B".

    Only needed for generated answers; the original ranks the letters by loss and needs no parsing."""
    text = text.strip()
    allowed = re.escape(letters)
    leading = re.match(rf"^\(?([{allowed}])(?:[).:,\s]|$)", text)
    if leading:
        return leading.group(1)
    stated = re.search(rf"\b(?:answer|option)\s*(?:is|:)?\s*\(?([{allowed}])\b", text, re.IGNORECASE)
    return stated.group(1) if stated else None


def circular_accuracy(records: list[dict]) -> float:
    """MMBench CircularEval: a question counts only if every rotation of its options asked was answered right.

    records: {"index": question id, "rotation": k, "prediction": letter or option number, "answer": same kind}.
    As in the original's mmbench_evaluation.py, rotations missing from `records` are not held against it
    (there the rotation k of question i has index k * 1e6 + i)."""
    if not records:
        raise ValueError("circular_accuracy needs at least one record")
    all_right = defaultdict(lambda: True)
    for record in records:
        right = _option(record["prediction"]) == _option(record["answer"])
        all_right[record["index"]] = all_right[record["index"]] and right
    return sum(all_right.values()) / len(all_right)


def _option(value) -> str:
    """An option as a letter: 1 -> "B", "b" -> "B" (the original stores predictions as 0-based numbers)."""
    return OPTION_LETTERS[value] if isinstance(value, int) else str(value).strip().upper()


# ---------------------------------------------------------------------------------------------------------
# Captioning (Flickr30K, NoCaps): the COCO caption toolkit (pycocoevalcap), as the original used
# ---------------------------------------------------------------------------------------------------------

# PTBTokenizer's post-filter in pycocoevalcap: these tokens are dropped after tokenizing.
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                   "--", "...", ";"}
_CLITICS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"\.\.\.|--|n't|'\w+|\w+(?:[.\-']\w+)*|[^\w\s]")


def simple_tokenize(caption: str) -> str:
    """A Java-free stand-in for pycocoevalcap's PTBTokenizer(-lowerCase) + punctuation filter.

    Same on plain captions; it differs from Stanford's tokenizer on rarer cases (brackets, quotes inside
    words, abbreviations such as "u.s."), so reported CIDEr should use the Java tokenizer."""
    text = _CLITICS.sub(r"\1 \2", caption.lower().replace("\n", " "))
    return " ".join(t for t in _TOKEN.findall(text) if t not in PTB_PUNCTUATION)


def java_available() -> bool:
    """Whether a `java` executable is on PATH (needed by the PTB tokenizer and METEOR)."""
    return shutil.which("java") is not None


def caption_scores(predictions: dict, references: dict, use_java: bool | None = None) -> dict:
    """Corpus scores of generated captions against reference captions, keyed like COCOEvalCap.eval:
    Bleu_1..Bleu_4, ROUGE_L, CIDEr (CIDEr-D as in the toolkit), plus METEOR when Java is available.

    predictions: {image id: caption}; references: {image id: [captions]} with the same ids.
    use_java: None = use Java when found (PTB tokenizer + METEOR, like the original); False = the pure-Python
    tokenizer and no METEOR; True = require Java. SPICE is left out: it downloads Stanford CoreNLP on first
    use, which cannot work offline. CIDEr's idf comes from the references of the scored set, so a one-image
    corpus always scores 0."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise ImportError("caption_scores needs the COCO caption toolkit: pip install 'qwenvl[eval]' "
                          "(pycocoevalcap)") from None
    if set(predictions) != set(references):
        missing = sorted(map(str, set(references) ^ set(predictions)))[:5]
        raise ValueError(f"predictions and references must cover the same image ids; mismatched: {missing}")
    if any(not refs for refs in references.values()):
        raise ValueError("every image needs at least one reference caption")
    if use_java is None:
        use_java = java_available()
    elif use_java and not java_available():
        raise RuntimeError("use_java=True but no `java` on PATH: install a JRE (8+) or pass use_java=False")

    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
        res = tokenizer.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    else:
        gts = {k: [simple_tokenize(c) for c in refs] for k, refs in references.items()}
        res = {k: [simple_tokenize(c)] for k, c in predictions.items()}

    scores = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n}": value for n, value in enumerate(bleu, 1)})
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor
        meteor = Meteor()
        try:
            scores["METEOR"], _ = meteor.compute_score(gts, res)
        finally:
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    else:
        warnings.warn("METEOR skipped: it needs Java (pycocoevalcap runs meteor-1.5.jar)", stacklevel=2)
    scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], _ = Cider().compute_score(gts, res)
    return {name: float(value) for name, value in scores.items()}

