"""Zero-shot classification (SILC Table 1): big_vision's discriminative classifier.

Protocol (google-research/big_vision evaluators/proj/image_text/discriminative_classifier.py and
prompt_engineering.py, read for facts): every (class alias, template) text is canonicalised
(`_` -> space, punctuation removed, lowercased, whitespace collapsed) and embedded; a class is the
mean of its L2-normalised text embeddings, re-normalised; the prediction is the argmax of the
normalised image embedding against them (no logit scale or bias needed for an argmax). Default
templates `clip_paper`: the 80 CLIP templates plus the bare name. Images go through each model's
own preprocessing (silc_bench/data/transforms.py), recorded.

Why it is fast: class embeddings are computed once per (model, class list, templates) and cached;
images are decoded and resized in DataLoader workers; shards keep only top-5 indices per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from silc_bench.data.classification import open_split
from silc_bench.data.prompts import canonicalize_text, get_templates, prompt_set_hash
from silc_bench.data.transforms import ImageTransform
from silc_bench.harness.base import EXAMPLES, INDEX, Harness
from silc_bench.harness.image_level import dataset_entry, image_embeddings
from silc_bench.harness.text import cache_key, text_embeddings, text_settings
from silc_bench.hashing import sha256_json

TOP_K = 5


def class_texts(classnames: list[list[str]], templates: list[str], canonicalize: bool,
                first_name_only: bool) -> list[list[str]]:
    """Per class, every text to embed: aliases x templates, canonicalised if asked."""
    if canonicalize:
        templates = [canonicalize_text(t, keep="{}") for t in templates]
    out = []
    for aliases in classnames:
        names = aliases[:1] if first_name_only else aliases
        if canonicalize:
            names = [canonicalize_text(n) for n in names]
        out.append([t.format(n) for n in names for t in templates])
    return out


def classifier_weights(model, texts_per_class: list[list[str]], device) -> torch.Tensor:
    """[C, D]: per class the mean of its L2-normalised text embeddings, re-normalised."""
    flat = [t for texts in texts_per_class for t in texts]
    emb = text_embeddings(model, flat, device)
    sizes = torch.tensor([len(t) for t in texts_per_class])
    owner = torch.repeat_interleave(torch.arange(len(texts_per_class)), sizes)
    sums = torch.zeros(len(texts_per_class), emb.shape[1]).index_add_(0, owner, emb)
    return F.normalize(sums / sizes[:, None].float(), dim=-1)


class ZeroShotClassification(Harness):
    def open_dataset(self, name, data_root, limit=None):
        return open_split(dataset_entry(name, ("classification",)), "test", data_root, limit)

    def setup(self, model, dataset, protocol, device, cache=None):
        templates = get_templates(protocol["templates"])
        texts = class_texts(dataset.classnames, templates, bool(protocol["canonicalize"]),
                            bool(protocol["first_class_name_only"]))
        key = cache_key(model, "zs_cls_classifier/v1", texts=texts)

        def compute():
            return classifier_weights(model, texts, device)

        weights = compute() if cache is None else cache.get_or_compute("text", key, compute)
        details = {
            "templates": protocol["templates"], "num_templates": len(templates),
            "prompt_set_sha256": prompt_set_hash(templates), "texts_sha256": sha256_json(texts),
            "num_texts": sum(len(t) for t in texts), "text": text_settings(model),
            "image_transform": ImageTransform(model.preprocess).describe(),
        }
        return _Prepared(weights.to(device), details)

    def evaluate(self, model, dataset, prepared, indices, *, device, batch_size=16, workers=0, progress=None):
        indices = list(indices)
        labels = torch.tensor([dataset.labels[i] for i in indices], dtype=torch.long)
        if not indices:
            return {EXAMPLES: {INDEX: torch.zeros(0, dtype=torch.long), "label": labels,
                               "topk": torch.zeros(0, TOP_K, dtype=torch.long)}}
        emb = F.normalize(image_embeddings(model, dataset, indices, device=device, batch_size=batch_size,
                                           workers=workers, progress=progress), dim=-1)
        scores = emb @ prepared.weights.cpu().T
        topk = scores.topk(min(TOP_K, scores.shape[1]), dim=1).indices
        return {EXAMPLES: {INDEX: torch.tensor(indices, dtype=torch.long), "label": labels, "topk": topk}}

    def finalize(self, dataset, merged, prepared):
        ex = merged[EXAMPLES]
        hits = ex["topk"] == ex["label"][:, None]
        top1, top5 = hits[:, 0].float(), hits.any(dim=1).float()
        names = [aliases[0] for aliases in dataset.classnames]
        per_class_acc = {}
        for k, name in enumerate(names):
            mask = ex["label"] == k
            if mask.any():
                per_class_acc[name] = 100.0 * float(top1[mask].mean())
        metrics = {"top1": 100.0 * float(top1.mean()), "top5": 100.0 * float(top5.mean()),
                   "mean_per_class_recall": sum(per_class_acc.values()) / max(len(per_class_acc), 1),
                   "num_examples": int(len(top1))}
        return metrics, {"accuracy": per_class_acc}


class _Prepared:
    def __init__(self, weights, details):
        self.weights, self.details = weights, details
