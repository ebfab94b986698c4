"""Text embeddings as every harness computes them, what the tokenizer does to texts (recorded),
and cache keys for embeddings of one checkpoint."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def text_embeddings(model, texts: list[str], device, batch_size: int = 256) -> torch.Tensor:
    """[N, D] L2-normalised text embeddings, float32 on the CPU."""
    chunks = []
    for i in range(0, len(texts), batch_size):
        ids = model.tokenize(texts[i:i + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(ids).float(), dim=-1).cpu())
    return torch.cat(chunks)


def text_settings(model) -> dict:
    """What the tokenizer does to every text (recorded: where other tools get SigLIP wrong)."""
    tok = model.tokenizer.describe()
    keys = ("kind", "context_length", "pad_id", "lowercase", "eos", "clean", "sha256", "vocab_sha256", "file", "name")
    return {k: tok[k] for k in keys if k in tok}


def cache_key(model, what: str, **content) -> dict | None:
    """A cache key for text embeddings of this model; None (no cache) without a checkpoint hash."""
    info = model.describe()
    if not info.get("sha256"):
        return None
    return {"what": what, "model_sha256": info["sha256"], "format": info.get("format"),
            "tokenizer": info["tokenizer"], **content}
