"""Image-text retrieval (SILC Table 1): COCO Karpathy 5k test, Flickr30k 1k test.

Protocol (google-research/big_vision evaluators/proj/image_text/retrieval.py and
image_text_retrieval.py, read for facts): every caption is its own text; similarity = normalised
image embedding . normalised text embedding; image->text R@k = share of images with at least one
of their captions among the k most similar texts; text->image R@k = share of captions whose image
is among the k most similar images; k in (1, 5, 10). Ranks are those of a stable descending sort
(ties broken by the lower index). Captions are fed to each model's tokenizer as written
(SigLIP's big_vision tokenizer lowercases and pads to 64; recorded in `details.text`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from silc_bench.data.captions import KarpathyCaptions
from silc_bench.data.prompts import canonicalize_text
from silc_bench.data.transforms import ImageTransform
from silc_bench.harness.base import EXAMPLES, INDEX, Harness
from silc_bench.harness.image_level import dataset_entry, image_embeddings
from silc_bench.harness.text import cache_key, text_embeddings, text_settings
from silc_bench.hashing import sha256_json

CHUNK = 1024  # rows of the similarity matrix at a time


def _stable_rank(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank (0 = first) of column `target[r]` in row r under a stable descending sort."""
    own = scores.gather(1, target[:, None])
    before = torch.arange(scores.shape[1], device=scores.device)[None, :] < target[:, None]
    return (scores > own).sum(1) + ((scores == own) & before).sum(1)


def recall_at_k(images: torch.Tensor, texts: torch.Tensor, caption_image: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """R@k both ways from normalised embeddings [Ni, D], [Nt, D] and caption -> image [Nt]."""
    # text -> image: the rank of each caption's image among all images.
    t2i = torch.cat([_stable_rank(texts[i:i + CHUNK] @ images.T, caption_image[i:i + CHUNK])
                     for i in range(0, len(texts), CHUNK)])
    # image -> text: the best rank among an image's captions.
    i2t = torch.full((len(images),), len(texts), dtype=torch.long)
    for i in range(0, len(texts), CHUNK):
        rows = caption_image[i:i + CHUNK]
        ranks = _stable_rank(images[rows] @ texts.T, torch.arange(i, i + len(rows)))
        i2t.scatter_reduce_(0, rows, ranks, reduce="amin")
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float((i2t < k).float().mean())
        out[f"t2i_R@{k}"] = 100.0 * float((t2i < k).float().mean())
    return out


class ImageTextRetrieval(Harness):
    def open_dataset(self, name, data_root, limit=None):
        return KarpathyCaptions(dataset_entry(name, ("captions",)), data_root, limit)

    def setup(self, model, dataset, protocol, device, cache=None):
        captions = [canonicalize_text(c) for c in dataset.captions] if protocol["canonicalize"] else dataset.captions
        key = cache_key(model, "retrieval_texts/v1", captions_sha256=sha256_json(captions))

        def compute():
            return text_embeddings(model, captions, device)

        texts = compute() if cache is None else cache.get_or_compute("text", key, compute)
        details = {"num_captions": len(captions), "captions_sha256": sha256_json(captions),
                   "canonicalize": bool(protocol["canonicalize"]), "text": text_settings(model),
                   "image_transform": ImageTransform(model.preprocess).describe()}
        return _Prepared(texts, details, protocol)

    def evaluate(self, model, dataset, prepared, indices, *, device, batch_size=16, workers=0, progress=None):
        indices = list(indices)
        emb = image_embeddings(model, dataset, indices, device=device, batch_size=batch_size, workers=workers,
                               progress=progress) if indices else torch.zeros(0, prepared.texts.shape[1])
        return {EXAMPLES: {INDEX: torch.tensor(indices, dtype=torch.long), "embedding": F.normalize(emb, dim=-1)}}

    def finalize(self, dataset, merged, prepared):
        ex = merged[EXAMPLES]
        if len(ex[INDEX]) != len(dataset):
            raise RuntimeError("retrieval needs the embedding of every image")
        caption_image = torch.tensor(dataset.caption_image, dtype=torch.long)
        metrics = recall_at_k(ex["embedding"], prepared.texts, caption_image, tuple(prepared.protocol["ks"]))
        metrics["num_images"], metrics["num_captions"] = len(dataset), len(dataset.captions)
        return metrics, {}


class _Prepared:
    def __init__(self, texts, details, protocol):
        self.texts, self.details, self.protocol = texts, details, protocol
