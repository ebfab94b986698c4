"""OWL-ViT detection training on any backbone (plain PyTorch; DDP under torchrun).

    silc-bench train owl-det --model SPEC --config configs/owl/b16_960.yaml --out DIR [--resume]
    torchrun --nproc_per_node 4 -m silc_bench.detection.train --model SPEC --config ... --out DIR

Recipe (scenic owl_vit configs/clip_b16.py, read for facts; OWLv2's training configs are not
released): Adam (0.9, 0.999), linear warm-up then cosine decay, global gradient-norm clip 1.0,
matching and losses of silc_bench/detection/losses.py (focal alpha 0.3 gamma 2, L1, GIoU, weights
1 / 1 / 1); classes marked `unseen` (the toy world) or of LVIS frequency "r" are removed from
training when `train_classes: seen` (scenic's RemoveForbiddenLabels removes LVIS rare classes).
The text tower is frozen (its class embeddings are computed once; each step asks every class in one
template drawn at random). Deviations, recorded in the config: the image tower is frozen by
default (`model.finetune: none`; `qv` / `attention+pos` train those attention weights), where
OWL fine-tunes all of it; gradient clipping is global, not per example; no mosaics, random crops
or token dropping; the objectness head is not trained (scenic's public trainer does not either).

Data: a COCO-format detection set (a configs/datasets.yaml `kind: detection` entry, an inline
entry, or a toy-world training split written on first use). Sample position p = step * batch + i
-> a seeded per-epoch permutation; flips and templates are seeded by (seed, p) and (seed, step),
so a resumed run repeats the uninterrupted one exactly and a step's batch does not depend on the
number of processes. Outputs in --out: config.json, log.jsonl, checkpoint.pt (atomic), and at the
end heads.safetensors + owl_detector.json (the backbone checkpoint is not modified; fine-tuned
backbone weights, if any, are stored with the heads).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from silc_bench.checkpoints.owl import DETECTOR_FILE, save_detector
from silc_bench.data.detection import DetectionDataset, open_detection
from silc_bench.data.prompts import get_templates, owl_canonicalize
from silc_bench.detection.losses import LossWeights, detection_loss
from silc_bench.detection.owl import OwlDetector, resize_with_pad
from silc_bench.errors import UserError
from silc_bench.recipes import merge_settings, read_recipe, run_main
from silc_bench.training import runtime as rt
from silc_bench.training.runtime import warmup_cosine_lr

DEFAULTS = {
    "model": {"merge": "mul-ln", "finetune": "none", "objectness": True},
    "data": {
        "name": None,       # a configs/datasets.yaml detection entry, or
        "dataset": None,    # an inline entry in that format ({root, annotations, images}), or
        "toyworld": None,   # {root, num_images, size, seed, world}: toyworld.write_detection_split(split="train")
        "train_classes": "seen",  # all | seen (drop `unseen` and frequency-"r" categories) | [names]
    },
    "input": {"size": 960, "pad_value": 0.0, "flip": True},
    "text": {"templates": "clip_paper", "canonicalize": "owl"},
    "loss": {"focal_alpha": 0.3, "focal_gamma": 2.0, "class_weight": 1.0, "bbox_weight": 1.0, "giou_weight": 1.0},
    "optim": {"lr": 5e-5, "backbone_multiplier": 1.0, "weight_decay": 0.0, "grad_clip": 1.0,
              "betas": [0.9, 0.999], "eps": 1e-8, "warmup_steps": 1000},
    "train": {"batch_size": 256, "steps": 140_000, "seed": 0, "ckpt_every": 1000, "log_every": 20,
              "precision": "fp32", "device": "auto", "workers": 4, "threads": None},
}
_RUNTIME = ("ckpt_every", "log_every", "device", "workers", "threads")  # may change when resuming
FINETUNE = ("none", "qv", "attention+pos")


def load_config(path=None, overrides: dict | None = None) -> dict:
    raw = read_recipe(path, "OWL detection") if path is not None else {}
    merge = dict(what="OWL detection training", defaults_at="silc_bench/detection/train.py DEFAULTS")
    cfg = merge_settings(merge_settings(DEFAULTS, raw, path, **merge), overrides or {}, path, **merge)
    if cfg["model"]["finetune"] not in FINETUNE:
        raise UserError(f"unknown model.finetune {cfg['model']['finetune']!r}", path=path,
                        fix=f"use one of {', '.join(FINETUNE)}")
    get_templates(cfg["text"]["templates"])
    return cfg


# ---------------------------------------------------------------------------------- data
def make_dataset(cfg: dict, data_root=None, rank: int = 0) -> DetectionDataset:
    from silc_bench import paths, registry

    d = cfg["data"]
    given = [k for k in ("name", "dataset", "toyworld") if d.get(k)]
    if len(given) != 1:
        raise UserError("the data section must set exactly one of name, dataset, toyworld",
                        path=cfg.get("_config_path"), fix="e.g. data: {toyworld: {num_images: 2000, size: 96}}")
    if d.get("toyworld"):
        from silc_bench.data import toyworld

        tw = {"root": "toyworld/det_train", "num_images": 2000, "size": 96, "seed": 0,
              "world": toyworld.DEFAULT_WORLD, **d["toyworld"]}
        root = paths.data_root(data_root) / tw["root"]
        if rank == 0:
            toyworld.write_detection_split(root, "train", num_images=tw["num_images"], size=tw["size"],
                                           seed=tw["seed"], world=tw["world"])
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        entry = {"name": "toyworld_det_train", "root": tw["root"], "annotations": "annotations/instances_train.json",
                 "images": "images/train"}
    else:
        entry = registry.dataset_entry(d["name"]) if d.get("name") else {"name": "inline", **d["dataset"]}
    return open_detection(entry, data_root)


def train_categories(dataset: DetectionDataset, choice) -> list[int]:
    """Indices (into the dataset's categories) trained on."""
    cats = sorted(dataset.ground_truth["categories"], key=lambda c: c["id"])
    if choice == "all":
        return list(range(len(cats)))
    if choice == "seen":
        return [i for i, c in enumerate(cats) if not c.get("unseen") and c.get("frequency") != "r"]
    names = [c["name"] for c in cats]
    missing = [n for n in choice if n not in names]
    if missing:
        raise UserError(f"train_classes names unknown categories {missing[:5]}", fix=f"use names from: {names[:10]} ...")
    return [names.index(n) for n in choice]


class TrainSamples(torch.utils.data.Dataset):
    """Position p -> (padded image [3, S, S] in [0, 1], train labels [N], boxes [N, 4] cxcywh in [0, 1])."""

    def __init__(self, dataset: DetectionDataset, kept: list[int], size: int, pad_value: float, flip: bool, seed: int):
        self.dataset, self.size, self.pad_value, self.flip, self.seed = dataset, size, pad_value, flip, seed
        cat_to_train = {dataset.category_ids[k]: t for t, k in enumerate(kept)}
        by_image: dict[int, list] = {}
        for a in dataset.ground_truth["annotations"]:
            if a["category_id"] in cat_to_train and not a.get("iscrowd", 0):
                by_image.setdefault(a["image_id"], []).append((cat_to_train[a["category_id"]], a["bbox"]))
        self.targets = [by_image.get(im["id"], []) for im in dataset.images]

    def __len__(self) -> int:
        return len(self.dataset)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def __getitem__(self, p: int):
        n = len(self.dataset)
        i = int(self._order(p // n)[p % n])
        image = self.dataset[i]["image"]
        h, w = image.shape[-2:]
        anns = self.targets[i]
        xywh = torch.tensor([b for _, b in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([c for c, _ in anns], dtype=torch.long)
        if self.flip and np.random.default_rng([self.seed, p, 1]).random() < 0.5:
            image = image.flip(-1)
            xywh[:, 0] = w - xywh[:, 0] - xywh[:, 2]
        side = float(max(h, w))
        cxcywh = torch.stack([xywh[:, 0] + xywh[:, 2] / 2, xywh[:, 1] + xywh[:, 3] / 2, xywh[:, 2], xywh[:, 3]], 1) / side
        return resize_with_pad(image, self.size, self.pad_value), labels, cxcywh


def _collate(items):
    return torch.stack([i[0] for i in items]), [(i[1], i[2]) for i in items]


# ---------------------------------------------------------------------------------- trainer
class Trainer(rt.ParameterCheckpoints):
    what = "OWL training"
    runtime_keys = _RUNTIME

    def __init__(self, cfg: dict, model_spec: str, out_dir, *, data_root=None, checkpoint_dir=None,
                 backbone=None, dataset=None):
        """`backbone` / `dataset` may be given directly (tests); else built from spec / config."""
        backbone = rt.start_head_trainer(self, cfg, model_spec, out_dir, checkpoint_dir=checkpoint_dir, backbone=backbone)
        m = cfg["model"]
        self.model = OwlDetector.for_backbone(backbone.to(self.device), merge=m["merge"], seed=self.seed,
                                              objectness=bool(m["objectness"]))
        for p in self.model.backbone.parameters():
            p.requires_grad_(False)
        if m["finetune"] != "none":
            for _, p in self.model.backbone.qv_parameters(("image",), m["finetune"]):
                p.requires_grad_(True)
        if self.model.objectness_head is not None:
            self.model.objectness_head.requires_grad_(False)
        dataset = dataset if dataset is not None else make_dataset(cfg, data_root, self.rank)
        self.kept = train_categories(dataset, cfg["data"]["train_classes"])
        if not self.kept:
            raise UserError("no categories left to train on", fix="check data.train_classes")
        self.classnames = [dataset.classnames[k][0] for k in self.kept]
        inp = cfg["input"]
        self.samples = TrainSamples(dataset, self.kept, int(inp["size"]), float(inp["pad_value"]), bool(inp["flip"]),
                                    self.seed)
        self.loss_weights = LossWeights(**cfg["loss"])
        with torch.no_grad():  # frozen text tower: [T, C, D] query embeddings, computed once
            names = [owl_canonicalize(n) if cfg["text"]["canonicalize"] == "owl" else n for n in self.classnames]
            self.queries = torch.stack([self.model.text_queries([t.format(n) for n in names]).float()
                                        for t in get_templates(cfg["text"]["templates"])])
        op = cfg["optim"]
        heads = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        tuned = [p for n, p in self.model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
        groups = [{"params": heads, "lr_mult": 1.0}] + ([{"params": tuned, "lr_mult": op["backbone_multiplier"]}]
                                                       if tuned else [])
        self.opt = torch.optim.Adam(groups, lr=op["lr"], betas=tuple(op["betas"]), eps=op["eps"],
                                    weight_decay=op["weight_decay"])
        self.params = heads + tuned
        self.scaler = rt.grad_scaler(self.amp_dtype)
        self.ddp = rt.wrap_ddp(self.model, self.device, self.world)
        self.step = 0

    # ---- data
    def loader(self, start: int):
        steps = range(start, self.total_steps)
        sampler = [[s * self.batch + self.rank * self.local_batch + i for i in range(self.local_batch)] for s in steps]
        return torch.utils.data.DataLoader(self.samples, batch_sampler=sampler, num_workers=int(self.cfg["train"]["workers"]),
                                           collate_fn=_collate, pin_memory=self.device.type == "cuda")

    def step_queries(self, step: int) -> torch.Tensor:
        """[C, D]: every class in one template drawn by (seed, step)."""
        t = np.random.default_rng([self.seed, step, 2]).integers(0, self.queries.shape[0], self.queries.shape[1])
        return self.queries[torch.as_tensor(t), torch.arange(self.queries.shape[1])].to(self.device)

    # ---- one step
    def train_step(self, step: int, batch) -> dict:
        op = self.cfg["optim"]
        lr = warmup_cosine_lr(step, self.total_steps, op["lr"], int(op["warmup_steps"]))
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        images, raw_targets = batch
        pixels = self.model.backbone.preprocess.normalize(images.to(self.device, non_blocking=True))
        c = len(self.classnames)
        targets = [{"labels": torch.nn.functional.one_hot(lab, c).float(), "boxes": box} for lab, box in raw_targets]
        self.model.train()
        with rt.autocast(self.device, self.amp_dtype):
            out = self.ddp(pixels, self.step_queries(step))
        losses = detection_loss(out["logits"].float(), out["boxes"].float(), targets, self.loss_weights)
        gnorm = rt.optimizer_step(losses["loss"], self.opt, self.scaler, self.params, op["grad_clip"])
        stats = torch.stack([losses[k].detach().float() for k in ("loss", "class", "bbox", "giou")])
        stats = rt.mean_over_processes(stats, self.world)
        return {"loss": float(stats[0]), "class": float(stats[1]), "bbox": float(stats[2]), "giou": float(stats[3]),
                "lr": lr, "grad_norm": float(gnorm)}

    # ---- the loop (checkpoints and run: rt.ParameterCheckpoints)
    def _identity(self) -> dict:
        return {"config": rt.public(self.cfg), "spec": self.spec, "backbone_sha256": self.backbone_sha}

    def batches(self, start: int):
        return zip(range(start, self.total_steps), self.loader(start))

    @staticmethod
    def line(st: dict) -> str:
        return (f"step {st['step']}: loss {st['loss']:.4f} (class {st['class']:.3f} bbox {st['bbox']:.3f} "
                f"giou {st['giou']:.3f}) lr {st['lr']:.2e}")

    def export(self) -> Path:
        tuned = [n for n, p in self.model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
        return save_detector(self.model, self.out, self.spec, backbone_weights=tuned,
                             extra={"finetune": self.cfg["model"]["finetune"], "backbone_sha256": self.backbone_sha,
                                    "training": {**rt.public(self.cfg), "classes": self.classnames,
                                                 "steps_done": self.step}})


def build_parser():
    return rt.head_trainer_parser("silc-bench train owl-det", __doc__.split("\n")[0], "YAML recipe (configs/owl/*.yaml)",
                                  "run folder: log, checkpoint, heads.safetensors + owl_detector.json")


def main(argv=None) -> int:
    return rt.head_trainer_main(argv, build_parser(), load_config, Trainer, DETECTOR_FILE)


if __name__ == "__main__":
    run_main(main)
