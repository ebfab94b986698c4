"""Toy-world splits for the image-level tasks of Table 1, in the real layouts.

- classification (`toyworld_cls`): ImageNet's folder layout, `cls/{train,val}/<class>/<n>.png`;
  each image is a toy scene with exactly one thing object on a stuff background, labelled with
  that object's class (24 thing classes; zero-shot and few-shot).
- captions (`toyworld_captions`): Karpathy's json format, 5 captions per image composed the way
  pretraining captions are (same vocabulary), image-to-text and text-to-image retrieval.

Scenes come from the toy world's own streams (classification train: "train"; evaluation:
"validation"), so no evaluation image is a pretraining image. Written once, atomically per file,
with a manifest of the parameters; `ensure` rewrites a split whose manifest differs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from silc_bench import paths
from silc_bench.data import toyworld

VERSION = 1
SIZE = 64  # the toy models' input size: image-level tasks see whole scenes at native resolution
CLS_COUNTS = {"train": 1200, "val": 480}
CAPTION_IMAGES = 500
CAPTIONS_PER_IMAGE = 5
_CAPTION_STREAM = 7  # rng stream of the extra captions (not a scene stream)


def manifest_matches(manifest: Path, params: dict) -> bool:
    """True when a split's manifest records exactly `params` (the split is complete and current)."""
    try:
        return json.loads(manifest.read_text()) == params
    except (OSError, json.JSONDecodeError):
        return False


def single_object_scene(index: int, split: str, seed: int = 0, world: int = toyworld.DEFAULT_WORLD):
    """A scene with one thing object; -> (image uint8 [H, W, 3], thing class name)."""
    scene = toyworld.render(index, seed=seed, size=SIZE, split=split, max_objects=1, world=world)
    return scene.image, toyworld.CLASSES[scene.instances[0].class_id]


def write_classification(root: Path, seed: int = 0, world: int = toyworld.DEFAULT_WORLD) -> Path:
    out = root / "cls"
    params = {"version": VERSION, "world": toyworld.get_world(world).version, "seed": seed, "size": SIZE,
              "counts": CLS_COUNTS}
    if manifest_matches(out / "manifest.json", params):
        return out
    for folder, stream in (("train", "train"), ("val", "validation")):
        for name in toyworld.THING_CLASSES:  # every class folder exists, even if a class drew no image
            (out / folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(CLS_COUNTS[folder]):
            image, name = single_object_scene(i, stream, seed, world)
            toyworld.save_image(out / folder / name / f"{i:05d}.png", image, jpeg_quality=0)  # PNG: quality unused
    (out / "manifest.json").write_text(json.dumps(params))
    return out


def extra_captions(scene, index: int, seed: int, count: int, world: int = toyworld.DEFAULT_WORLD) -> list[str]:
    """`count` captions of one scene: its own, then others composed from its contents."""
    things = [(inst.class_id, inst.colour) for inst in scene.instances]
    nst = len(toyworld.STUFF_CLASSES)
    stuff = np.array([k for k in scene.classes if k < nst])
    out = [scene.caption]
    for j in range(1, count):
        rng = np.random.default_rng([_CAPTION_STREAM, seed, index, j])
        out.append(toyworld.compose_caption(rng, things, stuff, toyworld.get_world(world)))
    return out


def write_captions(root: Path, seed: int = 0, world: int = toyworld.DEFAULT_WORLD) -> Path:
    out = root / "captions"
    params = {"version": VERSION, "world": toyworld.get_world(world).version, "seed": seed, "size": SIZE,
              "images": CAPTION_IMAGES, "captions_per_image": CAPTIONS_PER_IMAGE}
    if manifest_matches(out / "manifest.json", params):
        return out
    images = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i in range(CAPTION_IMAGES):
        scene = toyworld.render(i, seed=seed, size=SIZE, split="validation", world=world)
        name = f"toy_{i:05d}.png"
        toyworld.save_image(out / "images" / name, scene.image, jpeg_quality=0)  # PNG: quality unused
        images.append({"filepath": "images", "filename": name, "split": "test", "imgid": i,
                       "sentences": [{"raw": c} for c in extra_captions(scene, i, seed, CAPTIONS_PER_IMAGE, world)]})
    tmp = out / ".dataset_toy.json.tmp"
    tmp.write_text(json.dumps({"dataset": "toyworld", "images": images}))
    tmp.replace(out / "dataset_toy.json")
    (out / "manifest.json").write_text(json.dumps(params))
    return out


WRITERS = {"toyworld_cls": write_classification, "toyworld_captions": write_captions}


def ensure(entry: dict, data_root: Path) -> None:
    """Write the toy split an entry names (`generate:`) under the data root if not there yet."""
    writer = WRITERS[entry["generate"]]
    root = Path(data_root) / Path(entry["root"]).parts[0]   # toyworld/ (world 1) or toyworld_v2/
    manifest = Path(data_root) / entry["root"] / "manifest.json"
    if not manifest.exists():
        print(f"silc-bench: generating the toy split {entry['name']!r} (first use) in {root}; to write it "
              f"elsewhere pass --data-root DIR or set ${paths.DATA_ENV}", file=sys.stderr, flush=True)
    writer(root, world=entry.get("world", toyworld.DEFAULT_WORLD))
