"""Toy world: a seeded procedural world where a tiny CLIP / SILC pretrains in minutes on CPU and
whose evaluation splits sit in the real datasets' on-disk layouts (ADE20K, COCO), so the same
readers and harnesses that evaluate real checkpoints evaluate toy ones, with known answers.

Scenes: 1-2 "stuff" backgrounds (each a texture) and thing objects. The world has a fixed pixel
scale (texture periods 4-14 px); a larger `size` shows more of it, which matches slide inference
with 64-px crops over 96-px images. Its appearance rules come in versions (`WORLDS`, chosen by
`world=`; every split and manifest records it):
- world 1: each thing class a unique (shape, pattern) pair, every colour (stuff included) from one
  shared palette, so colour alone does not segment it; objects of radius 6-13 px; captions name
  every class present. Tiny models do not learn its thing classes at all (README, toy world).
- world 2: each thing class a unique (colour, pattern) pair, readable from any patch of its
  interior, with a shape drawn at random; each stuff class its own colour family (grass is green,
  sky blue), families overlapping so texture still matters; objects of radius 8-15 px; captions
  name every thing, and the background only 30% of the time (alt-text rarely does).
- world 3: world 2 with objects of radius 14-24 px, so things cover about 35% of a 96-px
  validation image instead of 15% and most of an object's patches lie inside it.

Streams: a scene is a pure function of (split, seed, index): `np.random.default_rng` seeded with
[stream code, seed, index], so pretraining ("pretrain") and evaluation ("validation") never share
a scene, whatever seeds they use.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from silc_bench.errors import UserError

STUFF_CLASSES = ("grass", "sand", "water", "brick", "sky", "snow")
SHAPES = ("disk", "square", "triangle", "star", "ring", "cross")
PATTERNS = ("solid", "striped", "dotted", "checkered")
THING_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
# Thing classes: rows are shapes (world 1) or colours (world 2), columns patterns (the name is
# arbitrary; the pair defines it).
_THING_GRID = (
    ("ball", "drum", "cookie", "clock"),        # disk
    ("box", "book", "cushion", "window"),       # square
    ("tent", "kite", "hat", "sail"),            # triangle
    ("flower", "badge", "shell", "medal"),      # star
    ("donut", "tire", "wreath", "bracelet"),    # ring
    ("plane", "robot", "anchor", "sign"),       # cross
)
THING_CLASSES = tuple(name for row in _THING_GRID for name in row)
THING_STYLE = {name: (SHAPES[i], PATTERNS[j]) for i, row in enumerate(_THING_GRID) for j, name in enumerate(row)}
THING_STYLE_V2 = {name: (THING_COLOURS[i], PATTERNS[j]) for i, row in enumerate(_THING_GRID) for j, name in enumerate(row)}
CLASSES = STUFF_CLASSES + THING_CLASSES  # label order: class k is stored as k + 1 in ADE pngs
NUM_CLASSES = len(CLASSES)
# Held out for open-vocabulary tasks: one per grid row, patterns spread, so every unseen class
# shares its shape (world 1) or colour (world 2) and its pattern with seen classes. They still
# appear in pretraining captions.
UNSEEN_CLASSES = ("drum", "cushion", "sail", "flower", "tire", "anchor")
SEEN_CLASSES = tuple(c for c in CLASSES if c not in UNSEEN_CLASSES)

PALETTE = {
    "red": (200, 40, 40), "orange": (235, 130, 30), "yellow": (230, 210, 50), "green": (60, 160, 60),
    "blue": (50, 90, 200), "purple": (130, 60, 170), "pink": (235, 130, 180), "brown": (130, 85, 45),
    "white": (235, 235, 235), "gray": (128, 128, 128), "black": (30, 30, 30), "teal": (30, 150, 150),
}
COLOUR_NAMES = tuple(PALETTE)
_PAL = np.array(list(PALETTE.values()), np.float32)
# World 2's stuff colours: a pair per class (the texture's c1, c2), as grass is green and sky blue.
_STUFF_FAMILY = {
    "grass": ((70, 150, 50), (30, 90, 30)), "sand": ((215, 190, 135), (175, 145, 90)),
    "water": ((40, 100, 170), (90, 170, 205)), "brick": ((165, 70, 50), (205, 195, 185)),
    "sky": ((110, 160, 230), (235, 240, 250)), "snow": ((215, 220, 230), (252, 252, 252)),
}


@dataclass(frozen=True)
class World:
    """The appearance rules of one world version (module docstring)."""

    version: int
    class_key: str                       # what, with the pattern, makes a thing class: "shape" | "colour"
    stuff_colours: str                   # "palette": any palette colour | "family": the class's own pair
    object_radius: tuple[float, float]   # px
    objects_per_64px: int                # at most this many objects per 64 x 64 px
    colour_word_p: float                 # captions: chance a single object is named with its colour
    stuff_mention_p: float               # captions: chance the background is named at all
    thing_mention_p: float = 1.0         # captions: chance each thing class present is named (one always is)


WORLDS = {1: World(1, "shape", "palette", (6.0, 13.0), 4, 0.25, 1.0),
          2: World(2, "colour", "family", (8.0, 15.0), 3, 0.0, 0.3),
          3: World(3, "colour", "family", (14.0, 24.0), 3, 0.0, 0.3)}
DEFAULT_WORLD = 1


def get_world(version) -> World:
    try:
        key = int(str(version))  # 2 and "2", not 2.9 or "2.0"
    except ValueError:
        key = None
    if key not in WORLDS:
        raise UserError(f"unknown toy world version {version!r}", fix=f"use one of {sorted(WORLDS)}")
    return WORLDS[key]


def dataset_name(world) -> str:
    """Registry name (configs/datasets.yaml) of world N's segmentation split: toyworld, toyworld_vN."""
    version = get_world(world).version
    return "toyworld" if version == 1 else f"toyworld_v{version}"


def recipe_suffix(world) -> str:
    """What world N adds to a toy recipe's name (configs/pretrain/toy_<variant><suffix>.yaml,
    configs/<tool>/toy<suffix>.yaml) and to its run folders: nothing for world 1, `_wN` after it."""
    version = get_world(world).version
    return "" if version == 1 else f"_w{version}"


def with_caption_rates(world: World, background_mention_p: float | None = None,
                       thing_mention_p: float | None = None) -> World:
    """`world` with captions naming the background, and each thing class present, with these
    probabilities (None: the world's own). Pretraining data options; scenes do not change."""
    changes = {}
    for name, field, p in (("background_mention_p", "stuff_mention_p", background_mention_p),
                           ("thing_mention_p", "thing_mention_p", thing_mention_p)):
        if p is None:
            continue
        try:
            valid = not isinstance(p, bool) and 0.0 <= float(p) <= 1.0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise UserError(f"{name} must be a probability in [0, 1], got {p!r}",
                            fix=f"set data.{name} between 0 and 1, or leave it out")
        changes[field] = float(p)
    return dataclasses.replace(world, **changes) if changes else world


STREAMS = {"pretrain": 1, "train": 2, "validation": 3, "tokenizer": 4}
ADE_SPLIT_STREAM = {"training": "train", "validation": "validation"}
COCO_SPLIT_STREAM = {"train": "train", "val": "validation"}

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CLASSNAMES_FILE = PACKAGE_DIR / "data" / "classnames" / "toyworld.txt"
TOKENIZER_FILE = PACKAGE_DIR / "assets" / "toyworld_sp.model"

EVAL_NUM_IMAGES = 500
EVAL_SIZE = 96
EVAL_SEED = 0

# For the lead to add to configs/datasets.yaml as `toyworld` (same keys as the other entries).
TOYWORLD_DATASET_ENTRY = {
    "layout": "glob",
    "root": "toyworld/ADEChallengeData2016",
    "split": "validation",
    "images": "images/validation/*.jpg",
    "labels": "annotations/validation/*.png",
    "classnames": "toyworld.txt",
    "num_classes": NUM_CLASSES,
    "reduce_zero_label": True,   # ADE encoding: class k stored as k + 1; 0 unused
    "ignore_index": 255,
    "num_images": EVAL_NUM_IMAGES,
    "prepare": "python -m silc_bench.data.toyworld <data root>/toyworld",
    "classes_source": "silc_bench.data.toyworld.CLASSES (procedurally generated world)",
    "unseen_classes": list(UNSEEN_CLASSES),
    # 96-px images, 64-px models with patch 8: no resize, 64-px windows with stride 32 (4 crops).
    "protocol": {
        "zs-seg": {"short_side": EVAL_SIZE, "long_side_max": 4 * EVAL_SIZE, "crop": 64, "stride": 32},
        "ov-seg": {"resize_short": None, "resize_max": None, "out_res": EVAL_SIZE, "crop": 64, "stride": 32},
    },
}


@dataclass(frozen=True)
class Instance:
    class_id: int                         # index into CLASSES
    box: tuple[int, int, int, int]        # xyxy in pixel edges of the visible mask: x2, y2 exclusive
    area: int                             # visible pixels
    colour: str                           # palette name of the main colour
    shape: str = ""                       # one of SHAPES


@dataclass
class Scene:
    image: np.ndarray          # [H, W, 3] uint8 RGB
    labels: np.ndarray         # [H, W] uint8 class ids (0..NUM_CLASSES-1), no unlabelled pixel
    instance_map: np.ndarray   # [H, W] int16 index into `instances`, -1 on stuff
    instances: list[Instance]
    caption: str

    @property
    def classes(self) -> list[int]:
        """Class ids present in the picture (the ones the caption names), sorted."""
        return np.flatnonzero(np.bincount(self.labels.ravel(), minlength=NUM_CLASSES)).tolist()


def _rng(stream: str, seed: int, index: int) -> np.random.Generator:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; one of {sorted(STREAMS)}")
    if int(seed) < 0 or int(index) < 0:
        raise ValueError("seed and index must be non-negative")
    return np.random.default_rng([STREAMS[stream], int(seed), int(index)])


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (read-only, shared)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _lowfreq(rng, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a (cells+1)^2 random grid, bilinearly upsampled."""
    g = rng.random((cells + 1, cells + 1), dtype=np.float32)
    c = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(c.astype(np.int64), cells - 1)
    f = c - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


# ---- stuff textures: t in [0, 1], colour = mix(c1, c2, t) ----------------------------------
def _grass(rng, x, y, size):
    width = rng.uniform(1.2, 2.0)
    xs = x + rng.uniform(-0.3, 0.3) * y + rng.uniform(0, 64)
    col = (xs / width).astype(np.int64) % 64
    phase, length = rng.random(64, dtype=np.float32), rng.uniform(4, 8, 64).astype(np.float32)
    saw = np.mod(y / length[col] + phase[col], 1.0)
    return saw * saw


def _sand(rng, x, y, size):
    return 0.75 * rng.random((size, size), dtype=np.float32) + 0.25 * _lowfreq(rng, size, 3)


def _water(rng, x, y, size):
    lam, amp, mu, ph = rng.uniform(5, 8), rng.uniform(0.8, 2.0), rng.uniform(10, 20), rng.uniform(0, 6.3)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (y + amp * np.sin(2 * np.pi * x / mu + ph)) / lam)


def _brick(rng, x, y, size):
    bh, bw = rng.uniform(5, 7), rng.uniform(10, 14)
    ys = y + rng.uniform(0, bh)
    row = (ys / bh).astype(np.int64)
    xs = x + rng.uniform(0, bw) + (row % 2) * (bw / 2)
    shade = rng.random((64, 64), dtype=np.float32)[row % 64, (xs / bw).astype(np.int64) % 64]
    mortar = (np.mod(ys, bh) < 1.1) | (np.mod(xs, bw) < 1.1)
    return np.where(mortar, 1.0, 0.3 * shade).astype(np.float32)


def _sky(rng, x, y, size):
    return 0.55 * (y / size) + 0.45 * _lowfreq(rng, size, 2)


def _snow(rng, x, y, size):
    sparkle = rng.random((size, size), dtype=np.float32) > 0.94
    return np.where(sparkle, 1.0, 0.15 * _lowfreq(rng, size, 3)).astype(np.float32)


_STUFF_TEXTURES = (_grass, _sand, _water, _brick, _sky, _snow)


def _stuff_colours(rng, k: int, world: World) -> tuple[int, np.ndarray, np.ndarray]:
    """(palette index of the main colour or -1, c1, c2) of a stuff texture."""
    if world.stuff_colours == "family":  # the class's pair, jittered per channel; order random but for sky/snow/brick
        name = STUFF_CLASSES[k]
        c1, c2 = (np.array(c, np.float32) * rng.uniform(0.85, 1.15, 3).astype(np.float32) for c in _STUFF_FAMILY[name])
        if name not in ("snow", "sky", "brick") and rng.random() < 0.5:
            c1, c2 = c2, c1
        return -1, c1, c2
    i = int(rng.integers(len(_PAL)))
    c1 = _PAL[i] * rng.uniform(0.85, 1.15)
    if STUFF_CLASSES[k] == "snow":  # pale base, bright sparkles
        return i, 0.45 * c1 + 0.55 * 240, np.full(3, 250, np.float32)
    j = int(rng.integers(len(_PAL)))
    c2 = _PAL[j] if (j != i and rng.random() < 0.5) else c1 * rng.uniform(0.45, 0.7)
    return i, c1, c2


# ---- things -------------------------------------------------------------------------------
_EXTENT = {"disk": 1.0, "square": 1.2, "triangle": 1.3, "star": 1.25, "ring": 1.05, "cross": 1.1}


def _shape_mask(shape: str, u, v):
    if shape == "disk":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        m = None
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            h = u * np.cos(a) + v * np.sin(a) <= 0.65
            m = h if m is None else m & h
        return m
    rho = np.sqrt(u * u + v * v)
    if shape == "ring":
        return (rho >= 0.55) & (rho <= 1.05)
    if shape == "star":
        t = np.mod(np.arctan2(v, u) * (5 / (2 * np.pi)), 1.0)
        return rho <= 0.5 + 0.75 * np.abs(1 - 2 * t)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.35) & (av <= 1.1)) | ((av <= 0.35) & (au <= 1.1))
    raise ValueError(shape)


def _pattern(pattern: str, pu, pv, period: float):
    """Two-tone pattern in object-frame pixel coordinates: True where the second colour goes."""
    if pattern == "solid":
        return np.zeros(pu.shape, bool)
    if pattern == "striped":
        return np.mod(pu / period, 1.0) < 0.5
    if pattern == "dotted":
        du, dv = np.mod(pu / period, 1.0) - 0.5, np.mod(pv / period, 1.0) - 0.5
        return du * du + dv * dv < 0.1
    if pattern == "checkered":
        return (np.floor(pu / period) + np.floor(pv / period)) % 2 == 1
    raise ValueError(pattern)


# ---- captions -----------------------------------------------------------------------------
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = ("{o} on {s}", "a photo of {o} on {s}", "{o} in front of {s}", "{s} with {o}",
              "a picture of {o} and {s}")
_TEMPLATES_NO_STUFF = ("{o}", "a photo of {o}")


def plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def compose_caption(rng, things: list[tuple[int, str]], stuff: list[int], world: World = WORLDS[1]) -> str:
    """Name the present classes, not where: `things` = (class id, colour name) per instance. Each
    thing class is named with probability `world.thing_mention_p` (if none is drawn, one at random:
    a caption names at least one object, as alt-text names the salient one); the background with
    probability `world.stuff_mention_p`. At probability 1 no random number is drawn, so captions are
    those of the world's own rules."""
    order, counts, colour = [], {}, {}
    for cid, col in things:
        if cid not in counts:
            order.append(cid)
        counts[cid] = counts.get(cid, 0) + 1
        colour[cid] = col
    rng.shuffle(order)
    if world.thing_mention_p < 1 and order:
        order = [cid for cid in order if rng.random() < world.thing_mention_p] or order[:1]
    objs = []
    for cid in order:
        name, n = CLASSES[cid], counts[cid]
        if n > 1:
            objs.append(f"{_NUMBERS[min(n, 9)]} {plural(name)}")
            continue
        if world.colour_word_p and rng.random() < world.colour_word_p:
            name = f"{colour[cid]} {name}"
        objs.append(("an " if name[0] in "aeiou" else "a ") + name)
    if world.stuff_mention_p < 1 and rng.random() >= world.stuff_mention_p:
        stuff = []
    stuff_words = [CLASSES[k] for k in rng.permutation(stuff)] if len(stuff) else []
    if not objs:  # cannot happen in render (the first object is always placed); kept total
        return _join(stuff_words)
    if not stuff_words:
        return _TEMPLATES_NO_STUFF[int(rng.integers(len(_TEMPLATES_NO_STUFF)))].format(o=_join(objs))
    return _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(o=_join(objs), s=_join(stuff_words))


# ---- scenes -------------------------------------------------------------------------------
def render(index: int, seed: int = 0, size: int = 64, split: str = "pretrain", *,
           max_objects: int | None = None, world: int = DEFAULT_WORLD,
           background_mention_p: float | None = None, thing_mention_p: float | None = None) -> Scene:
    """Scene `index` of stream (`split`, `seed`) of world version `world`: deterministic, no global RNG.
    `background_mention_p` / `thing_mention_p` override the world's chance that the caption names the
    background / each thing class (`with_caption_rates`); the caption is composed last, so image and
    labels are the same whatever they are."""
    w = with_caption_rates(get_world(world), background_mention_p, thing_mention_p)
    rng = _rng(split, seed, index)
    x, y = _grid(size)
    nst = NUM_CLASSES - len(THING_CLASSES)

    # Background: one stuff class, or two split by a wavy line or a blob.
    layout = rng.choice(3, p=(0.3, 0.5, 0.2))
    ks = rng.choice(nst, size=1 if layout == 0 else 2, replace=False)
    labels = np.full((size, size), ks[0], np.uint8)
    if layout == 1:
        ang = rng.uniform(-0.4, 0.4) if rng.random() < 0.8 else rng.uniform(0, np.pi)
        cx, cy = size * rng.uniform(0.3, 0.7, 2)
        along = (x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)
        d = (y - cy) * np.cos(ang) - (x - cx) * np.sin(ang)
        d = d + rng.uniform(0.5, 3) * np.sin(2 * np.pi * along / rng.uniform(12, 30) + rng.uniform(0, 6.3))
        labels[d > 0] = ks[1]
    elif layout == 2:
        cx, cy = size * rng.uniform(0.25, 0.75, 2)
        r0 = size * rng.uniform(0.2, 0.4)
        rho = np.hypot(x - cx, y - cy)
        wobble = 1 + 0.15 * np.sin(3 * np.arctan2(y - cy, x - cx) + rng.uniform(0, 6.3))
        labels[rho < r0 * wobble] = ks[1]
    img = np.empty((size, size, 3), np.float32)
    stuff_cols = []
    for k in ks:
        ci, c1, c2 = _stuff_colours(rng, int(k), w)
        stuff_cols.append(ci)
        t = _STUFF_TEXTURES[k](rng, x, y, size)[..., None]
        mix = c1 * (1 - t) + c2 * t
        if len(ks) == 1:
            img[:] = mix
        else:
            m = labels == k
            img[m] = mix[m]

    # Objects, later ones on top; a placement that would hide more than half of an earlier
    # object is retried elsewhere, so every placed object stays recognisable.
    if max_objects is None:
        max_objects = min(8, max(1, round(w.objects_per_64px * size * size / 4096)))
    n_obj = int(rng.integers(1, max_objects + 1))
    owner = np.full((size, size), -1, np.int16)
    placed: list[tuple[int, int, str, str]] = []   # (class id, full area, colour name, shape)
    for _ in range(n_obj):
        tid = int(rng.integers(len(THING_CLASSES)))
        if w.class_key == "shape":
            shape, pattern = THING_STYLE[THING_CLASSES[tid]]
        else:  # the colour is the class's; the shape is drawn
            colour_name, pattern = THING_STYLE_V2[THING_CLASSES[tid]]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = rng.uniform(*w.object_radius)
        theta = rng.uniform(0, 2 * np.pi)
        period = rng.uniform(4, 6)
        if w.class_key == "shape":
            ci = int(rng.choice([i for i in range(len(_PAL)) if i not in stuff_cols]))
            cj = int(rng.choice([i for i in range(len(_PAL)) if i != ci]))
        else:  # second colour: white on dark colours, black on light ones
            ci = COLOUR_NAMES.index(colour_name)
            cj = COLOUR_NAMES.index("white" if colour_name in ("red", "blue", "purple") else "black")
            main = _PAL[ci] * rng.uniform(0.85, 1.15, 3).astype(np.float32)
        for _try in range(8 if placed else 64):  # the first object (nothing to occlude) always lands
            cx, cy = rng.uniform(0.4 * r, size - 0.4 * r, 2)
            e = _EXTENT[shape] * r
            x0, x1 = max(0, int(cx - e)), min(size, int(np.ceil(cx + e)) + 1)
            y0, y1 = max(0, int(cy - e)), min(size, int(np.ceil(cy + e)) + 1)
            dx, dy = x[y0:y1, x0:x1] - cx, y[y0:y1, x0:x1] - cy
            c, s = np.cos(theta), np.sin(theta)
            pu, pv = dx * c + dy * s, -dx * s + dy * c
            m = _shape_mask(shape, pu / r, pv / r)
            area = int(m.sum())
            if area < 20:
                continue
            win = owner[y0:y1, x0:x1]
            hit = win[m]
            if placed and hit.size and hit.max() >= 0:
                lost = np.bincount(hit[hit >= 0], minlength=len(placed))
                visible = np.bincount(owner.ravel()[owner.ravel() >= 0], minlength=len(placed))
                if np.any(visible - lost < np.maximum(20, [0.5 * p[1] for p in placed])):
                    continue
            t = _pattern(pattern, pu, pv, period)
            shade = (1 + 0.08 * (pu - pv) / r)[..., None]
            if w.class_key == "shape":
                main = _PAL[ci] * rng.uniform(0.85, 1.15)
            col = np.where(t[..., None], _PAL[cj], main) * shade
            img[y0:y1, x0:x1][m] = col[m]
            labels[y0:y1, x0:x1][m] = nst + tid
            win[m] = len(placed)
            placed.append((nst + tid, area, COLOUR_NAMES[ci], shape))
            break

    instances = []
    for i, (cid, _, colour, shape) in enumerate(placed):
        mask = owner == i
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
        instances.append(Instance(cid, box, int(mask.sum()), colour, shape))

    # Camera: global gain, per-channel offset, sensor noise.
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12, 3).astype(np.float32)
    img += 4.0 * rng.standard_normal((size, size, 3), dtype=np.float32)
    image = np.clip(img, 0, 255).astype(np.uint8)

    present = np.bincount(labels.ravel(), minlength=NUM_CLASSES)
    stuff = [k for k in range(nst) if present[k]]
    caption = compose_caption(rng, [(inst.class_id, inst.colour) for inst in instances], stuff, w)
    return Scene(image, labels, owner, instances, caption)


class PretrainDataset(Dataset):
    """Image-caption pairs rendered on the fly; item i is always the same scene (resumable)."""

    def __init__(self, seed: int, length: int, size: int = 64, split: str = "pretrain", world: int = DEFAULT_WORLD,
                 background_mention_p: float | None = None, thing_mention_p: float | None = None):
        _rng(split, seed, 0)  # validates split and seed
        self.world = get_world(world).version
        with_caption_rates(get_world(world), background_mention_p, thing_mention_p)  # validates them
        self.background_mention_p, self.thing_mention_p = background_mention_p, thing_mention_p
        self.seed, self.length, self.size, self.split = int(seed), int(length), int(size), split

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene = render(index, self.seed, self.size, self.split, world=self.world,
                       background_mention_p=self.background_mention_p, thing_mention_p=self.thing_mention_p)
        return {"image": torch.from_numpy(scene.image).permute(2, 0, 1).contiguous(), "caption": scene.caption}


# ---- on-disk splits -----------------------------------------------------------------------
def _split_is_done(manifest: Path, params: dict, overwrite: bool, folders: list[Path], stem: str,
                   last: Path) -> bool:
    """True if `manifest` records exactly `params` and the `last` file exists: keep the split.
    Otherwise make the folders and delete files of an earlier, different or interrupted run."""
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != params and not overwrite:
            raise UserError(f"a toy-world split with other parameters is already here ({old})", path=manifest,
                            fix="delete that directory, write to another root, or pass overwrite=True")
        if old == params and last.exists():
            return True
        manifest.unlink()
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for old_file in folder.glob(stem + "*"):
            old_file.unlink()
    return False


def _write_atomic(path: Path, write) -> None:
    """Write via a temporary name that the readers' globs (*.jpg, *.png) do not match."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_image(path: Path, array: np.ndarray, jpeg_quality: int) -> None:
    """JPEG without chroma subsampling (4:2:0 smears the 2-px colour patterns: mean error 9 vs 3), or PNG."""
    from PIL import Image

    fmt = dict(format="JPEG", quality=jpeg_quality, subsampling=0) if path.suffix == ".jpg" else dict(format="PNG")
    _write_atomic(path, lambda p: Image.fromarray(array).save(p, **fmt))


def _params(layout: str, split: str, stream: str, seed, num_images, size, jpeg_quality, world: int) -> dict:
    return dict(generator="silc_bench.data.toyworld", world_version=get_world(world).version, layout=layout, split=split,
                stream=stream, seed=int(seed), num_images=int(num_images), size=int(size),
                jpeg_quality=int(jpeg_quality), jpeg_subsampling="4:4:4", classes=list(CLASSES))


def write_ade_split(root, split: str = "validation", num_images: int = EVAL_NUM_IMAGES, size: int = EVAL_SIZE,
                    seed: int = EVAL_SEED, jpeg_quality: int = 95, overwrite: bool = False,
                    world: int = DEFAULT_WORLD) -> Path:
    """Write `root/ADEChallengeData2016/{images,annotations}/<split>/` as ADE20K does; returns that folder.

    Labels are ADE-encoded: class k -> k + 1 (0 = "other", unused here). A manifest written last
    marks the split complete; calling again with the same parameters does nothing.
    """
    if split not in ADE_SPLIT_STREAM:
        raise ValueError(f"split must be one of {sorted(ADE_SPLIT_STREAM)}")
    base = Path(root) / "ADEChallengeData2016"
    img_dir, ann_dir, manifest = base / "images" / split, base / "annotations" / split, base / f"toyworld_{split}.json"
    params = _params("ade20k", split, ADE_SPLIT_STREAM[split], seed, num_images, size, jpeg_quality, world)
    last = ann_dir / f"toyworld_{split}_{num_images - 1:06d}.png"
    if _split_is_done(manifest, params, overwrite, [img_dir, ann_dir], f"toyworld_{split}_", last):
        return base
    for i in range(num_images):
        scene = render(i, seed, size, ADE_SPLIT_STREAM[split], world=world)
        save_image(img_dir / f"toyworld_{split}_{i:06d}.jpg", scene.image, jpeg_quality)
        save_image(ann_dir / f"toyworld_{split}_{i:06d}.png", scene.labels + np.uint8(1), jpeg_quality)
    (base / "toyworld_classnames.txt").write_text("\n".join(CLASSES) + "\n")
    manifest.write_text(json.dumps(params, indent=1))
    return base


def write_eval_split(root, num_images: int = EVAL_NUM_IMAGES, size: int = EVAL_SIZE, seed: int = EVAL_SEED,
                     overwrite: bool = False, world: int = DEFAULT_WORLD) -> Path:
    """The dense evaluation split (ADE20K layout, `validation`), from the evaluation stream."""
    return write_ade_split(root, "validation", num_images, size, seed, overwrite=overwrite, world=world)


def _rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major runs, starting with background)."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], edges])).tolist()}


def write_detection_split(root, split: str = "val", num_images: int = EVAL_NUM_IMAGES, size: int = EVAL_SIZE,
                          seed: int = EVAL_SEED, jpeg_quality: int = 95, overwrite: bool = False,
                          world: int = DEFAULT_WORLD) -> Path:
    """COCO instances of the thing objects: `root/annotations/instances_<split>.json` + `root/images/<split>/`.

    Split "val" renders the very scenes of the ADE validation split (same seed and size). Category
    ids are 1 + index in THING_CLASSES; boxes and RLE masks come from the visible instance masks.
    """
    if split not in COCO_SPLIT_STREAM:
        raise ValueError(f"split must be one of {sorted(COCO_SPLIT_STREAM)}")
    root, stream = Path(root), COCO_SPLIT_STREAM[split]
    ann_path, img_dir = root / "annotations" / f"instances_{split}.json", root / "images" / split
    params = _params("coco", split, stream, seed, num_images, size, jpeg_quality, world)
    manifest = root / f"toyworld_{split}.json"
    if _split_is_done(manifest, params, overwrite, [img_dir, ann_path.parent], f"toyworld_{split}_", ann_path):
        return ann_path
    nst = len(STUFF_CLASSES)
    images, annotations = [], []
    for i in range(num_images):
        scene = render(i, seed, size, stream, world=world)
        name = f"toyworld_{split}_{i:06d}.jpg"
        save_image(img_dir / name, scene.image, jpeg_quality)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for j, inst in enumerate(scene.instances):
            x1, y1, x2, y2 = inst.box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": inst.class_id - nst + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": inst.area, "iscrowd": 0,
                                "segmentation": _rle(scene.instance_map == j)})
    categories = [{"id": t + 1, "name": n, "supercategory": "thing", "unseen": n in UNSEEN_CLASSES}
                  for t, n in enumerate(THING_CLASSES)]
    coco = {"info": {"description": "silc-bench toy world", **params}, "images": images,
            "annotations": annotations, "categories": categories}
    _write_atomic(ann_path, lambda p: p.write_text(json.dumps(coco)))
    manifest.write_text(json.dumps(params, indent=1))
    return ann_path


# ---- tokenizer ----------------------------------------------------------------------------
TOKENIZER_VOCAB_SIZE = 256
_PROMPTS = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "there is a {} in the scene.",
            "a photo of many {}.", "a good photo of a {}.")


def tokenizer_corpus(num_captions: int = 20000) -> list[str]:
    """Fixed text: every class name (singular, plural, in prompts) plus captions as render writes them."""
    rng = _rng("tokenizer", 0, 0)
    nst = len(STUFF_CLASSES)
    lines = ["abcdefghijklmnopqrstuvwxyz . , ' -"]
    for name in CLASSES:
        lines += [name] + ([plural(name)] if name in THING_CLASSES else []) + [p.format(name) for p in _PROMPTS]
    for _ in range(num_captions):
        things = [(int(rng.integers(nst, NUM_CLASSES)), COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))])
                  for _ in range(int(rng.integers(1, 6)))]
        stuff = rng.choice(nst, size=int(rng.integers(0, 3)), replace=False).tolist()
        lines.append(compose_caption(rng, things, stuff))
    return lines


def train_toy_tokenizer(out_prefix, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """Train the toy sentencepiece model (T5 ids: pad 0, eos 1, unk 2, no bos); returns the .model path.

    BPE, single-threaded, on a fixed unshuffled corpus, written through `model_writer` so that the
    output path is not stored in the model: two runs give byte-identical files. (Unigram cannot
    reach 256 pieces on this small corpus, and at 128 it splits common words like "photo".)
    """
    import io

    import sentencepiece as spm

    out = Path(str(out_prefix) + ".model")
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    _write_atomic(out, lambda p: p.write_bytes(buf.getvalue()))
    return out


def main(argv=None) -> None:
    """`python -m silc_bench.data.toyworld ROOT`: write the evaluation splits under ROOT."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("root")
    ap.add_argument("--num-images", type=int, default=EVAL_NUM_IMAGES)
    ap.add_argument("--size", type=int, default=EVAL_SIZE)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--world", type=int, default=DEFAULT_WORLD, help=f"world version, one of {sorted(WORLDS)}")
    ap.add_argument("--detection", action="store_true", help="also write the COCO-format detection split")
    a = ap.parse_args(argv)
    print(write_eval_split(a.root, a.num_images, a.size, a.seed, world=a.world))
    if a.detection:
        print(write_detection_split(Path(a.root) / "coco", "val", a.num_images, a.size, a.seed, world=a.world))


if __name__ == "__main__":
    main()
