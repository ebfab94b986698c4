"""Image-caption datasets for retrieval in Karpathy's split format (COCO 5k test, Flickr30k 1k test).

`dataset_coco.json` / `dataset_flickr30k.json` (Karpathy & Fei-Fei's splits, the ones every
retrieval paper reports): {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}.
Images are read from `<root>/<filepath>/<filename>` (COCO: `val2014/...`) or `<root>/<images
folder>/<filename>` (Flickr30k). Every caption is its own text; captions are kept as written
(`raw`); the harness canonicalises them if the protocol says so.

Items: {"image": uint8 [3, H, W], "index": int}; `captions` and `caption_image` (caption ->
image index) are attributes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from silc_bench import paths
from silc_bench.data.classification import decode_rgb
from silc_bench.errors import UserError


class KarpathyCaptions(torch.utils.data.Dataset):
    def __init__(self, entry: dict, data_root, limit: int | None = None):
        self.name = entry["name"]
        self.spec = dict(entry)
        root = paths.data_root(data_root) / entry["root"]
        if entry.get("generate"):
            from silc_bench.data import toy_image_level

            toy_image_level.ensure(entry, paths.data_root(data_root))
        self.root = root
        ann = root / entry["annotations"]
        fix = f"put Karpathy's {Path(entry['annotations']).name} there ({entry.get('prepare', 'see configs/datasets.yaml')})"
        try:
            data = json.loads(ann.read_text())
        except FileNotFoundError:
            raise UserError(f"dataset {self.name!r}: caption file not found", path=ann, fix=fix)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"dataset {self.name!r}: caption file is not valid JSON ({e})", path=ann, fix=fix)
        split = entry.get("split", "test")
        try:
            images = [im for im in data["images"] if im["split"] == split]
            if limit is not None:
                images = images[:limit]
            self.files = [root / (im.get("filepath") or entry.get("images", "")) / im["filename"] for im in images]
            self.captions, self.caption_image = [], []
            for i, im in enumerate(images):
                for sentence in im["sentences"]:
                    self.captions.append(str(sentence["raw"]).strip())
                    self.caption_image.append(i)
        except (KeyError, TypeError) as e:
            raise UserError(f"dataset {self.name!r}: caption file lacks {e} (not Karpathy's format)", path=ann, fix=fix)
        if not images:
            raise UserError(f"dataset {self.name!r}: no images of split {split!r} in the caption file", path=ann, fix=fix)
        self._fix = f"re-extract this image ({entry.get('prepare', 'see configs/datasets.yaml')})"

    def describe(self) -> dict:
        return {"num_captions": len(self.captions), "split": self.spec.get("split", "test"),
                "annotations": self.spec["annotations"]}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        return {"image": decode_rgb(self.files[index], self.name, self._fix), "index": index}
