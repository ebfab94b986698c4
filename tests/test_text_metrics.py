"""VQA accuracy equals the official evaluator's rule on hand-made cases; CIDEr equals pycocoevalcap's
(skipped, with the reason, where Java is missing); a missing Java is one clear error."""
import shutil

import pytest

from silc_bench.errors import UserError
from silc_bench.metrics import text_answers as ta


def test_vqa_leave_one_out():
    humans = ["yes"] * 8 + ["no"] * 2
    assert ta.vqa_accuracy("no", humans) == pytest.approx(0.6)  # GT-Vision-Lab/VQA#1, the maintainers' example
    assert ta.vqa_accuracy("yes", humans) == pytest.approx(1.0)
    assert ta.vqa_accuracy("maybe", humans) == 0.0
    assert ta.vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)


@pytest.mark.parametrize("answer,humans,score", [
    ("Two", ["2"] * 10, 1.0),                 # number words -> digits, lower case (the answer is always normalised)
    ("the dog", ["dog"] * 10, 1.0),           # articles dropped
    ("dog.", ["dog"] * 10, 1.0),              # a period not before a digit goes
    ("3.5", ["3.5"] * 10, 1.0),               # ... one before a digit stays
    ("1,000", ["1000"] * 10, 1.0),            # a comma between digits: punctuation deleted, not spaced
    ("yes!", ["yes"] * 10, 0.0),              # "!" is not in the official list (VQA#14)
    ("dont", ["don’t"] * 10, 1.0),            # contractions, with the official typographic apostrophe
    ("red\n", ["red"] * 10, 1.0),
    ("t-shirt", ["t-shirt"] * 9 + ["tshirt"], 1.0),   # "-" is not in the list either
    ("red blue", ["red, blue"] * 5 + ["green"] * 5, 1.0),  # disagreeing humans: their punctuation is removed
    ("red", ["red;"] * 5 + ["blue"] * 5, 0.0),        # sic: ";" becomes a space and nothing strips it again
    ("red;", ["red;"] * 10, 0.0),                      # all agree: theirs stays, the answer's goes
])
def test_vqa_normalisation(answer, humans, score):
    assert ta.vqa_accuracy(answer, humans) == pytest.approx(score)


def test_exact_match():
    assert ta.exact_match(" Kite ", "kite") == 1.0 and ta.exact_match("Kite", "kite", lower=False) == 0.0


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs Java, absent here")
def test_cider_equals_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {1: ["A red kite, in the sky.", "a kite flying high"], 2: ["two disks on the grass", "Disks on grass."],
            3: ["a sail and a drum", "the drum is left of the sail"]}
    preds = {1: "a red kite in the sky", 2: "disks on grass", 3: "a drum"}
    ours, per_image = ta.cider(preds, refs)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in refs.items()})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in refs})
    want, want_per = Cider().compute_score(gts, res)
    assert ours == pytest.approx(100 * want) and ours > 0
    assert [per_image[i] for i in sorted(refs)] == pytest.approx([100 * s for s in want_per])


def test_missing_java_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="Java"):
        ta.cider({1: "a"}, {1: ["a"]})
