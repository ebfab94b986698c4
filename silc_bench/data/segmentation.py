"""Semantic segmentation datasets read from their standard on-disk layouts (mmseg 1.x conventions).

One generic reader, driven by an entry of configs/datasets.yaml: a dataset is a folder under the
data root, images and labels paired by a key (two globs, or a split file listing keys), a class-name
file and a label mapping. Adding a dataset in a known layout is adding a yaml entry.

Decoding is PIL + numpy per item; the dataset object holds only paths and plain data, so it pickles
cheaply into DataLoader workers.
"""
from __future__ import annotations

import glob as _glob
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from silc_bench import paths
from silc_bench.errors import UserError

CLASSNAMES_DIR = Path(__file__).resolve().parent / "classnames"
LAYOUTS = ("glob", "split_file")
KEYS_FROM = ("both", "labels")
_REQUIRED = ("layout", "root", "images", "labels", "num_classes")


class DatasetSizeWarning(UserWarning):
    """The dataset folder holds a different number of images than the full split."""


@dataclass(frozen=True)
class Sample:
    name: str  # the pairing key, e.g. "ADE_val_00000001" or "frankfurt/frankfurt_000000_000294"
    image: Path
    label: Path


def load_classnames(path: str | Path, num_classes: int | None = None) -> list[list[str]]:
    """One class per line, comma-separated synonyms, in label order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read the class-name file: {e}", path=path,
                        fix="give an existing file with one class per line (comma-separated synonyms)")
    while lines and not lines[-1].strip():
        lines.pop()
    classes = []
    for i, line in enumerate(lines):
        names = [n.strip() for n in line.split(",")]
        if not line.strip() or not all(names):
            raise UserError(f"line {i + 1} of the class-name file has an empty name", path=path,
                            fix="write one class per line as `name[, synonym ...]`")
        classes.append(names)
    if num_classes is not None and len(classes) != num_classes:
        raise UserError(f"class-name file has {len(classes)} classes, the dataset has {num_classes}", path=path,
                        fix="list exactly one line per class, in label order")
    return classes


def split_pattern(pattern: str) -> tuple[Path, str]:
    """`images/validation/*.jpg` -> (Path("images/validation"), "*.jpg"): the fixed folder and the glob below it."""
    parts = Path(pattern).parts
    n_fixed = next((i for i, p in enumerate(parts) if _glob.has_magic(p)), len(parts))
    return Path(*parts[:n_fixed]), "/".join(parts[n_fixed:])


def open_dataset(name: str, data_root: str | Path | None = None, limit: int | None = None) -> "SegmentationDataset":
    """The dataset `name` of configs/datasets.yaml under `data_root` (else $SILC_BENCH_DATA, else ~/data)."""
    from silc_bench import registry

    entry = registry.dataset_entry(name)
    if entry.get("generate") == "toyworld":  # procedurally generated: written on first use
        from silc_bench.data import toyworld

        root = paths.data_root(data_root) / Path(entry["root"]).parent
        if not (root / "ADEChallengeData2016").exists():
            import sys

            print(f"silc-bench: generating the toy world dataset {name!r} (first use) in {root}; to write it "
                  f"elsewhere pass --data-root DIR or set ${paths.DATA_ENV}", file=sys.stderr, flush=True)
            toyworld.write_eval_split(root, world=entry.get("world", toyworld.DEFAULT_WORLD))
    return dataset_from_entry(entry, data_root, limit)


def dataset_from_entry(entry: dict, data_root: str | Path | None = None, limit: int | None = None) -> "SegmentationDataset":
    """A dataset from an entry dict (a datasets.yaml entry, or one built elsewhere, e.g. a toy world).

    Extra keys (e.g. `protocol`) are kept on `dataset.spec`. `classnames_path` (absolute or relative
    to the project dir) overrides `classnames` (a file name in silc_bench/data/classnames/).
    """
    return SegmentationDataset(entry, data_root=data_root, limit=limit)


def map_label(raw: np.ndarray, reduce_zero_label: bool, ignore_index: int = 255,
              ignore_values: tuple[int, ...] = ()) -> np.ndarray:
    """Raw on-disk label -> int64 training ids with `ignore_index` (mmseg's reduce_zero_label).

    `ignore_values` (raw values) become `ignore_index` first, e.g. PASCAL-Context-459's 459, the
    ignore label CAT-Seg registers next to the 65535 its converter writes for unlabelled pixels.
    """
    label = raw.astype(np.int64)
    if ignore_values:
        label[np.isin(label, ignore_values)] = ignore_index
    if reduce_zero_label:
        out = label - 1
        out[(label == 0) | (label == 255)] = 255
        label = out
    return label


class SegmentationDataset(torch.utils.data.Dataset):
    """Items: {"image": uint8 [3,H,W] RGB, "label": int64 [H,W] (`ignore_index`, default 255), "name": str, "index": int}."""

    def __init__(self, entry: dict, data_root: str | Path | None = None, limit: int | None = None):
        self.spec = dict(entry)
        self.name = str(self.spec.get("name", "dataset"))
        missing = [k for k in _REQUIRED if k not in self.spec]
        if not (self.spec.get("classnames") or self.spec.get("classnames_path")):
            missing.append("classnames")
        if missing:
            raise UserError(f"dataset entry {self.name!r} lacks {', '.join(missing)}",
                            path=paths.CONFIGS_DIR / "datasets.yaml",
                            fix="give layout, root, images, labels, num_classes and classnames (see the file's header)")
        if self.spec["layout"] not in LAYOUTS:
            raise UserError(f"dataset {self.name!r} has unknown layout {self.spec['layout']!r}",
                            path=paths.CONFIGS_DIR / "datasets.yaml", fix=f"use one of: {', '.join(LAYOUTS)}")
        for key in ("images", "labels"):
            if "*" not in str(self.spec[key]):
                raise UserError(f"dataset {self.name!r}: `{key}` pattern {self.spec[key]!r} has no `*`",
                                path=paths.CONFIGS_DIR / "datasets.yaml",
                                fix="write a glob (layout glob) or a pattern whose `*` is the split key (split_file)")
        if self.spec["layout"] == "split_file" and not self.spec.get("split"):
            raise UserError(f"dataset {self.name!r} has layout split_file but no `split` file",
                            path=paths.CONFIGS_DIR / "datasets.yaml", fix="give `split: <path under root>`")
        if self.spec.get("keys_from", "both") not in KEYS_FROM:
            raise UserError(f"dataset {self.name!r} has unknown keys_from {self.spec['keys_from']!r}",
                            path=paths.CONFIGS_DIR / "datasets.yaml", fix=f"use one of: {', '.join(KEYS_FROM)}")
        self.num_classes = int(self.spec["num_classes"])
        self.ignore_index = int(self.spec.get("ignore_index", 255))
        self.reduce_zero_label = bool(self.spec.get("reduce_zero_label", False))
        self.ignore_values = tuple(int(v) for v in self.spec.get("ignore_values", ()))
        self.classnames = load_classnames(self._classnames_file(), self.num_classes)
        self.data_root = paths.data_root(data_root)
        self.root = self.data_root / self.spec["root"]
        self._check_folder(self.root, what="folder")
        if self.spec["layout"] == "glob":
            samples = self._pair_globs()
        else:
            samples = self._read_split()
        if not samples:
            raise UserError(f"dataset {self.name!r} has no images matching {self.spec['images']!r}", path=self.root,
                            fix=self._fix())
        expected = self.spec.get("num_images")
        if limit is None and expected and len(samples) != int(expected):
            warnings.warn(f"dataset {self.name!r} at {self.root} has {len(samples)} images, the full split has "
                          f"{expected}: results are not comparable to published numbers", DatasetSizeWarning,
                          stacklevel=3)
        self.samples: list[Sample] = samples if limit is None else samples[: int(limit)]

    # ------------------------------------------------------------------ discovery
    def _classnames_file(self) -> Path:
        if self.spec.get("classnames_path"):
            p = Path(self.spec["classnames_path"]).expanduser()
            return p if p.is_absolute() else paths.PROJECT_DIR / p
        return CLASSNAMES_DIR / self.spec["classnames"]

    def _fix(self) -> str:
        """For a missing folder or file: where the reader looks, and how the data is made."""
        fix = (f"pass --data-root DIR or set ${paths.DATA_ENV} to the folder that contains "
               f"{self.spec['root']}/ (data root now: {self.data_root})")
        return fix + self._prep()

    def _incomplete(self) -> str:
        return f"the copy under {self.root} is incomplete: restore the missing files{self._prep()}"

    def _prep(self) -> str:
        prep = self.spec.get("prepare")
        return f"; the standard preparation: {prep}" if prep else ""

    def _check_folder(self, folder: Path, what: str) -> None:
        if not folder.is_dir():
            raise UserError(f"{what} of dataset {self.name!r} not found: expected {folder}", path=folder, fix=self._fix())

    def _scan(self, pattern: str, what: str) -> tuple[dict[str, Path], Path, str]:
        """Glob `pattern` under the root -> ({key: path}, fixed folder, suffix after the last `*`)."""
        fixed, rest = split_pattern(pattern)
        base = self.root / fixed
        suffix = pattern.rsplit("*", 1)[-1]
        self._check_folder(base, what=f"{what} folder")
        found = {}
        for p in base.glob(rest):
            if p.is_file():
                rel = p.relative_to(base).as_posix()
                found[rel[: len(rel) - len(suffix)] if suffix else rel] = p
        return found, base, suffix

    def _pair_globs(self) -> list[Sample]:
        images, image_base, image_suffix = self._scan(self.spec["images"], "image")
        labels, label_base, label_suffix = self._scan(self.spec["labels"], "label")
        if self.spec.get("keys_from", "both") == "labels":
            # detectron2 `load_sem_seg` style: the label folder defines the split; the image folder
            # may hold other splits' images too (e.g. VOC2010/JPEGImages for PASCAL-Context val).
            no_image = sorted(set(labels) - set(images))
            if no_image:
                k = no_image[0]
                raise UserError(f"dataset {self.name!r}: {len(no_image)} label(s) have no image, e.g. {labels[k]} "
                                f"(expected image {image_base / (k + image_suffix)})", path=labels[k],
                                fix=self._incomplete())
            return [Sample(k, images[k], labels[k]) for k in sorted(labels)]
        no_label = sorted(set(images) - set(labels))
        if no_label:
            k = no_label[0]
            raise UserError(f"dataset {self.name!r}: {len(no_label)} image(s) have no label, e.g. {images[k]} "
                            f"(expected label {label_base / (k + label_suffix)})", path=images[k], fix=self._incomplete())
        no_image = sorted(set(labels) - set(images))
        if no_image:
            k = no_image[0]
            raise UserError(f"dataset {self.name!r}: {len(no_image)} label(s) have no image, e.g. {labels[k]}",
                            path=labels[k], fix=self._incomplete())
        return [Sample(k, images[k], labels[k]) for k in sorted(images)]

    def _read_split(self) -> list[Sample]:
        split = self.root / self.spec["split"]
        try:
            keys = [ln.strip() for ln in split.read_text().splitlines() if ln.strip()]
        except OSError:
            raise UserError(f"split file of dataset {self.name!r} not found: expected {split}", path=split,
                            fix=self._fix())
        for what in ("images", "labels"):
            self._check_folder((self.root / self.spec[what]).parent, what=f"{what[:-1]} folder")
        samples = []
        for k in sorted(set(keys)):
            img = self.root / self.spec["images"].replace("*", k)
            lbl = self.root / self.spec["labels"].replace("*", k)
            for what, p in (("image", img), ("label", lbl)):
                if not p.is_file():
                    raise UserError(f"dataset {self.name!r}: {what} of {k!r} (listed in {split}) is missing: {p}",
                                    path=p, fix=self._incomplete())
            samples.append(Sample(k, img, lbl))
        return samples

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"SegmentationDataset({self.name!r}, {len(self)} images, {self.num_classes} classes, root={self.root})"

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        image = self._read_image(s.image)
        label = self._read(s.label, "label", self._label_array)
        if image.shape[:2] != label.shape:
            raise UserError(f"dataset {self.name!r}: image {s.image} is {image.shape[1]}x{image.shape[0]} but its label "
                            f"is {label.shape[1]}x{label.shape[0]}", path=s.label,
                            fix=f"re-create the label from the release{self._prep()}")
        raw = label
        label = self.map_label(raw)
        ok = ((label >= 0) & (label < self.num_classes)) | (label == self.ignore_index)
        if not ok.all():
            # Report the values as stored in the file (what the user can look up), not the mapped ones.
            bad = np.unique(raw[~ok]).tolist()
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            mapped = ""
            if self.reduce_zero_label:
                classes = np.unique(label[~ok]).tolist()
                mapped = (f" (after reduce_zero_label subtracts 1: class {', '.join(map(str, classes[:10]))}"
                          f"{' ...' if len(classes) > 10 else ''}, but the classes are 0..{self.num_classes - 1})")
            raise UserError(
                f"dataset {self.name!r}: stored label value{'s' if len(bad) > 1 else ''} {shown} in the file "
                f"{'are' if len(bad) > 1 else 'is'} outside the valid stored values {self._valid_stored()}{mapped}",
                path=s.label,
                fix=f"use the label files the entry expects ({self.spec['labels']}, "
                    f"reduce_zero_label={self.reduce_zero_label}){self._prep()}")
        return {
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "label": torch.from_numpy(label),
            "name": s.name,
            "index": index,
        }

    # How images are decoded, as the anchor each harness matches does (the harness sets it):
    #   "pil": PIL convert("RGB"), no EXIF orientation;
    #   "cv2": mmcv.imfrombytes(flag="color", backend="cv2"), i.e. cv2.imdecode(IMREAD_COLOR), which
    #          applies EXIF orientation (mmseg's LoadImageFromFile; zs-seg);
    #   "pil_exif": detectron2's read_image: PIL, EXIF orientation applied, convert("RGB") (ov-seg).
    decoder = "pil"

    def _read_image(self, path: Path) -> np.ndarray:
        if self.decoder == "cv2":
            import cv2

            def decode(file):
                array = cv2.imdecode(np.fromfile(file, dtype=np.uint8), cv2.IMREAD_COLOR)
                if array is None:
                    raise ValueError("cv2.imdecode could not decode it")
                return np.ascontiguousarray(array[..., ::-1])  # BGR -> RGB, as mmseg's bgr_to_rgb
            return self._read(path, "image", decode, with_pil=False)
        if self.decoder == "pil_exif":
            from PIL import ImageOps

            return self._read(path, "image", lambda im: np.array(ImageOps.exif_transpose(im).convert("RGB")))
        return self._read(path, "image", lambda im: np.array(im.convert("RGB")))

    def _read(self, path: Path, what: str, decode, with_pil: bool = True):
        try:
            if not with_pil:  # `decode` reads the file itself
                return decode(path)
            with Image.open(path) as im:
                im.load()
                return decode(im)
        except UserError:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise UserError(f"dataset {self.name!r}: cannot read {what} ({type(e).__name__}: {e})", path=path,
                            fix=f"re-extract or re-create this file{self._prep()}")

    def _valid_stored(self) -> str:
        """The label values a file may hold, as stored on disk (before `map_label`)."""
        n = self.num_classes
        if self.reduce_zero_label:  # stored k + 1 is class k; 0 and 255 are ignored
            text = f"1..{n} (class k stored as k + 1), 0 and 255 (ignored)"
        else:
            text = f"0..{n - 1} and {self.ignore_index} (ignored)"
        if self.ignore_values:
            text += f", {', '.join(map(str, self.ignore_values))} (ignored)"
        return text

    @staticmethod
    def _label_array(im: Image.Image) -> np.ndarray:
        if im.mode in ("L", "P"):  # P: VOC palette PNGs; the palette index is the class
            return np.asarray(im, dtype=np.uint8)
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):
            return np.asarray(im).astype(np.int64)
        raise ValueError(f"label image has mode {im.mode}; expected single-channel class indices (L, P or 16-bit)")

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        return map_label(raw, self.reduce_zero_label, self.ignore_index, self.ignore_values)
