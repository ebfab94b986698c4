"""Open-vocabulary detection with OWL-ViT heads (SILC Table 4): scenic's evaluator protocol.

Per image (scenic owl_vit/evaluator.py, read for facts; docs/PROTOCOLS_T1_T4_T5.md A.3): resize so
the long side is `input_size` and pad bottom / right with `pad_value` (0.0, black); the detector's
class logits for every template (`owl_best_7`) are averaged, then sigmoid; the `top_k` (300) best
(patch, class) pairs over all of them are kept, so one box may carry several labels; no score
threshold, no NMS; boxes are un-padded to the original pixels. COCO is scored by COCOeval's rules,
LVIS by LVISEval's federated rules (silc_bench/metrics/detection.py).

Shard results keep only the top-k rows of each image (fixed-size tensors), so resumed, re-batched
and multi-process runs give the same detections; rank 0 alone gathers them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from silc_bench import registry
from silc_bench.data.detection import open_detection
from silc_bench.data.loading import iterate
from silc_bench.data.prompts import get_templates, owl_canonicalize, prompt_set_hash
from silc_bench.detection.owl import boxes_to_image_xywh, resize_with_pad, top_k_detections
from silc_bench.errors import UserError
from silc_bench.harness.base import EXAMPLES, INDEX, Harness, open_first
from silc_bench.harness.text import cache_key, text_settings
from silc_bench.hashing import sha256_json
from silc_bench.metrics.detection import coco_box_ap, detections_to_coco, lvis_box_ap

CPU_PIXELS_PER_FORWARD = 4 * 448 * 448  # a CPU batch of about four 448 px images


@dataclass
class OvDetSetup:
    protocol: dict
    queries: torch.Tensor  # [T, C, D] text query embeddings, one set per template
    details: dict = field(default_factory=dict)


class _PadResize:
    """Picklable worker transform: uint8 image -> normalised, padded square pixels."""

    def __init__(self, size: int, pad_value: float, preprocess):
        self.size, self.pad_value, self.preprocess = size, pad_value, preprocess

    def __call__(self, item: dict) -> dict:
        x = resize_with_pad(item["image"], self.size, self.pad_value)
        return {**item, "image": self.preprocess.normalize(x[None])[0]}


def query_texts(classnames: list[list[str]], templates: list[str], canonicalize: str | None) -> list[list[str]]:
    """[T][C] query texts: each class's first name (canonicalised as scenic does) in each template."""
    if canonicalize not in (None, "none", "owl"):
        raise UserError(f"unknown ov-det canonicalize {canonicalize!r}", fix="use owl or none")
    names = [owl_canonicalize(n[0]) if canonicalize == "owl" else n[0] for n in classnames]
    return [[t.format(n) for n in names] for t in templates]


class OpenVocabDetection(Harness):
    model_loader = "owl"

    def open_dataset(self, name, data_root, limit=None):
        def open_one(entry_name):
            entry = registry.dataset_entry(entry_name)
            if entry.get("kind") != "detection":
                raise UserError(f"dataset {entry_name!r} is not a detection dataset", fix="pick one of ov-det's")
            return open_detection(entry, data_root, limit)

        # the task spec's `dataset_entries` map a Table 4 column to datasets.yaml entries (coco -> coco_det)
        return open_first((self.task.get("dataset_entries") or {}).get(name) or [name], open_one)

    def setup(self, model, dataset, protocol, device, cache=None):
        templates = get_templates(protocol["templates"])
        if protocol.get("ensemble", "mean_logits") != "mean_logits":
            raise UserError(f"ov-det ensemble {protocol['ensemble']!r} is not offered", fix="use mean_logits")
        texts = query_texts(dataset.classnames, templates, protocol.get("canonicalize"))
        key = cache_key(model.backbone, "ov_det_queries/v1", texts=texts)

        @torch.inference_mode()
        def compute():
            return torch.stack([model.text_queries(t).float().cpu() for t in texts])

        queries = compute() if cache is None else cache.get_or_compute("text", key, compute)
        details = {"detector": model.describe(), "templates": protocol["templates"], "num_templates": len(templates),
                   "prompt_set_sha256": prompt_set_hash(templates), "queries_sha256": sha256_json(texts),
                   "text": text_settings(model.backbone),
                   "evaluator": ("LVISEval rules (federated, 300 per image across categories)" if dataset.federated
                                 else "COCOeval rules") + " via faster-coco-eval"}
        return OvDetSetup(protocol, queries.to(device), details)

    def default_batch_size(self, model, prepared, device) -> int:
        if str(device).startswith("cuda"):
            return 16
        return max(1, CPU_PIXELS_PER_FORWARD // int(prepared.protocol["input_size"]) ** 2)

    @torch.inference_mode()
    def evaluate(self, model, dataset, prepared, indices, *, device, batch_size=16, workers=0, progress=None):
        p = prepared.protocol
        k = int(p["top_k"])
        indices = list(indices)
        rows = {INDEX: [], "image_id": [], "scores": [], "labels": [], "boxes": []}
        batch: list[dict] = []

        def flush():
            pixels = torch.stack([b["image"] for b in batch]).to(device, non_blocking=True)
            out = model(pixels, query_sets=prepared.queries, objectness=False)  # logits: mean over templates
            logits = out["logits"]
            if p.get("class_agnostic"):  # one "object" class: each patch's best class score
                logits = logits.max(dim=-1, keepdim=True).values
            for i, item in enumerate(batch):
                scores, labels, boxes = top_k_detections(logits[i], out["boxes"][i].float(), k)
                n = len(scores)
                s = torch.full((k,), -1.0)
                lab = torch.full((k,), -1, dtype=torch.long)
                box = torch.zeros(k, 4)
                s[:n], lab[:n] = scores.cpu(), labels.cpu()
                box[:n] = boxes_to_image_xywh(boxes, item["height"], item["width"]).cpu()
                rows[INDEX].append(item["index"])
                rows["image_id"].append(item["image_id"])
                rows["scores"].append(s)
                rows["labels"].append(lab)
                rows["boxes"].append(box)
            if progress is not None:
                progress.update(len(batch))
            batch.clear()

        transform = _PadResize(int(p["input_size"]), float(p["pad_value"]), model.backbone.preprocess)
        for item in iterate(dataset, indices, workers=workers, device=device, transform=transform):
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        if not rows[INDEX]:
            return {EXAMPLES: {INDEX: torch.zeros(0, dtype=torch.long), "image_id": torch.zeros(0, dtype=torch.long),
                               "scores": torch.zeros(0, k), "labels": torch.zeros(0, k, dtype=torch.long),
                               "boxes": torch.zeros(0, k, 4)}}
        return {EXAMPLES: {INDEX: torch.tensor(rows[INDEX], dtype=torch.long),
                           "image_id": torch.tensor(rows["image_id"], dtype=torch.long),
                           "scores": torch.stack(rows["scores"]), "labels": torch.stack(rows["labels"]),
                           "boxes": torch.stack(rows["boxes"])}}

    def finalize(self, dataset, merged, prepared):
        ex = merged.get(EXAMPLES) or {}
        if len(ex.get(INDEX, [])) != len(dataset):
            raise RuntimeError(f"ov-det finalize: {len(ex.get(INDEX, []))} of {len(dataset)} images evaluated")
        keep = ex["labels"] >= 0
        image_ids = ex["image_id"][:, None].expand_as(ex["labels"])[keep]
        gt = dataset.ground_truth
        if prepared.protocol.get("class_agnostic"):  # localisation alone: every box one category, COCO rules
            cats = torch.ones_like(image_ids)
            gt = {**gt, "categories": [{"id": 1, "name": "object"}],
                  "annotations": [{**a, "category_id": 1} for a in gt["annotations"]]}
        else:
            cats = torch.tensor(dataset.category_ids, dtype=torch.long)[ex["labels"][keep]]
        dets = detections_to_coco(image_ids.numpy(), ex["boxes"][keep].numpy(), ex["scores"][keep].numpy(),
                                  cats.numpy())
        if dataset.federated and not prepared.protocol.get("class_agnostic"):
            metrics = lvis_box_ap(gt, dets)
        else:
            metrics = coco_box_ap(gt, dets)
        metrics.update(num_images=len(dataset), num_detections=len(dets))
        return metrics, {}
