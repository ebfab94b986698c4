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


class ColourOwl(torch.nn.Module):
    """An OWL detector's API for ov-det (`model(pixels, query_sets=...)` -> features / boxes /
    template-averaged logits, `text_queries`, `backbone`) that knows the right answer on detection fixtures: "patch" k is
    class k's rectangle (the box of the pixels of exactly `class_colour(k)`), with logit +10 for
    class k's queries and -10 for every other query; absent classes get an empty box and -10."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.backbone = ColourNameOracle(names)
        self.colours = self.backbone.colours
        self.provenance = {"format": "oracle-owl", "sha256": None}

    def describe(self):
        return dict(self.provenance)

    def text_queries(self, texts):
        return self.backbone.encode_text(self.backbone.tokenize(texts))

    def forward(self, pixels, *, query_sets, objectness=True):
        b, _, s, _ = pixels.shape
        k = len(self.colours)
        rgb = pixels.permute(0, 2, 3, 1) * 255.0
        feats = torch.zeros(b, 1, k, k + 1)
        boxes = torch.zeros(b, k, 4)
        for i in range(b):
            for c in range(k):
                mask = ((rgb[i] - self.colours[c]).abs() < 0.5).all(-1)
                if mask.any():
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                    boxes[i, c] = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]).float() / s
                    feats[i, 0, c, c] = 1.0
        flat = feats.reshape(b, k, k + 1)
        logits = torch.stack([20.0 * flat @ q.T - 10.0 for q in query_sets]).mean(0)
        return {"features": feats, "boxes": boxes, "logits": logits, "objectness": None}


class _WordCodec:
    """Words <-> ids (0 pad / BOS, 1 EOS): the decoder's codec API for the oracle below."""

    def __init__(self, words):
        self.words = ["<pad>", "</s>"] + sorted({w for text in words for w in text.lower().split()})
        self.bos = self.pad = 0
        self.eos = 1

    def encode(self, text):
        return [self.words.index(w) for w in text.lower().split() if w in self.words]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


class _ColourDecoder(torch.nn.Module):
    def __init__(self, colours, codec, names):
        super().__init__()
        self.colours, self.codec, self.names = colours, codec, names

    def image_tokens(self, pixels):
        return (pixels.mean(dim=(2, 3)) * 255.0)[:, None]  # [B, 1, 3]: the flat colour

    def generate(self, tokens, prompts, *, bos, eos, pad, max_new_tokens, use_cache=True):
        k = ((tokens[:, 0, None, :] - self.colours) ** 2).sum(-1).argmin(-1)
        return [self.codec.encode(self.names[int(i)])[:max_new_tokens] for i in k]


class ColourLit(torch.nn.Module):
    """A trained LiT-Decoder's API for the lit-decoder harness (`decoder.image_tokens / generate`,
    `codec`, `prompts`, `backbone.preprocess`) that names the class of a flat fixture colour."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.backbone = ColourNameOracle(names, image_size=(32, 32))
        self.codec = _WordCodec([n.replace("_", " ") for n in names] + names)
        self.decoder = _ColourDecoder(self.backbone.colours, self.codec, names)
        self.prompts = {"classification": "what is this", "captioning": "caption", "vqa": "{question}"}
        self.provenance = {"format": "oracle-lit", "sha256": None}

    def describe(self):
        return dict(self.provenance)
