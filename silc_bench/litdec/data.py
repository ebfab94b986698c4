"""Training examples for the LiT-Decoder: (image, task kind, question, target texts) from each source.

Sources (the `data` section of a LiT-Decoder config):
- `toyworld: {num_images, seed, world}`: rendered in memory from the toy world's training stream (no
  files): classification of single-object scenes (target: the class name), captioning of full
  scenes (their caption) and questions about them (silc_bench/data/toy_vqa.py rules);
- `sources: [{kind, dataset, split}]`: datasets.yaml entries in their release layouts
  (classification: imagefolder / cifar; captioning: Karpathy json; vqa: VQAv2 / GQA layouts).
A training position p draws its kind by the configured weights and its example by a seeded rng of
(seed, p), so runs resume exactly and do not depend on the number of processes.
"""
from __future__ import annotations

import numpy as np
import torch

from silc_bench.litdec.text import TASK_KINDS


class ToySource:
    """The toy world's training scenes, rendered on demand (deterministic by index)."""

    def __init__(self, kind: str, num_images: int, seed: int = 0, world: int | None = None):
        from silc_bench.data import toyworld

        self.kind, self.n, self.seed = kind, int(num_images), int(seed)
        self.world = toyworld.DEFAULT_WORLD if world is None else int(world)

    def __len__(self):
        return self.n

    def get(self, i: int, rng: np.random.Generator) -> tuple[torch.Tensor, str | None, list[str]]:
        from silc_bench.data import toy_image_level, toy_vqa, toyworld

        if self.kind == "classification":
            image, name = toy_image_level.single_object_scene(i, "train", self.seed, self.world)
            return torch.from_numpy(image.copy()).permute(2, 0, 1), None, [name]
        scene = toyworld.render(i, seed=self.seed, size=toy_vqa.SIZE, split="train", world=self.world)
        image = torch.from_numpy(scene.image.copy()).permute(2, 0, 1)
        if self.kind == "captioning":
            return image, None, [scene.caption]
        qs = toy_vqa.questions_for(scene, np.random.default_rng([self.seed, i, 5]))
        q = qs[int(rng.integers(len(qs)))]
        return image, q["question"], [q["answer"]]

    def key(self, i: int) -> tuple:
        return ("toy", "cls" if self.kind == "classification" else "scene", i)


class DatasetSource:
    """A release-layout dataset opened with silc-bench's readers."""

    def __init__(self, kind: str, dataset):
        self.kind, self.dataset = kind, dataset

    def __len__(self):
        return len(self.dataset)

    def get(self, i: int, rng: np.random.Generator):
        item = self.dataset[i]
        if self.kind == "classification":
            return item["image"], None, [self.dataset.classnames[self.dataset.labels[i]][0]]
        if self.kind == "captioning":
            caps = [c for c, j in zip(self.dataset.captions, self.dataset.caption_image) if j == i]
            return item["image"], None, [caps[int(rng.integers(len(caps)))]]
        answers = self.dataset.answers[i]
        best = max(set(answers), key=answers.count)  # the most frequent human answer
        return item["image"], item["question"], [best]

    def key(self, i: int) -> tuple:
        return (self.dataset.name, i)


def open_sources(data: dict, data_root=None) -> dict[str, object]:
    """kind -> source, from a config's `data` section."""
    if data.get("toyworld"):
        tw = dict(data["toyworld"])
        return {k: ToySource(k, tw.get("num_images", 2000), tw.get("seed", 0), tw.get("world")) for k in TASK_KINDS}
    from silc_bench import registry
    from silc_bench.errors import UserError

    out = {}
    for s in data.get("sources") or []:
        entry = registry.dataset_entry(s["dataset"])
        kind = s["kind"]
        if kind == "classification":
            from silc_bench.data.classification import open_split

            ds = open_split(entry, s.get("split", "train"), data_root)
        elif kind == "captioning":
            from silc_bench.data.captions import KarpathyCaptions

            ds = KarpathyCaptions({**entry, "split": s.get("split", "train")}, data_root)
        elif kind == "vqa":
            from silc_bench.data.vqa import QuestionsDataset

            ds = QuestionsDataset({**entry, **({"subtype": s["subtype"]} if "subtype" in s else {})}, data_root)
        else:
            raise UserError(f"unknown LiT-Decoder task kind {kind!r}", fix=f"use one of {TASK_KINDS}")
        out[kind] = DatasetSource(kind, ds)
    if not out:
        raise UserError("the LiT-Decoder config names no training data",
                        fix="set data.toyworld or data.sources: [{kind, dataset, split}]")
    return out


def draw(sources: dict, weights: dict, seed: int, p: int):
    """Training position p -> (kind, source, example index, rng for the example's own choices)."""
    kinds = [k for k in TASK_KINDS if k in sources and weights.get(k, 0) > 0]
    w = np.array([weights[k] for k in kinds], dtype=np.float64)
    rng = np.random.default_rng([seed, p])
    kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
    src = sources[kind]
    return kind, src, int(rng.integers(len(src))), rng
