"""A vision-language model whose right answer is known: it reads flat fixture colours.

Image (or pixel) embedding: one-hot of the nearest `class_colour(k)`, k < C. Text embedding: one-hot
of the longest of its C names found in the (canonicalised) text. So class k's images match class
k's texts exactly, for every task that compares images (or patches) with texts.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from silc_bench.data.fixtures import class_colour
from silc_bench.data.prompts import canonicalize_text
from silc_bench.models.base import Preprocess, Tokenizer, VisionLanguageModel


class NameTokenizer(Tokenizer):
    context_length = 2

    def __init__(self, names: list[str]):
        self.names = [canonicalize_text(n) for n in names]
        self.order = sorted(range(len(names)), key=lambda k: -len(self.names[k]))

    def __call__(self, texts):
        ids = []
        for text in texts:
            text = canonicalize_text(text)
            ids.append(next((k for k in self.order if f" {self.names[k]} " in f" {text} "), len(self.names)))
        return torch.tensor(ids, dtype=torch.long)[:, None].repeat(1, self.context_length)

    def describe(self):
        return {"kind": "oracle-names", "sha256": None}


class ColourNameOracle(VisionLanguageModel):
    patch_size = 1
    dense_modes = ("oracle",)
    default_dense_mode = "oracle"

    def __init__(self, names: list[str], image_size=(16, 16)):
        super().__init__()
        self.names = list(names)
        self.tokenizer = NameTokenizer(self.names)
        self.preprocess = Preprocess(image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self.colours = torch.tensor(np.stack([class_colour(k) for k in range(len(names))]))
        self.provenance = {"format": "oracle", "sha256": None}

    def _one_hot(self, rgb):  # [..., 3] in 0..255 -> [..., C + 1]
        dist = ((rgb[..., None, :] - self.colours) ** 2).sum(-1)
        return F.one_hot(dist.argmin(-1), len(self.names) + 1).float()

    def dense_features(self, pixels, mode=None):
        return self._one_hot(pixels.permute(0, 2, 3, 1) * 255.0)

    def encode_image(self, pixels):
        return self._one_hot(pixels.mean(dim=(2, 3)) * 255.0)

    def encode_image_pre_logits(self, pixels):
        return self.encode_image(pixels)

    def encode_text(self, token_ids):
        return F.one_hot(token_ids[:, 0], len(self.names) + 1).float()

    @property
    def logit_scale(self):
        return None

    @property
    def logit_bias(self):
        return None


class ColourCatSeg(torch.nn.Module):
    """CAT-Seg's API (`model(pixels, class_names)` -> [B, Q, H, W]; `backbone.preprocess`): each
    query k scores a pixel by closeness to `class_colour(k)`, at full resolution."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.preprocess = Preprocess(image_size=(16, 16), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self.provenance = {"format": "oracle-catseg", "sha256": None}

    def describe(self):
        return dict(self.provenance)

    def forward(self, pixels, class_names):
        colours = torch.tensor(np.stack([class_colour(k) for k in range(len(class_names))]))
        dist = ((pixels[:, None] * 255 - colours[None, :, :, None, None]) ** 2).sum(2)
        return -dist.sqrt() / 50.0  # moderate logits: CAT-Seg's protocol takes their sigmoid
