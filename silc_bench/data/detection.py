"""Detection datasets in COCO json format (ov-det, SILC Table 4): COCO val2017, LVIS v1 val, the toy world.

An entry of configs/datasets.yaml with `kind: detection` names an annotation json (`annotations`,
under `root`) and an image folder (`images`, under `root`). An image's file is `file_name`, or for
LVIS (whose json has no file names) the last two parts of its `coco_url` ("val2017/x.jpg"), under
the image folder. `federated: true` marks LVIS-style ground truth (neg / not-exhaustive category
lists per image, a frequency per category), evaluated under LVIS's rules.

Classes are the json's categories in id order: label k is the k-th category, mapped back to its
own id for evaluation (COCO's ids have gaps; scenic's `label + 1` does not match them).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from silc_bench import paths
from silc_bench.data.classification import decode_rgb
from silc_bench.errors import UserError
from silc_bench.hashing import sha256_file, sha256_json

_WHERE = paths.CONFIGS_DIR / "datasets.yaml"
_ROOT_FIELDS = ("info", "categories", "licenses")


class DetectionDataset(torch.utils.data.Dataset):
    """Items: {"image": uint8 [3, H, W], "index", "image_id", "height", "width"}."""

    def __init__(self, name: str, spec: dict, ann_path: Path, image_dir: Path, limit: int | None = None):
        self.name, self.spec, self.root = name, spec, image_dir
        self.ann_path = ann_path
        self._fix = f"re-create the dataset ({spec.get('prepare', 'see configs/datasets.yaml')})"
        try:
            gt = json.loads(ann_path.read_text())
            images = sorted(gt["images"], key=lambda im: im["id"])
            categories = sorted(gt["categories"], key=lambda c: c["id"])
            annotations = gt.get("annotations", [])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"dataset {name!r}: cannot read the annotation json ({type(e).__name__}: {e})",
                            path=ann_path, fix=self._fix) from e
        self.federated = bool(spec.get("federated"))
        if self.federated:
            bad = [im["id"] for im in images if "neg_category_ids" not in im or "not_exhaustive_category_ids" not in im]
            bad += [c["id"] for c in categories if c.get("frequency") not in ("r", "c", "f")]
            if bad:
                raise UserError(f"dataset {name!r} is federated (LVIS-style) but its json lacks neg / not-exhaustive "
                                f"category lists or frequencies (first ids: {bad[:3]})", path=ann_path,
                                fix="use the LVIS v1 json as released, or drop `federated: true` from the entry")
        if limit is not None:
            images = images[:limit]
        kept = {im["id"] for im in images}
        self.images = images
        self.category_ids = [int(c["id"]) for c in categories]
        self.classnames = [[c["name"]] for c in categories]
        self.num_classes = len(categories)
        self.frequency = [c.get("frequency") for c in categories]
        self.ground_truth = {**{k: gt[k] for k in _ROOT_FIELDS if k in gt}, "images": images,
                             "annotations": [a for a in annotations if a["image_id"] in kept]}
        self._sha256 = sha256_file(ann_path)

    def image_path(self, image: dict) -> Path:
        if image.get("file_name"):
            return self.root / image["file_name"]
        url = image.get("coco_url")
        if not url:
            raise UserError(f"dataset {self.name!r}: image {image.get('id')} has neither file_name nor coco_url",
                            path=self.ann_path, fix=self._fix)
        return self.root.joinpath(*url.split("/")[-2:])

    def describe(self) -> dict:
        return {"annotations": self.spec["annotations"], "annotations_sha256": self._sha256,
                "federated": self.federated, "num_annotations": len(self.ground_truth["annotations"]),
                "category_ids_sha256": sha256_json(self.category_ids)}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        im = self.images[index]
        image = decode_rgb(self.image_path(im), self.name, self._fix)
        return {"image": image, "index": index, "image_id": int(im["id"]), "height": int(image.shape[1]),
                "width": int(image.shape[2])}


def open_detection(entry: dict, data_root, limit: int | None = None) -> DetectionDataset:
    root = paths.data_root(data_root) / entry["root"]
    if entry.get("generate"):
        ensure_toy(entry, paths.data_root(data_root))
    ann_path = root / entry["annotations"]
    if not ann_path.is_file():
        raise UserError(f"dataset {entry['name']!r} not found (no annotation json)", path=ann_path,
                        fix=f"put the release there ({entry.get('prepare', 'see configs/datasets.yaml')}), or point "
                            f"--data-root / ${paths.DATA_ENV} at the folder holding {entry['root']!r}")
    image_dir = root / entry.get("images", ".")
    if not image_dir.is_dir():
        raise UserError(f"dataset {entry['name']!r}: image folder not found", path=image_dir,
                        fix=entry.get("prepare", "see configs/datasets.yaml"))
    return DetectionDataset(entry["name"], entry, ann_path, image_dir, limit)


# ---- the toy world ------------------------------------------------------------------------------
def toy_federated(coco: dict, seed: int = 0, negative_fraction: float = 0.5,
                  not_exhaustive_prob: float = 0.1) -> dict:
    """An LVIS-style copy of a toy COCO split: per image a random `negative_fraction` of the absent
    classes as verified negatives and each present class marked not exhaustive with probability
    `not_exhaustive_prob` (the toy world is fully labelled; this only exercises the federated
    rules); frequency "r" for the classes held out of detection training (`unseen`), and for the
    others "f" / "c" for the more / less frequent half by image count."""
    rng = np.random.default_rng(seed)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    present: dict[int, set] = {}
    for a in coco["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    images = []
    for im in sorted(coco["images"], key=lambda im: im["id"]):
        here = sorted(present.get(im["id"], set()))
        absent = [c["id"] for c in cats if c["id"] not in here]
        neg = sorted(int(c) for c in rng.permutation(absent)[: int(round(len(absent) * negative_fraction))])
        ne = [c for c in here if rng.random() < not_exhaustive_prob]
        images.append({**im, "neg_category_ids": neg, "not_exhaustive_category_ids": ne})
    counts = {c["id"]: sum(c["id"] in s for s in present.values()) for c in cats}
    seen = sorted((c for c in cats if not c.get("unseen")), key=lambda c: (-counts[c["id"]], c["id"]))
    frequent = {c["id"] for c in seen[: len(seen) // 2]}
    categories = [{**c, "frequency": "r" if c.get("unseen") else "f" if c["id"] in frequent else "c",
                   "image_count": counts[c["id"]]} for c in cats]
    info = {**coco.get("info", {}), "federated": {"seed": seed, "negative_fraction": negative_fraction,
                                                  "not_exhaustive_prob": not_exhaustive_prob}}
    return {"info": info, "images": images, "annotations": coco["annotations"], "categories": categories}


def ensure_toy(entry: dict, data_root: Path) -> None:
    """Write the toy detection split an entry names (`generate: toyworld_det`) if not there yet."""
    from silc_bench.data import toyworld

    root = Path(data_root) / entry["root"]
    world = entry.get("world", toyworld.DEFAULT_WORLD)
    ann = root / "annotations" / "instances_val.json"
    if not (root / "toyworld_val.json").exists():
        print(f"silc-bench: generating the toy detection split {entry['name']!r} (first use) in {root}; to write "
              f"it elsewhere pass --data-root DIR or set ${paths.DATA_ENV}", file=sys.stderr, flush=True)
    toyworld.write_detection_split(root, "val", world=world)
    if entry.get("federated"):
        lvis = root / entry["annotations"]
        if not lvis.exists() or lvis.stat().st_mtime < ann.stat().st_mtime:
            data = toy_federated(json.loads(ann.read_text()))
            tmp = lvis.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(lvis)
