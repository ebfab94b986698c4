"""Box AP on COCO-format ground truth: COCO rules and LVIS's federated rules.

Both run faster-coco-eval (a C++ port of pycocotools that supports numpy 2; the official `lvis` API
crashes on numpy >= 1.24 and was never re-released). tests/test_detection_metrics.py holds it equal
to pycocotools' COCOeval and to the official lvis API (run with a numpy 2 shim) on fixtures.

LVIS (lvis-api eval.py / results.py): a detection of category c on image i counts only if c is
annotated on i or listed in i's `neg_category_ids`; unmatched detections of categories in i's
`not_exhaustive_category_ids` are ignored; at most 300 detections per image *across* categories
(lvis-api's `LVISResults(max_dets=300)`; faster-coco-eval's maxDets is per image and category, so
the cap is applied here first); AP is the mean over categories, APr / APc / APf over the
categories of each `frequency`.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

COCO_KEYS = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
             "APl": "AP_large"}
LVIS_KEYS = {**COCO_KEYS, "APr": "APr", "APc": "APc", "APf": "APf"}
LVIS_MAX_DETS = 300


def detections_to_coco(image_ids, boxes_xywh, scores, category_ids) -> list[dict]:
    """Arrays (one row per detection) -> COCO results json entries (plain Python numbers)."""
    image_ids = np.asarray(image_ids).reshape(-1)
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    cats = np.asarray(category_ids).reshape(-1)
    return [{"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
            for i, c, b, s in zip(image_ids, cats, boxes, scores)]


def cap_per_image(detections: list[dict], max_dets: int = LVIS_MAX_DETS) -> list[dict]:
    """The `max_dets` highest-scoring detections of each image, across categories (lvis-api's
    `LVISResults`: a stable sort by descending score, then the first `max_dets`)."""
    by_image: dict[int, list[dict]] = {}
    for d in detections:
        by_image.setdefault(d["image_id"], []).append(d)
    out = []
    for dets in by_image.values():
        out += sorted(dets, key=lambda d: -d["score"])[:max_dets]
    return out


def _evaluate(gt: dict, detections: list[dict], lvis: bool) -> dict:
    from faster_coco_eval import COCO, COCOeval_faster

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(gt, use_deepcopy=True)
        if not detections:
            return {k: 0.0 for k in (LVIS_KEYS if lvis else COCO_KEYS)}
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", lvis_style=lvis, print_function=lambda *a: None)
        if lvis:
            ev.params.maxDets = [LVIS_MAX_DETS]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats_as_dict
    keys = LVIS_KEYS if lvis else COCO_KEYS
    # -1 is pycocotools' "no ground truth in this slice"; report it as NaN, never as a score.
    return {ours: (float("nan") if stats[theirs] < 0 else 100.0 * float(stats[theirs]))
            for ours, theirs in keys.items()}


def coco_box_ap(gt: dict, detections: list[dict]) -> dict:
    """COCO box AP, AP50, AP75, APs/m/l (x100) as pycocotools' COCOeval (maxDets 100 per image and
    category, 101 recall points, IoU 0.50:0.05:0.95)."""
    return _evaluate(gt, detections, lvis=False)


def lvis_box_ap(gt: dict, detections: list[dict], max_dets: int = LVIS_MAX_DETS) -> dict:
    """LVIS v1 box AP, AP50, AP75, APs/m/l, APr, APc, APf (x100) under the federated rules above.
    `gt` needs `neg_category_ids` / `not_exhaustive_category_ids` per image and `frequency` per category."""
    missing = [c["id"] for c in gt.get("categories", []) if c.get("frequency") not in ("r", "c", "f")]
    if missing:
        raise ValueError(f"LVIS evaluation needs each category's frequency (r / c / f); categories {missing[:5]} "
                         f"have none")
    return _evaluate(gt, cap_per_image(detections, max_dets), lvis=True)
