"""The decoder's one tokenizer for every task: a sentencepiece model (its file is recorded by sha256)."""
from __future__ import annotations

from pathlib import Path

from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file

TASK_KINDS = ("classification", "captioning", "vqa")


class TextCodec:
    """Text <-> token ids. BOS is the model's own, else its pad id (the toy model has none); EOS ends
    every target; `lowercase` applies to prompts and targets alike (and so to what is generated)."""

    def __init__(self, file, lowercase: bool = True):
        import sentencepiece as spm

        self.file = Path(file)
        if not self.file.is_file():
            raise UserError("the decoder's sentencepiece model is missing", path=self.file,
                            fix="set text.tokenizer in the LiT-Decoder config to an existing .model file")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.file))
        self.lowercase = lowercase
        self.eos = self.sp.eos_id()
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else self.pad
        if self.eos < 0:
            raise UserError("the decoder's sentencepiece model has no EOS piece", path=self.file,
                            fix="train it with an eos id (e.g. --eos_id=1)")
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text.lower() if self.lowercase else text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def describe(self) -> dict:
        from silc_bench import paths

        file = self.file.resolve()
        try:  # a file shipped with the project is named relative to it (records stay portable)
            name = str(file.relative_to(paths.PROJECT_DIR.resolve()))
        except ValueError:
            name = str(file)
        return {"kind": "sentencepiece", "file": name, "sha256": sha256_file(self.file),
                "lowercase": self.lowercase, "vocab_size": self.vocab_size, "bos": self.bos, "eos": self.eos,
                "pad": self.pad}


def prompt_text(prompts: dict, kind: str, question: str | None = None) -> str:
    """The task prefix: prompts[kind] with `{question}` filled for question answering."""
    if kind not in prompts:
        raise UserError(f"no prompt for task kind {kind!r}", fix=f"set prompts.{kind} in the LiT-Decoder config")
    return prompts[kind].format(question=question or "")
