"""Pieces the image-level harnesses (zs-cls, fewshot, retrieval; Table 1) share (text pieces: harness/text.py)."""
from __future__ import annotations

import torch

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
