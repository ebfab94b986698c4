"""Tokenizers behind `silc_bench.models.base.Tokenizer`, built from a spec dict.

A spec is a dict such as
    {"kind": "sentencepiece", "file": "c4_en.model", "context_length": 64, "pad_id": 1,
     "lowercase": true, "eos": "sticky"}
or the CLI shorthand string "sentencepiece:FILE". Other kinds (open_clip, hf) register themselves
with `register_tokenizer_kind` from their own modules.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file
from silc_bench.models.base import Tokenizer

EOS_MODES = ("sticky", "yes", "none")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece with big_vision's `tokenize` pp-op conventions (`big_vision/pp/ops_text.py`).

    - `lowercase`: big_vision calls `tf.strings.lower`, which lowercases ASCII letters only; so do we.
    - `eos`: "yes" appends EOS then truncates (EOS may be cut); "sticky" appends EOS and, when the
      text is too long, keeps the first `context_length - 1` tokens plus EOS, so the last token of a
      full sequence is always EOS (SigLIP pools the last position); "none" adds no EOS.
    - padding with `pad_id` to exactly `context_length` (SigLIP: pad_id=1, which is EOS in T5's vocab).
    """

    kind = "sentencepiece"

    def __init__(
        self,
        file: str | Path,
        context_length: int = 64,
        pad_id: int = 1,
        lowercase: bool = True,
        eos: str = "sticky",
    ):
        import sentencepiece

        self.file = Path(file)
        if not self.file.is_file():
            raise UserError(
                "sentencepiece tokenizer model not found",
                path=self.file,
                fix="pass --tokenizer sentencepiece:FILE with an existing .model file",
            )
        if eos not in EOS_MODES:
            raise UserError(f"unknown eos mode {eos!r}", path=self.file, fix=f"use one of {EOS_MODES}")
        if int(context_length) < 1:
            raise UserError(f"context_length must be >= 1, got {context_length}", path=self.file)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.file))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad proto
            raise UserError(
                f"not a sentencepiece model ({e})", path=self.file, fix="pass a sentencepiece .model file"
            ) from e
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.lowercase = bool(lowercase)
        self.eos = eos
        self.eos_id = int(self.sp.eos_id())
        if eos != "none" and self.eos_id < 0:
            raise UserError(
                "the sentencepiece model defines no EOS piece but eos mode needs one",
                path=self.file,
                fix='set "eos": "none" or use a model with an EOS piece',
            )
        self.vocab_size = int(self.sp.GetPieceSize())
        self._sha256: str | None = None

    def encode(self, text: str) -> list[int]:
        """Token ids of one text before padding/truncation (with EOS unless eos == "none")."""
        return self._encode_batch([text])[0]

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.lowercase:
            texts = [t.translate(_ASCII_LOWER) for t in texts]
        ids = self.sp.EncodeAsIds(texts)
        if self.eos != "none":
            ids = [x + [self.eos_id] for x in ids]
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = self.context_length
        out = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(self._encode_batch(list(texts))):
            if len(ids) > n:
                ids = ids[: n - 1] + ids[-1:] if self.eos == "sticky" else ids[:n]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def spec(self) -> dict:
        """The spec dict that rebuilds this tokenizer (what a sidecar json stores)."""
        return {
            "kind": self.kind,
            "file": str(self.file),
            "context_length": self.context_length,
            "pad_id": self.pad_id,
            "lowercase": self.lowercase,
            "eos": self.eos,
        }

    def describe(self) -> dict:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.file)
        return {
            **self.spec(),
            "file": str(self.file.resolve()),
            "sha256": self._sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
        }


def _make_sentencepiece(spec: dict, base_dir: Path | None) -> SentencePieceTokenizer:
    allowed = {"kind", "file", "context_length", "pad_id", "lowercase", "eos"}
    unknown = set(spec) - allowed
    if unknown:
        raise UserError(
            f"unknown sentencepiece tokenizer settings {sorted(unknown)}",
            path=spec.get("file"),
            fix=f"use only {sorted(allowed)}",
        )
    if not spec.get("file"):
        raise UserError('sentencepiece tokenizer spec has no "file"', fix="pass --tokenizer sentencepiece:FILE")
    file = Path(spec["file"]).expanduser()
    if not file.is_absolute() and base_dir is not None:
        file = Path(base_dir) / file
    kw = {k: spec[k] for k in ("context_length", "pad_id", "lowercase", "eos") if k in spec}
    return SentencePieceTokenizer(file, **kw)


TOKENIZER_KINDS: dict[str, Callable[[dict, Path | None], Tokenizer]] = {"sentencepiece": _make_sentencepiece}


def register_tokenizer_kind(kind: str, factory: Callable[[dict, Path | None], Tokenizer]) -> None:
    """Let another module add a tokenizer kind: `factory(spec, base_dir) -> Tokenizer`."""
    TOKENIZER_KINDS[kind] = factory


def parse_tokenizer_spec(spec: str | dict) -> dict:
    """"kind:FILE" (the CLI form) or a dict -> a spec dict (a copy)."""
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, str) and ":" in spec:
        kind, _, rest = spec.partition(":")
        return {"kind": kind, "file": rest}
    raise UserError(
        f"cannot read tokenizer spec {spec!r}",
        fix='pass "sentencepiece:FILE" or a dict {"kind": "sentencepiece", "file": ...}',
    )


def make_tokenizer(spec: str | dict, base_dir: str | Path | None = None, **defaults) -> Tokenizer:
    """Build a tokenizer from a spec; relative files resolve against `base_dir`.

    `defaults` fill settings the spec leaves out or sets to None (e.g. the model's context_length).
    """
    spec = {**defaults, **{k: v for k, v in parse_tokenizer_spec(spec).items() if v is not None}}
    kind = spec.get("kind")
    if kind not in TOKENIZER_KINDS:
        raise UserError(
            f"unknown tokenizer kind {kind!r}",
            path=spec.get("file"),
            fix=f"use one of {sorted(TOKENIZER_KINDS)}",
        )
    return TOKENIZER_KINDS[kind](spec, Path(base_dir) if base_dir is not None else None)
