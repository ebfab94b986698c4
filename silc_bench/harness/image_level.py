"""Pieces the image-level harnesses (zs-cls, fewshot, retrieval; Table 1) share."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from silc_bench import paths, registry
from silc_bench.data.loading import iterate
from silc_bench.data.transforms import ImageTransform
from silc_bench.errors import UserError

_WHERE = paths.CONFIGS_DIR / "datasets.yaml"


def dataset_entry(name: str, kinds: tuple[str, ...]) -> dict:
    entry = registry.dataset_entry(name)
    if entry.get("kind") not in kinds:
        raise UserError(f"dataset {name!r} is a {entry.get('kind', 'segmentation')} dataset; this task reads "
                        f"{' or '.join(kinds)} datasets", path=_WHERE,
                        fix="pick a dataset of the task's list (silc-bench ls datasets)")
    return entry


class _Item:
    """Picklable worker transform: the item's image through the model's recipe."""

    def __init__(self, transform: ImageTransform):
        self.transform = transform

    def __call__(self, item: dict) -> dict:
        return {**item, "image": self.transform(item["image"])}


@torch.inference_mode()
def image_embeddings(model, dataset, indices, *, device, batch_size: int, workers: int, progress=None,
                     encode=None) -> torch.Tensor:
    """[len(indices), D] float32 image representations (`encode`, default `model.encode_image`),
    in the order of `indices`; images decoded and preprocessed in worker processes."""
    encode = encode or model.encode_image
    out, batch = [], []

    def flush():
        pixels = torch.stack(batch).to(device, non_blocking=True)
        out.append(encode(pixels).float().cpu())
        if progress is not None:
            progress.update(len(batch))
        batch.clear()

    for item in iterate(dataset, indices, workers=workers, device=device, transform=_Item(ImageTransform(model.preprocess))):
        batch.append(item["image"])
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return torch.cat(out) if out else torch.zeros(0, 0)


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
