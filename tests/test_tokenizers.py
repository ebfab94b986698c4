"""SentencePiece tokenizer with big_vision's `tokenize` conventions, on a tiny trained model."""
from __future__ import annotations

import sentencepiece as spm
import pytest
import torch

from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file
from silc_bench.tokenizers import (
    TOKENIZER_KINDS, SentencePieceTokenizer, make_tokenizer, parse_tokenizer_spec, register_tokenizer_kind,
)

LONG = "a photo of a small red cat that sits on the wooden table near a large old house " * 3


@pytest.fixture(scope="module")
def sp(sp_model_path):
    return spm.SentencePieceProcessor(model_file=str(sp_model_path))


def test_trained_model_has_t5_special_ids(sp):
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)


def test_short_text_gets_eos_then_padding(sp_model_path, sp):
    tok = SentencePieceTokenizer(sp_model_path, context_length=16, pad_id=1, eos="sticky")
    out = tok(["a photo of a cat", "a dog"])
    assert out.shape == (2, 16) and out.dtype == torch.long
    for row, text in zip(out, ["a photo of a cat", "a dog"]):
        ids = sp.encode(text) + [sp.eos_id()]
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids):] == 1).all()
    assert tok(["a dog"]).tolist() == tok("a dog").tolist()


def test_sticky_eos_survives_truncation(sp_model_path, sp):
    ids = sp.encode(LONG)
    assert len(ids) > 20
    tok = SentencePieceTokenizer(sp_model_path, context_length=12, pad_id=0, eos="sticky")
    assert tok([LONG])[0].tolist() == ids[:11] + [sp.eos_id()]


def test_yes_eos_is_cut_by_truncation_and_none_adds_no_eos(sp_model_path, sp):
    ids = sp.encode(LONG)
    yes = SentencePieceTokenizer(sp_model_path, context_length=12, eos="yes")
    assert yes([LONG])[0].tolist() == ids[:12]
    assert yes(["a cat"])[0].tolist()[: len(sp.encode("a cat")) + 1] == sp.encode("a cat") + [sp.eos_id()]
    none = SentencePieceTokenizer(sp_model_path, context_length=12, pad_id=0, eos="none")
    short = sp.encode("a cat")
    assert none(["a cat"])[0].tolist() == short + [0] * (12 - len(short))
    assert none([LONG])[0].tolist() == ids[:12]


def test_exact_fit_is_unchanged(sp_model_path, sp):
    """big_vision: tokens + EOS of exactly max_len stay as they are (no padding, EOS last)."""
    text = "a photo of a cat"
    n = len(sp.encode(text)) + 1
    tok = SentencePieceTokenizer(sp_model_path, context_length=n, eos="sticky")
    assert tok([text])[0].tolist() == sp.encode(text) + [sp.eos_id()]


def test_big_vision_docstring_examples(sp_model_path, sp):
    """ops_text.get_pp_tokenize examples with max_len=3, with a word that is one piece."""
    word = next(w for w in ("cat", "dog", "car", "tree", "sky") if len(sp.encode(w)) == 1 and len(sp.encode(f"{w} {w} {w}")) == 3)
    a, eos = sp.encode(word)[0], sp.eos_id()
    texts = [word, f"{word} {word}", f"{word} {word} {word}"]

    def run(eos_mode, pad):
        return SentencePieceTokenizer(sp_model_path, context_length=3, pad_id=pad, eos=eos_mode)(texts).tolist()

    assert run("none", 0) == [[a, 0, 0], [a, a, 0], [a, a, a]]
    assert run("yes", 0) == [[a, eos, 0], [a, a, eos], [a, a, a]]
    assert run("sticky", 0) == [[a, eos, 0], [a, a, eos], [a, a, eos]]
    assert run("sticky", 1) == [[a, eos, 1], [a, a, eos], [a, a, eos]]


def test_lowercase_switch_ascii_only(sp_model_path, sp):
    lower = SentencePieceTokenizer(sp_model_path, context_length=16, lowercase=True)
    keep = SentencePieceTokenizer(sp_model_path, context_length=16, lowercase=False)
    assert lower(["A Photo OF a CAT"]).tolist() == lower(["a photo of a cat"]).tolist()
    assert keep(["A Photo OF a CAT"]).tolist() != keep(["a photo of a cat"]).tolist()
    # tf.strings.lower (big_vision) lowercases ASCII only
    assert lower.encode("ÄB") == sp.encode("Äb") + [sp.eos_id()]


def test_describe(sp_model_path):
    tok = SentencePieceTokenizer(sp_model_path, context_length=16, pad_id=1, lowercase=True, eos="sticky")
    d = tok.describe()
    assert d["kind"] == "sentencepiece" and d["sha256"] == sha256_file(sp_model_path)
    assert d["file"] == str(sp_model_path.resolve())
    assert (d["context_length"], d["pad_id"], d["lowercase"], d["eos"]) == (16, 1, True, "sticky")
    assert d["vocab_size"] == tok.vocab_size and d["eos_id"] == 1


def test_make_tokenizer_forms(sp_model_path, tmp_path):
    spec = {"kind": "sentencepiece", "file": str(sp_model_path), "context_length": 8, "pad_id": 1,
            "lowercase": True, "eos": "sticky"}
    a = make_tokenizer(spec)
    assert isinstance(a, SentencePieceTokenizer) and a.spec() == spec
    b = make_tokenizer(f"sentencepiece:{sp_model_path}", context_length=8)
    assert b(["a cat"]).tolist() == a(["a cat"]).tolist()
    assert parse_tokenizer_spec(f"sentencepiece:{sp_model_path}") == {"kind": "sentencepiece", "file": str(sp_model_path)}
    rel = make_tokenizer({"kind": "sentencepiece", "file": sp_model_path.name}, base_dir=sp_model_path.parent)
    assert rel.file == sp_model_path


def test_make_tokenizer_errors(sp_model_path, tmp_path):
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        make_tokenizer({"kind": "nope", "file": "x"})
    with pytest.raises(UserError, match="not found") as e:
        make_tokenizer({"kind": "sentencepiece", "file": str(tmp_path / "missing.model")})
    assert "missing.model" in str(e.value)
    with pytest.raises(UserError, match="unknown sentencepiece tokenizer settings"):
        make_tokenizer({"kind": "sentencepiece", "file": str(sp_model_path), "max_len": 3})
    with pytest.raises(UserError, match="eos"):
        make_tokenizer({"kind": "sentencepiece", "file": str(sp_model_path), "eos": "maybe"})
    (tmp_path / "bad.model").write_bytes(b"not a proto")
    with pytest.raises(UserError, match="sentencepiece"):
        make_tokenizer({"kind": "sentencepiece", "file": str(tmp_path / "bad.model")})
    with pytest.raises(UserError):
        make_tokenizer("no-colon")


def test_register_tokenizer_kind(sp_model_path):
    register_tokenizer_kind("test_kind", lambda spec, base: SentencePieceTokenizer(spec["file"], context_length=4))
    try:
        assert make_tokenizer({"kind": "test_kind", "file": str(sp_model_path)}).context_length == 4
    finally:
        TOKENIZER_KINDS.pop("test_kind")
