"""Image classification datasets in their release layouts (zero-shot and few-shot, Table 1).

- `imagefolder`: one folder per class under a split folder, e.g. ImageNet's ILSVRC2012
  `val/n01440764/ILSVRC2012_val_00000293.JPEG` (the layout `valprep.sh` and torchvision's
  ImageFolder use). Class k is the k-th folder name in sorted order (the WordNet-id order of the
  standard ImageNet labels); class names come from a file in silc_bench/data/classnames/.
- `cifar_python`: CIFAR-100's "python version" release (`cifar-100-python/{train,test,meta}`),
  pickled dicts of numpy arrays. Read with an unpickler that admits only numpy's array
  reconstruction and plain containers, so a tampered file cannot run code; class names come from
  the release's own `meta` (`fine_label_names`).

Items: {"image": uint8 [3, H, W] RGB, "label": int, "index": int}.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from silc_bench import paths
from silc_bench.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_WHERE = paths.CONFIGS_DIR / "datasets.yaml"


def decode_rgb(path: Path, dataset: str, fix: str) -> torch.Tensor:
    """A file -> uint8 [3, H, W] RGB (PIL `convert("RGB")`), or a UserError naming the file."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UserError(f"dataset {dataset!r}: cannot read image ({type(e).__name__}: {e})", path=path, fix=fix)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class _LabelledFiles(torch.utils.data.Dataset):
    """Image files with a class label each (`samples`: (path, label)); items decoded on access."""

    name: str
    _fix: str

    def _keep(self, samples: list[tuple[Path, int]], limit: int | None) -> None:
        self.samples = samples if limit is None else samples[:limit]
        self.labels = [k for _, k in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        return {"image": decode_rgb(path, self.name, self._fix), "label": label, "index": index}


class ImageFolderDataset(_LabelledFiles):
    def __init__(self, name: str, folder: Path, classnames: list[list[str]], limit: int | None = None,
                 prepare: str = ""):
        self.name, self.root, self.classnames = name, folder, classnames
        self._fix = f"re-extract the dataset{f' ({prepare})' if prepare else ''}"
        if not folder.is_dir():
            raise UserError(f"dataset {name!r}: split folder not found", path=folder, fix=self._fix)
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if len(classes) != len(classnames):
            raise UserError(f"dataset {name!r}: {len(classes)} class folders, {len(classnames)} class names",
                            path=folder, fix=f"one folder per class ({len(classnames)}), as the release has")
        self.folders = classes
        samples = [(f, k) for k, c in enumerate(classes)
                   for f in sorted((folder / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not samples:
            raise UserError(f"dataset {name!r}: no images under the class folders", path=folder, fix=self._fix)
        self._keep(samples, limit)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes, nothing else that could be called."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how Python 3 protocol-2 pickles spell bytes (text -> latin-1)

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_pickle(path: Path) -> dict:
    try:
        data = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except FileNotFoundError:
        raise UserError("CIFAR file not found", path=path,
                        fix="extract cifar-100-python.tar.gz (the python version) under the data root")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"not a CIFAR python-release file ({type(e).__name__}: {e})", path=path,
                        fix="re-download cifar-100-python.tar.gz (the python version) and extract it")
    if not isinstance(data, dict):
        raise UserError("not a CIFAR python-release file (no dict inside)", path=path, fix="re-extract the release")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


class CifarDataset(torch.utils.data.Dataset):
    def __init__(self, name: str, folder: Path, split: str, label_key: str = "fine_labels",
                 names_key: str = "fine_label_names", limit: int | None = None):
        self.name, self.root = name, folder
        data = read_cifar_pickle(folder / split)
        meta = read_cifar_pickle(folder / "meta")
        try:
            pixels = np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            self.labels = [int(v) for v in data[label_key]]
            self.classnames = [[n.decode() if isinstance(n, bytes) else str(n)] for n in meta[names_key]]
        except (KeyError, ValueError) as e:
            raise UserError(f"CIFAR file lacks or mis-shapes {e}", path=folder / split, fix="re-extract the release")
        if len(self.labels) != len(pixels):
            raise UserError("CIFAR file has different numbers of images and labels", path=folder / split,
                            fix="re-extract the release")
        n = len(pixels) if limit is None else min(limit, len(pixels))
        self.pixels, self.labels = torch.from_numpy(pixels[:n].copy()), self.labels[:n]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.pixels[index], "label": self.labels[index], "index": index}


def sun397_name(path: str) -> str:
    """"/b/bakery/shop" -> "bakery shop": the letter folder dropped, parts and underscores spaced."""
    parts = [p for p in path.strip().split("/") if p][1:]
    return " ".join(parts).replace("_", " ")


class Sun397Dataset(_LabelledFiles):
    """SUN397 as released: `<root>/<letter>/<class>[/<sub>]/*.jpg`, the 397 classes in
    `ClassName.txt` ("/a/abbey", ...) and the standard splits as lists of image paths
    (`Partitions/Training_01.txt`, `Testing_01.txt`: 50 + 50 images per class)."""

    def _lines(self, path: Path) -> list[str]:
        try:
            return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise UserError(f"dataset {self.name!r}: cannot read {path.name} ({e})", path=path, fix=self._fix)

    def __init__(self, name: str, root: Path, split_file: Path, class_file: Path, limit: int | None = None,
                 prepare: str = ""):
        self.name, self.root = name, root
        self._fix = f"re-extract the dataset{f' ({prepare})' if prepare else ''}"
        classes, listed = (self._lines(f) for f in (class_file, split_file))
        index = {c: k for k, c in enumerate(classes)}
        self.classnames = [[sun397_name(c)] for c in classes]
        samples = []
        for rel in listed:
            folder = rel.rsplit("/", 1)[0]
            if folder not in index:
                raise UserError(f"dataset {name!r}: {rel} is in no class of {class_file.name}", path=split_file,
                                fix=self._fix)
            samples.append((root / rel.lstrip("/"), index[folder]))
        self._keep(samples, limit)


def open_split(entry: dict, split: str, data_root, limit: int | None = None):
    """Split `split` ("test" or "train") of a classification entry of configs/datasets.yaml."""
    from silc_bench.data.segmentation import CLASSNAMES_DIR, load_classnames

    name = entry["name"]
    folders = entry.get("splits") or {}
    if split not in folders:
        raise UserError(f"dataset {name!r} has no {split!r} split", path=_WHERE,
                        fix=f"add splits: {{{split}: FOLDER}} to its entry")
    root = paths.data_root(data_root) / entry["root"]
    if entry.get("generate"):
        from silc_bench.data import toy_image_level

        toy_image_level.ensure(entry, paths.data_root(data_root))
    if not root.is_dir():
        raise UserError(f"dataset {name!r} not found", path=root,
                        fix=f"put the release there ({entry.get('prepare', 'see configs/datasets.yaml')}), or point "
                            f"--data-root / ${paths.DATA_ENV} at the folder holding {entry['root']!r}")
    layout = entry.get("layout")
    if layout == "imagefolder":
        names = load_classnames(CLASSNAMES_DIR / entry["classnames"], entry.get("num_classes"))
        return ImageFolderDataset(name, root / folders[split], names, limit, entry.get("prepare", ""))
    if layout == "cifar_python":
        return CifarDataset(name, root, folders[split], limit=limit)
    if layout == "sun397":
        return Sun397Dataset(name, root, root / folders[split], root / entry["class_list"], limit,
                             entry.get("prepare", ""))
    raise UserError(f"dataset {name!r} has layout {layout!r}, not a classification layout", path=_WHERE,
                    fix="use imagefolder, cifar_python or sun397")
