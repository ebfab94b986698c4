"""Tiny detection datasets in the real COCO / LVIS json layouts (tests and examples).

Each image holds a few flat rectangles of distinct classes, class k in `class_colour(k)`, on black:
a model that reads colours knows every box exactly. PNG files (lossless) keep colours and edges
exact. Category ids are 2k + 1 (gaps, as COCO's), so a harness that confuses label index with
category id fails. The LVIS variant names images by `coco_url` only, as LVIS v1 does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from silc_bench.data.fixtures import class_colour


def write_coco_detection(data_root, num_images: int = 6, size: tuple[int, int] = (48, 64), num_classes: int = 12,
                         seed: int = 0) -> tuple[Path, Path]:
    """`coco/val2017/*.png`, `coco/annotations/instances_val2017.json` and (same boxes, LVIS-style)
    `coco/annotations/lvis_v1_val.json`; -> (coco json, lvis json)."""
    rng = np.random.default_rng(seed)
    root = Path(data_root) / "coco"
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    h, w = size
    images, anns = [], []
    for i in range(num_images):
        img = np.zeros((h, w, 3), np.uint8)
        classes = rng.choice(num_classes, size=int(rng.integers(1, 4)), replace=False)
        col = w // 3
        for slot, k in enumerate(classes):  # one rectangle per column third: no overlaps
            bw, bh = int(rng.integers(4, col - 1)), int(rng.integers(4, h - 2))
            x, y = slot * col + int(rng.integers(0, col - bw)), int(rng.integers(0, h - bh))
            img[y:y + bh, x:x + bw] = class_colour(int(k)).astype(np.uint8)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 2 * int(k) + 1,
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        name = f"{i + 1:012d}.png"
        Image.fromarray(img).save(root / "val2017" / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    cats = [{"id": 2 * k + 1, "name": f"thing_{k:03d}", "supercategory": "thing"} for k in range(num_classes)]
    coco = {"info": {"description": "silc-bench detection fixture"}, "images": images, "annotations": anns,
            "categories": cats}
    coco_path = root / "annotations" / "instances_val2017.json"
    coco_path.write_text(json.dumps(coco))
    present = {}
    for a in anns:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    lvis_images = []
    for im in images:
        absent = [c["id"] for c in cats if c["id"] not in present.get(im["id"], set())]
        lvis_images.append({"id": im["id"], "height": h, "width": w,
                            "coco_url": f"http://images.cocodataset.org/val2017/{im['file_name']}",
                            "neg_category_ids": absent[::2], "not_exhaustive_category_ids": []})
    lvis_cats = [{**c, "frequency": "rcf"[k % 3]} for k, c in enumerate(cats)]
    lvis_path = root / "annotations" / "lvis_v1_val.json"
    lvis_path.write_text(json.dumps({"images": lvis_images, "annotations": anns, "categories": lvis_cats}))
    return coco_path, lvis_path
