"""Tiny segmentation datasets written in exactly the on-disk layouts of the real ones.

The layouts here are written from the datasets' own conventions (file names, folders, split files,
label encodings and the sibling files the real releases carry), not from configs/datasets.yaml, so
reading a fixture back checks the yaml entries against the real layouts.

Each `write_<dataset>(data_root, images, labels)` takes RGB uint8 images [H, W, 3] and label maps
of training ids (0..C-1; 255 = ignore, 65535 for ADE-847 and PC-459) and encodes them as the real
files do (e.g. ADE20K stores id + 1 with 0 = "other"; VOC stores id + 1 in a palette PNG with
0 = background and 255 borders; CAT-Seg's converters store training ids, uint16 TIFF past 255).
`write_segmentation_fixture` draws random blobs of classes and images whose colours follow them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = {"ade150": 150, "pc59": 59, "cityscapes": 19, "voc20": 20, "cocostuff171": 171,
               # CAT-Seg layouts / vocabularies (ov-seg); *_catseg*: same files as the name before it
               "ade847": 847, "pc459": 459, "pc59_catseg": 59, "pc59_catseg_mmseg": 59, "voc20_catseg": 20,
               "voc21": 21, "cocostuff171_train": 171, "cocostuff171_train_mmseg": 171}
ROOTS = {
    "ade150": "ADEChallengeData2016",
    "pc59": "VOCdevkit/VOC2010",
    "cityscapes": "cityscapes",
    "voc20": "VOCdevkit/VOC2012",
    "cocostuff171": "coco_stuff164k",
    "ade847": "ADE20K_2021_17_01",
    "pc459": "VOCdevkit/VOC2010",
    "pc59_catseg": "VOCdevkit/VOC2010",
    "pc59_catseg_mmseg": "VOCdevkit/VOC2010",
    "voc20_catseg": "VOCdevkit/VOC2012",
    "voc21": "VOCdevkit/VOC2012",
    "cocostuff171_train": "coco-stuff",
    "cocostuff171_train_mmseg": "coco_stuff164k",
}
# Training-id maps of datasets with more than 255 classes mark ignored pixels with 65535.
IGNORE = {"ade847": 65535, "pc459": 65535}
_CITIES = ("frankfurt", "lindau", "munster")  # the Cityscapes val cities


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, "RGB").save(path, "JPEG", quality=90)


def _save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, "PNG") if mode else Image.fromarray(array).save(path, "PNG")


def _plus_one(label: np.ndarray, void: int = 0) -> np.ndarray:
    """Training ids -> stored ids with 0 reserved ("other" / background) for ignored pixels."""
    raw = np.where(label == 255, void, label.astype(np.int64) + 1)
    return raw.astype(np.uint8)


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _borders(raw: np.ndarray, width: int = 1) -> np.ndarray:
    """Mark pixels next to a different stored id with 255, like VOC's void object outlines."""
    edge = np.zeros(raw.shape, bool)
    edge[:-1] |= raw[:-1] != raw[1:]
    edge[1:] |= raw[:-1] != raw[1:]
    edge[:, :-1] |= raw[:, :-1] != raw[:, 1:]
    edge[:, 1:] |= raw[:, :-1] != raw[:, 1:]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[:-1] |= edge[1:]
        grown[1:] |= edge[:-1]
        grown[:, :-1] |= edge[:, 1:]
        grown[:, 1:] |= edge[:, :-1]
        edge = grown
    out = raw.copy()
    out[edge] = 255
    return out


# ---------------------------------------------------------------------- one writer per dataset
def write_ade150(data_root, images, labels) -> Path:
    """ADEChallengeData2016/images/validation/ADE_val_%08d.jpg + annotations/validation/*.png (L, 0 = other)."""
    root = Path(data_root) / ROOTS["ade150"]
    for i, (img, lbl) in enumerate(zip(images, labels)):
        stem = f"ADE_val_{i + 1:08d}"
        _save_jpeg(root / "images/validation" / f"{stem}.jpg", img)
        _save_png(root / "annotations/validation" / f"{stem}.png", _plus_one(lbl), "L")
    # the release also holds the training split next to it
    _save_jpeg(root / "images/training/ADE_train_00000001.jpg", images[0])
    _save_png(root / "annotations/training/ADE_train_00000001.png", _plus_one(labels[0]), "L")
    return root


def write_pc59(data_root, images, labels) -> Path:
    """VOC2010 JPEGImages + SegmentationClassContext/*.png (L, 0 = background) + SegmentationContext split."""
    root = Path(data_root) / ROOTS["pc59"]
    stems = [f"2008_{2 * i + 2:06d}" for i in range(len(images))]
    for stem, img, lbl in zip(stems, images, labels):
        _save_jpeg(root / "JPEGImages" / f"{stem}.jpg", img)
        _save_png(root / "SegmentationClassContext" / f"{stem}.png", _plus_one(lbl), "L")
    # JPEGImages holds every VOC2010 image; a training one with its label, and one without any
    _save_jpeg(root / "JPEGImages/2008_900001.jpg", images[0])
    _save_png(root / "SegmentationClassContext/2008_900001.png", _plus_one(labels[0]), "L")
    _save_jpeg(root / "JPEGImages/2008_900003.jpg", images[0])
    split = root / "ImageSets/SegmentationContext"
    split.mkdir(parents=True, exist_ok=True)
    (split / "val.txt").write_text("".join(s + "\n" for s in stems))
    (split / "train.txt").write_text("2008_900001\n")
    return root


def write_voc20(data_root, images, labels) -> Path:
    """VOC2012 JPEGImages + SegmentationClass/*.png (palette; 0 = background, 255 = borders) + split."""
    root = Path(data_root) / ROOTS["voc20"]
    palette = _voc_palette()
    stems = [f"2007_{33 + 10 * i:06d}" for i in range(len(images))]

    def save_label(path, lbl):
        im = Image.fromarray(_borders(_plus_one(lbl)), "P")
        im.putpalette(palette)
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, "PNG")

    for stem, img, lbl in zip(stems, images, labels):
        _save_jpeg(root / "JPEGImages" / f"{stem}.jpg", img)
        save_label(root / "SegmentationClass" / f"{stem}.png", lbl)
    _save_jpeg(root / "JPEGImages/2007_900032.jpg", images[0])
    save_label(root / "SegmentationClass/2007_900032.png", labels[0])
    _save_jpeg(root / "JPEGImages/2007_900039.jpg", images[0])  # detection-only image: no mask
    split = root / "ImageSets/Segmentation"
    split.mkdir(parents=True, exist_ok=True)
    (split / "val.txt").write_text("".join(s + "\n" for s in stems))
    (split / "train.txt").write_text("2007_900032\n")
    (split / "trainval.txt").write_text("".join(s + "\n" for s in sorted(stems + ["2007_900032"])))
    return root


def write_cityscapes(data_root, images, labels) -> Path:
    """leftImg8bit/val/<city>/*_leftImg8bit.png + gtFine/val/<city>/*_gtFine_{labelTrainIds,labelIds,...}."""
    root = Path(data_root) / ROOTS["cityscapes"]
    for i, (img, lbl) in enumerate(zip(images, labels)):
        city = _CITIES[i % len(_CITIES)]
        stem = f"{city}_{i // len(_CITIES):06d}_{19 + 57 * i:06d}"
        _save_png(root / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png", img, "RGB")
        gt = root / "gtFine/val" / city
        _save_png(gt / f"{stem}_gtFine_labelTrainIds.png", lbl.astype(np.uint8), "L")
        # siblings written by the release / cityscapesscripts: raw ids (up to 33), colours, instances
        _save_png(gt / f"{stem}_gtFine_labelIds.png", np.where(lbl == 255, 0, lbl.astype(np.int64) + 7).astype(np.uint8), "L")
        _save_png(gt / f"{stem}_gtFine_color.png", np.dstack([img, np.full(lbl.shape, 255, np.uint8)]), "RGBA")
        _save_png(gt / f"{stem}_gtFine_instanceIds.png", np.where(lbl == 255, 0, (lbl.astype(np.int64) + 7) * 1000).astype(np.uint16))
        (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps(
            {"imgHeight": int(lbl.shape[0]), "imgWidth": int(lbl.shape[1]), "objects": []}))
    return root


def write_cocostuff171(data_root, images, labels) -> Path:
    """coco_stuff164k/images/val2017/%012d.jpg + annotations/val2017/%012d_labelTrainIds.png (+ raw maps)."""
    root = Path(data_root) / ROOTS["cocostuff171"]
    for i, (img, lbl) in enumerate(zip(images, labels)):
        stem = f"{139 + 146 * i:012d}"
        _save_jpeg(root / "images/val2017" / f"{stem}.jpg", img)
        ann = root / "annotations/val2017"
        _save_png(ann / f"{stem}_labelTrainIds.png", lbl.astype(np.uint8), "L")
        # the stuffthingmaps file the converter reads sits next to it (raw ids, up to 181)
        _save_png(ann / f"{stem}.png", np.where(lbl == 255, 255, np.minimum(lbl.astype(np.int64) + 11, 181)).astype(np.uint8), "L")
    return root


def _save_uint16_tiff(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint16)).save(path, "TIFF")  # mode I;16, as CAT-Seg's


def _pc_stems(n: int) -> list[str]:
    return [f"2008_{2 * i + 2:06d}" for i in range(n)]  # the ids write_pc59 uses


def write_ade847(data_root, images, labels) -> Path:
    """CAT-Seg prepare_ade20k_full.py output: ADE20K_2021_17_01/images_detectron2/validation/*.jpg +
    annotations_detectron2/validation/*.tif (uint16 trainIds 0..846, 65535 = any other id)."""
    root = Path(data_root) / ROOTS["ade847"]
    for i, (img, lbl) in enumerate(zip(images, labels)):
        stem = f"ADE_val_{i + 1:08d}"
        _save_jpeg(root / "images_detectron2/validation" / f"{stem}.jpg", img)
        _save_uint16_tiff(root / "annotations_detectron2/validation" / f"{stem}.tif", lbl)
    # the release it was made from: images/ADE/<split>/<scene>/<name>.jpg + _seg.png (R/10*256+G = object
    # class id), index_ade20k.pkl; and the training folders the script creates but leaves empty
    release = root / "images/ADE/validation/abbey"
    _save_jpeg(release / "ADE_val_00000001.jpg", images[0])
    ids = np.where(labels[0] == 65535, 0, labels[0].astype(np.int64) + 1)
    _save_png(release / "ADE_val_00000001_seg.png",
              np.dstack([(ids // 256) * 10, ids % 256, np.zeros_like(ids)]).astype(np.uint8), "RGB")
    (root / "index_ade20k.pkl").write_bytes(b"")
    for sub in ("images_detectron2/training", "annotations_detectron2/training"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def write_pc459(data_root, images, labels) -> Path:
    """CAT-Seg prepare_pascal_context_459.py output: VOC2010/annotations_detectron2/pc459_val/<id>.tif
    (uint16 label id - 1, unlabelled 65535) next to VOC2010/JPEGImages (all VOC2010 images)."""
    root = Path(data_root) / ROOTS["pc459"]
    stems = _pc_stems(len(images))
    for stem, img, lbl in zip(stems, images, labels):
        _save_jpeg(root / "JPEGImages" / f"{stem}.jpg", img)
        _save_uint16_tiff(root / "annotations_detectron2/pc459_val" / f"{stem}.tif", lbl)
    _save_jpeg(root / "JPEGImages/2008_900001.jpg", images[0])  # a training image: no val label
    (root / "pascalcontext_val.txt").write_text("".join(s + "\n" for s in stems))
    (root / "labels.txt").write_text("1: accordion\n2: aeroplane\n")  # (truncated) id: name list
    (root / "trainval").mkdir(parents=True, exist_ok=True)  # the .mat sources (not written here)
    return root


def write_pc59_catseg(data_root, images, labels) -> Path:
    """CAT-Seg prepare_pascal_context_59.py output: VOC2010/annotations_detectron2/pc59_val/<id>.png
    (uint8 0..58, 255 = background) next to VOC2010/JPEGImages."""
    root = Path(data_root) / ROOTS["pc59_catseg"]
    stems = _pc_stems(len(images))
    for stem, img, lbl in zip(stems, images, labels):
        _save_jpeg(root / "JPEGImages" / f"{stem}.jpg", img)
        _save_png(root / "annotations_detectron2/pc59_val" / f"{stem}.png", lbl.astype(np.uint8), "L")
    _save_jpeg(root / "JPEGImages/2008_900001.jpg", images[0])
    (root / "trainval_merged.json").write_text(json.dumps({"images": [], "annos_segmentation": []}))
    return root


def write_voc21(data_root, images, labels) -> Path:
    """VOC2012 release (as write_voc20) with background as class 0: training ids are stored as they are."""
    root = Path(data_root) / ROOTS["voc21"]
    palette = _voc_palette()
    stems = [f"2007_{33 + 10 * i:06d}" for i in range(len(images))]
    for stem, img, lbl in zip(stems, images, labels):
        _save_jpeg(root / "JPEGImages" / f"{stem}.jpg", img)
        im = Image.fromarray(_borders(lbl.astype(np.uint8)), "P")
        im.putpalette(palette)
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        im.save(root / "SegmentationClass" / f"{stem}.png", "PNG")
    _save_jpeg(root / "JPEGImages/2007_900039.jpg", images[0])  # detection-only image: no mask
    split = root / "ImageSets/Segmentation"
    split.mkdir(parents=True, exist_ok=True)
    (split / "val.txt").write_text("".join(s + "\n" for s in stems))
    return root


def write_cocostuff171_train(data_root, images, labels) -> Path:
    """CAT-Seg prepare_coco_stuff.py output: coco-stuff/images/train2017/%012d.jpg +
    annotations_detectron2/train2017/%012d.png (trainIds, 255) next to the raw annotations/train2017/."""
    root = Path(data_root) / ROOTS["cocostuff171_train"]
    for i, (img, lbl) in enumerate(zip(images, labels)):
        stem = f"{9 + 16 * i:012d}"
        _save_jpeg(root / "images/train2017" / f"{stem}.jpg", img)
        _save_png(root / "annotations_detectron2/train2017" / f"{stem}.png", lbl.astype(np.uint8), "L")
        _save_png(root / "annotations/train2017" / f"{stem}.png",
                  np.where(lbl == 255, 255, np.minimum(lbl.astype(np.int64) + 11, 181)).astype(np.uint8), "L")
    return root


def write_cocostuff171_train_mmseg(data_root, images, labels) -> Path:
    """mmseg layout of the train split: coco_stuff164k/images/train2017 + annotations/train2017/*_labelTrainIds.png."""
    root = Path(data_root) / ROOTS["cocostuff171_train_mmseg"]
    for i, (img, lbl) in enumerate(zip(images, labels)):
        stem = f"{9 + 16 * i:012d}"
        _save_jpeg(root / "images/train2017" / f"{stem}.jpg", img)
        _save_png(root / "annotations/train2017" / f"{stem}_labelTrainIds.png", lbl.astype(np.uint8), "L")
    return root


WRITERS = {
    "ade150": write_ade150,
    "pc59": write_pc59,
    "cityscapes": write_cityscapes,
    "voc20": write_voc20,
    "cocostuff171": write_cocostuff171,
    "ade847": write_ade847,
    "pc459": write_pc459,
    "pc59_catseg": write_pc59_catseg,
    "pc59_catseg_mmseg": write_pc59,
    "voc20_catseg": write_voc20,
    "voc21": write_voc21,
    "cocostuff171_train": write_cocostuff171_train,
    "cocostuff171_train_mmseg": write_cocostuff171_train_mmseg,
}


# ---------------------------------------------------------------------- random content
def class_colour(c: int) -> np.ndarray:
    """A fixed colour per class, so images correlate with labels."""
    return np.random.default_rng(1000 + int(c)).integers(0, 256, 3).astype(np.float32)


def random_sample(num_classes: int, size: tuple[int, int], rng: np.random.Generator,
                  num_blobs: int = 4, ignore_fraction: float = 0.05, ignore: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """(image [H,W,3] uint8, label [H,W] training ids with `ignore`) made of ellipses and boxes.

    Labels are uint8, or uint16 when classes or `ignore` exceed 255 (e.g. ADE-847 with 65535)."""
    h, w = size
    dtype = np.uint8 if max(num_classes - 1, ignore) <= 255 else np.uint16
    label = np.full((h, w), rng.integers(num_classes), dtype)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(num_blobs):
        c = rng.integers(num_classes)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.15, 0.45) * h, rng.uniform(0.15, 0.45) * w
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        label[mask] = c
    if ignore_fraction > 0:  # an unlabelled box
        bh, bw = max(1, int(h * ignore_fraction * 2)), max(1, int(w * ignore_fraction * 2))
        y0, x0 = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
        label[y0:y0 + bh, x0:x0 + bw] = ignore
    colours = np.stack([class_colour(c) for c in range(num_classes)] + [np.zeros(3, np.float32)])
    image = colours[np.where(label == ignore, num_classes, label)] + rng.normal(0, 12, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def draw_samples(name: str, num_images: int = 3, size: tuple[int, int] = (48, 64), seed: int = 0):
    """The (image, training-id label) pairs `write_segmentation_fixture` writes for these arguments."""
    if name not in WRITERS:
        raise ValueError(f"no fixture writer for {name!r}; known: {', '.join(WRITERS)}")
    rng = np.random.default_rng(seed)
    # VOC images are mostly background (stored 0, ignored): give it a big unlabelled box
    fraction = 0.2 if name in ("voc20", "voc20_catseg") else 0.05
    return [random_sample(NUM_CLASSES[name], size, rng, ignore_fraction=fraction, ignore=IGNORE.get(name, 255))
            for _ in range(num_images)]


def write_segmentation_fixture(name: str, data_root, num_images: int = 3, size: tuple[int, int] = (48, 64),
                               seed: int = 0) -> Path:
    """Write a tiny `name` dataset under `data_root` in its real layout; return the dataset root."""
    samples = draw_samples(name, num_images, size, seed)
    return WRITERS[name](data_root, [s[0] for s in samples], [s[1] for s in samples])
