"""Image-level preprocessing (classification, retrieval, few-shot): each model's own recipe.

`Preprocess.resize` says which: "squash" is big_vision's `resize(SIZE)|value_range(-1, 1)`
(bilinear, no antialias, aspect ratio ignored; SigLIP and SILC evaluators), "shortest" is
open_clip's eval transform (PIL resize of the short side with the model's interpolation, then a
centre crop). The recipe is recorded with every result (`details.image_transform`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from silc_bench.models.base import Preprocess

@dataclass(frozen=True)
class ImageTransform:
    """uint8 [3, H, W] RGB -> the model's normalised float input [3, h, w]. Picklable (workers)."""

    preprocess: Preprocess

    def describe(self) -> dict:
        p = self.preprocess
        how = ("resize to the input size ignoring aspect ratio, torch interpolate "
               f"{p.interpolation} (align_corners=False, no antialias) on float pixels" if p.resize == "squash" else
               f"torchvision Resize (PIL {p.interpolation}) of the short side + CenterCrop, as open_clip's eval transform")
        return {**p.to_dict(), "recipe": how}

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        h, w = p.image_size
        if p.resize == "squash":
            x = image.float()[None]
            if tuple(x.shape[-2:]) != (h, w):
                x = F.interpolate(x, size=(h, w), mode=p.interpolation, align_corners=False, antialias=False)
            return p.normalize(x / 255.0)[0]
        if p.resize != "shortest":
            raise ValueError(f"unknown resize {p.resize!r}")
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        pil = TF.resize(pil, min(h, w), interpolation=InterpolationMode(p.interpolation))
        pil = TF.center_crop(pil, [h, w])
        x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return p.normalize(x[None] / 255.0)[0]
