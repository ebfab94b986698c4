"""Tiny image-level datasets written in the real release layouts (tests and examples).

Every image is one flat colour, `class_colour(code)`, so a model that reads colours knows the
right answer: classification fixtures colour an image by its class, caption fixtures by the
image's position (each image its own "class"). The readers under test are the real ones.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from silc_bench.data.fixtures import class_colour


def flat_image(code: int, size: tuple[int, int]) -> np.ndarray:
    return np.broadcast_to(class_colour(code).astype(np.uint8), (*size, 3)).copy()


def write_cifar100(data_root, train_per_class: int = 3, test_per_class: int = 2, num_classes: int = 100,
                   label_names: list[str] | None = None) -> Path:
    """`cifar-100-python/{train,test,meta}` as the python release pickles them (numpy arrays in dicts)."""
    root = Path(data_root) / "cifar-100-python"
    root.mkdir(parents=True, exist_ok=True)
    names = label_names or [f"thing_{k:03d}" for k in range(num_classes)]
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [k for _ in range(per_class) for k in range(num_classes)]  # interleaved, as the release is shuffled
        data = np.stack([flat_image(k, (32, 32)).transpose(2, 0, 1).reshape(-1) for k in labels])
        blob = {b"filenames": [f"{i}.png".encode() for i in range(len(labels))], b"batch_label": split.encode(),
                b"fine_labels": labels, b"coarse_labels": [k // 5 for k in labels], b"data": data}
        (root / split).write_bytes(pickle.dumps(blob, protocol=2))
    meta = {b"fine_label_names": [n.encode() for n in names],
            b"coarse_label_names": [f"group_{k}".encode() for k in range(20)]}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_imagefolder(folder, classes: list[str], per_class: int, size=(20, 28), first_code: int = 0) -> Path:
    """`<folder>/<class>/<n>.JPEG`-style folders (ImageNet's ILSVRC layout); class k has colour k."""
    folder = Path(folder)
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(flat_image(first_code + k, size)).save(folder / name / f"img_{i:04d}.png")
    return folder


def write_karpathy(data_root, name: str = "coco", num_images: int = 6, captions_per_image: int = 5,
                   size=(24, 30)) -> tuple[Path, list[str]]:
    """Karpathy's json + images: COCO (`filepath` val2014) or Flickr30k (`flickr30k-images/`).

    Image i has colour i and captions naming `object i` (-> (root, the names in image order)).
    A train image is included to check the split filter.
    """
    root = Path(data_root) / ("coco" if name == "coco" else "flickr30k")
    folder = root / ("val2014" if name == "coco" else "flickr30k-images")
    folder.mkdir(parents=True, exist_ok=True)
    images, names = [], []
    for i in range(num_images + 1):
        split = "test" if i < num_images else "train"
        filename = f"COCO_val2014_{i:012d}.jpg" if name == "coco" else f"{1000 + i}.jpg"
        Image.fromarray(flat_image(i, size)).save(folder / filename, quality=100)
        thing = f"object {i}"
        if split == "test":
            names.append(thing)
        entry = {"filename": filename, "split": split, "imgid": i,
                 "sentences": [{"raw": f"A photo of {thing}, view {j}.", "tokens": []} for j in range(captions_per_image)]}
        if name == "coco":
            entry["filepath"] = "val2014"
        images.append(entry)
    annotations = "dataset_coco.json" if name == "coco" else "dataset_flickr30k.json"
    (root / annotations).write_text(json.dumps({"images": images, "dataset": name}))
    return root, names
