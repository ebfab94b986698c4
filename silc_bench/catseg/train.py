"""CAT-Seg training (plain PyTorch; DDP under torchrun).

    silc-bench train cat-seg --model SPEC --config configs/cat_seg/vitb_384.yaml --out DIR [--resume]
    torchrun --nproc_per_node 4 -m silc_bench.catseg.train --model SPEC --config ... --out DIR

Recipe (configs/cat_seg/vitb_384.yaml = CAT-Seg's vitb_384): crop 384, batch 4, 80k iterations,
AdamW lr 2e-4 wd 1e-4 (0 on norm layers and embeddings, as detectron2's optimizer builder),
backbone params x0.01, cosine decay to 0 (no warm-up), gradient clipping at norm 0.01 over all
trainable parameters, loss = per-class binary cross-entropy with logits against one-hot targets at
the logit resolution (labels nearest-downsampled; ignore-index pixels left out of the mean).
CAT-Seg itself upsamples logits to the label size and keeps ignored pixels with all-zero targets;
its SSD colour augmentation is not applied here.

Data: any map-style dataset of {"image": uint8 [3, H, W], "label": int64 [H, W]} plus a class list;
`train_classes` picks the classes trained on (others -> ignore). Sample position
p = step * batch + i -> a seeded per-epoch permutation; crop and flip seeded by (seed, p), so a
resumed run repeats the uninterrupted one exactly and a step's batch does not depend on the
number of processes. Outputs in --out: config.json, log.jsonl, checkpoint.pt (atomic: trainable
weights, optimizer, step, RNG), and at the end catseg.safetensors + catseg.json (the format and
its loader: silc_bench.checkpoints.catseg). Device, precision, processes, resume and the step
loop: silc_bench.training.runtime.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from silc_bench.catseg.model import CatSeg, CatSegConfig
from silc_bench.checkpoints.catseg import META_FILE, save_catseg
from silc_bench.errors import UserError
from silc_bench.recipes import merge_settings, read_recipe, run_main
from silc_bench.training import runtime as rt

IGNORE = 255

DEFAULTS = {
    "model": {},  # CatSegConfig fields; `version: early` selects the early-CAT-Seg preset
    "data": {
        "name": None,       # a configs/datasets.yaml entry, or
        "dataset": None,    # an inline entry in that format (training splits are not registered), or
        "toyworld": None,   # {root, num_images, size, seed}: written with toyworld.write_ade_split
        "train_classes": "all",  # all | seen (drop the entry's `unseen_classes`) | [names]
    },
    "augment": {"mode": "shortest_crop", "scale": [0.5, 1.0], "ratio": [0.75, 1.3333], "flip": True},
    "optim": {"lr": 2e-4, "weight_decay": 1e-4, "backbone_multiplier": 0.01, "grad_clip": 0.01,
              "betas": [0.9, 0.999], "eps": 1e-8, "warmup_steps": 0},
    "train": {"batch_size": 4, "steps": 80_000, "seed": 0, "ckpt_every": 1000, "log_every": 20,
              "precision": "fp32", "device": "auto", "workers": 4, "threads": None},
}
_RUNTIME = ("ckpt_every", "log_every", "device", "workers", "threads")  # may change when resuming


# ---------------------------------------------------------------------------------- config
def _merge(base: dict, over: dict, path) -> dict:
    # `model` is taken whole: CatSegConfig checks its keys.
    return merge_settings(base, over, path, what="CAT-Seg training", defaults_at="silc_bench/catseg/train.py DEFAULTS",
                          replaced_sections=("model",))


def load_config(path=None, overrides: dict | None = None) -> dict:
    raw = {}
    if path is not None:
        raw = read_recipe(path, "CAT-Seg")
        if raw.get("base"):  # a variant: its base recipe (next to it) with these settings on top
            base = load_config(Path(path).parent / raw.pop("base"))
            raw = {**raw, "model": {**base["model"], **raw.get("model", {})}}
            raw = _merge(base, raw, path)
    cfg = _merge(_merge(DEFAULTS, raw, path), overrides or {}, path)
    try:
        CatSegConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise UserError(f"bad CAT-Seg model settings: {e}", path=path,
                        fix="see CatSegConfig in silc_bench/catseg/model.py") from e
    if cfg["augment"]["mode"] not in ("shortest_crop", "random_resized"):
        raise UserError(f"unknown augment mode {cfg['augment']['mode']!r}", path=path,
                        fix="use shortest_crop (CAT-Seg) or random_resized")
    return cfg


def cosine_lr(step: int, total: int, base: float, warmup: int = 0) -> float:
    """detectron2 WarmupCosineLR: base * (1 + cos(pi * step / total)) / 2, linear warm-up factor."""
    lr = base * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


# ---------------------------------------------------------------------------------- data
def make_dataset(cfg: dict, data_root=None, rank: int = 0):
    """-> (dataset, class names [[synonyms]], entry) from the `data` section."""
    from silc_bench import paths, registry
    from silc_bench.data.segmentation import dataset_from_entry

    d = cfg["data"]
    if sum(bool(d.get(k)) for k in ("name", "dataset", "toyworld")) != 1:
        raise UserError("the data section needs exactly one of name, dataset, toyworld",
                        fix="e.g. data: {toyworld: {num_images: 1000}} (see configs/cat_seg/toy.yaml)")
    if d.get("toyworld"):
        from silc_bench.data import toyworld as tw

        opts = {"root": "toyworld_train", "num_images": 1000, "size": 96, "seed": 0, "world": tw.DEFAULT_WORLD,
                **d["toyworld"]}
        root = paths.data_root(data_root) / opts["root"]
        if rank == 0:
            tw.write_ade_split(root, "training", num_images=opts["num_images"], size=opts["size"], seed=opts["seed"],
                               world=opts["world"])
        if dist.is_initialized():
            dist.barrier()
        entry = {"name": "toyworld-train", "layout": "glob", "root": str(root / "ADEChallengeData2016"),
                 "split": "training", "images": "images/training/*.jpg", "labels": "annotations/training/*.png",
                 "classnames": "toyworld.txt", "num_classes": tw.NUM_CLASSES, "reduce_zero_label": True,
                 "ignore_index": IGNORE, "num_images": opts["num_images"], "unseen_classes": list(tw.UNSEEN_CLASSES)}
    else:
        entry = registry.dataset_entry(d["name"]) if d.get("name") else dict(d["dataset"])
    ds = dataset_from_entry(entry, data_root)
    return ds, ds.classnames, entry


def class_subset(classnames: list, train_classes, entry: dict | None = None) -> tuple[list, np.ndarray]:
    """-> (kept class names, label lookup table: dataset id -> train id or IGNORE)."""
    first = [c[0] if isinstance(c, (list, tuple)) else c for c in classnames]
    if train_classes in (None, "all"):
        keep = list(range(len(first)))
    elif train_classes == "seen":
        unseen = set((entry or {}).get("unseen_classes") or [])
        if not unseen:
            raise UserError("train_classes: seen needs the dataset entry's unseen_classes list",
                            fix="list the training classes explicitly or use train_classes: all")
        keep = [i for i, n in enumerate(first) if n not in unseen]
    else:
        unknown = [n for n in train_classes if n not in first]
        if unknown:
            raise UserError(f"train_classes {unknown} are not classes of the dataset",
                            fix=f"choose from {first}")
        keep = [first.index(n) for n in train_classes]
    lut = np.full(max(len(first), IGNORE) + 1, IGNORE, np.int64)  # ids past the classes -> ignore
    lut[keep] = np.arange(len(keep))
    return [classnames[i] for i in keep], lut


class TrainSamples(torch.utils.data.Dataset):
    """Item p (a sample position) -> augmented crop: image float [3, S, S] in [0, 1], label [S, S]."""

    def __init__(self, dataset, lut: np.ndarray, crop: int, augment: dict, seed: int):
        self.dataset, self.lut, self.crop, self.aug, self.seed = dataset, torch.from_numpy(lut), crop, augment, seed

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))

    def __len__(self) -> int:
        return 1 << 62  # positions, not items

    def __getitem__(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.dataset)
        item = self.dataset[int(self._order(p // n)[p % n])]
        rng = np.random.default_rng([self.seed, 1, p])
        img = item["image"].float().div_(255)
        label = self.lut[item["label"].clamp(0, len(self.lut) - 1)]
        return augment_pair(img, label, self.crop, self.aug, rng)


def augment_pair(img, label, crop: int, aug: dict, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """shortest_crop (CAT-Seg): short side -> crop, random crop x crop window; random_resized:
    torchvision-style area/ratio box resized to crop x crop. Then a random horizontal flip."""
    h, w = label.shape
    if aug["mode"] == "shortest_crop":
        s = crop / min(h, w)
        nh, nw = max(crop, round(h * s)), max(crop, round(w * s))
        img, label = _resize(img, label, nh, nw)
        y, x = int(rng.integers(nh - crop + 1)), int(rng.integers(nw - crop + 1))
        img, label = img[:, y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]
    else:
        box = None
        for _ in range(10):
            area = h * w * rng.uniform(*aug["scale"])
            ratio = math.exp(rng.uniform(math.log(aug["ratio"][0]), math.log(aug["ratio"][1])))
            bw, bh = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < bw <= w and 0 < bh <= h:
                box = (int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1)), bh, bw)
                break
        y, x, bh, bw = box or ((h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w), min(h, w))
        img, label = _resize(img[:, y:y + bh, x:x + bw], label[y:y + bh, x:x + bw], crop, crop)
    if aug.get("flip", True) and rng.random() < 0.5:
        img, label = img.flip(-1), label.flip(-1)
    return img.contiguous(), label.contiguous()


def _resize(img, label, h: int, w: int):
    if tuple(label.shape) == (h, w):
        return img, label
    img = F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    return img.clamp_(0, 1), label


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean per-class BCE over non-ignored pixels; labels [B, H, W] nearest-downsampled to the logits."""
    k = logits.shape[1]
    target = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
    valid = target != IGNORE
    onehot = F.one_hot(torch.where(valid, target, 0), k).permute(0, 3, 1, 2).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), onehot, reduction="none")
    return (loss * valid[:, None]).sum() / (valid.sum() * k).clamp(min=1)


def param_groups(model: nn.Module, optim: dict) -> list[dict]:
    """detectron2's rule: weight decay except on norm layers and embeddings; backbone lr x multiplier."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)
    groups: dict = {}
    for mname, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            mult = optim["backbone_multiplier"] if mname.startswith("backbone.") else 1.0
            wd = 0.0 if isinstance(module, norms) else optim["weight_decay"]
            groups.setdefault((mult, wd), []).append(p)
    return [{"params": ps, "lr_mult": m, "weight_decay": wd} for (m, wd), ps in sorted(groups.items())]


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: dict, model_spec: str, out_dir, *, data_root=None, checkpoint_dir=None,
                 backbone=None, dataset=None, classnames=None):
        """`backbone`/`dataset`+`classnames` may be given directly (tests); else built from spec/config."""
        backbone = rt.start_head_trainer(self, cfg, model_spec, out_dir, checkpoint_dir=checkpoint_dir, backbone=backbone)
        torch.manual_seed(self.seed)  # head init
        self.model = CatSeg(backbone.to(self.device), cfg["model"])
        self.crop = self.model.config.crop_size
        entry = None
        if dataset is None:
            dataset, classnames, entry = make_dataset(cfg, data_root, self.rank)
        self.classnames, lut = class_subset(classnames, cfg["data"]["train_classes"], entry)
        self.samples = TrainSamples(dataset, lut, self.crop, cfg["augment"], self.seed)

        op = cfg["optim"]
        self.opt = torch.optim.AdamW(param_groups(self.model, op), lr=op["lr"], betas=tuple(op["betas"]), eps=op["eps"])
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.scaler = rt.grad_scaler(self.amp_dtype)
        # static_graph: the same parameters go unused every step (a MaskCLIP dense path never uses
        # the last image block's q), which DDP then handles without a per-step graph search.
        self.ddp = rt.wrap_ddp(self.model, self.device, self.world, static_graph=True)
        self.text = None  # frozen text encoder: the class embeddings, computed once
        if not self.model.text_trainable:
            with torch.no_grad():
                self.text = self.model.encode_classes(self.classnames)
        self.step = 0

    # ---- data
    def loader(self, start: int):
        """Local batches of steps start..total-1 (positions step*batch + rank*local + i)."""
        steps = range(start, self.total_steps)
        sampler = [[s * self.batch + self.rank * self.local_batch + i for i in range(self.local_batch)] for s in steps]
        workers = int(self.cfg["train"]["workers"])
        return torch.utils.data.DataLoader(self.samples, batch_sampler=sampler, num_workers=workers,
                                           pin_memory=self.device.type == "cuda", persistent_workers=False)

    # ---- one step
    def train_step(self, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        """One optimizer step on a local batch (images float [n, 3, S, S] in [0, 1], labels [n, S, S])."""
        op = self.cfg["optim"]
        lr = cosine_lr(step, self.total_steps, op["lr"], op["warmup_steps"])
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        images, labels = batch
        images = self.model.backbone.preprocess.normalize(images.to(self.device, non_blocking=True))
        labels = labels.to(self.device, non_blocking=True)
        self.model.train()
        with rt.autocast(self.device, self.amp_dtype):
            logits = self.ddp(images, self.text if self.text is not None else self.classnames)
        loss = bce_loss(logits, labels)
        gnorm = rt.optimizer_step(loss, self.opt, self.scaler, self.params, op["grad_clip"])
        stat = rt.mean_over_processes(loss.detach().float().reshape(1), self.world)
        return {"loss": float(stat), "lr": lr, "grad_norm": float(gnorm)}

    # ---- checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.folder.checkpoint

    def _identity(self) -> dict:
        return {"config": rt.public(self.cfg), "spec": self.spec, "backbone_sha256": self.backbone_sha}

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        state = {"step": self.step, "trainable": self.model.trainable_state(), **rt.loop_state(self.opt, self.scaler),
                 "identity": json.dumps(self._identity(), sort_keys=True)}
        rt.save_atomic(state, self.ckpt_path)

    def load_checkpoint(self, path: Path) -> None:
        state = rt.read_checkpoint(path, device=self.device, what="CAT-Seg training")
        same = rt.same_settings(state["identity"], self._identity(), section=("config", "train"), runtime_keys=_RUNTIME)
        if not same:
            raise UserError("the checkpoint was written with another config, backbone or steps", path=path,
                            fix="resume with the same --model and config, or use a new --out")
        self.model.load_trainable_state(state["trainable"], source=path)
        rt.restore_loop_state(state, self.opt, self.scaler)
        self.step = int(state["step"])

    # ---- the loop
    def run(self, resume: bool = False, *, stop_at_step: int | None = None, callbacks=()) -> list[dict]:
        """Train to the end and export; -> the statistics of the steps run. `stop_at_step`: pause
        there with a checkpoint written, no export; `callbacks`: callback(steps_done, stats) after
        each step (see runtime.run_steps)."""
        ckpt = self.folder.resume_from(resume, "CAT-Seg training")
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        self.folder.start(self._identity(), self.step)
        tr = self.cfg["train"]
        batches = zip(range(self.step, self.total_steps), self.loader(self.step))
        records = rt.run_steps(self, batches, self.folder, log_every=tr["log_every"], ckpt_every=tr["ckpt_every"],
                               line=lambda st: f"step {st['step']}: loss {st['loss']:.4f} lr {st['lr']:.2e}",
                               stop_at_step=stop_at_step, callbacks=callbacks)
        if self.step == self.total_steps and self.rank == 0:
            self.export()
        if self.world > 1:
            dist.barrier()
        return records

    def export(self) -> Path:
        return save_catseg(self.model, self.out, spec=self.spec, backbone_sha256=self.backbone_sha,
                           train={**rt.public(self.cfg), "classes": self.classnames, "steps_done": self.step})


def build_parser():
    return rt.head_trainer_parser("silc-bench train cat-seg", __doc__.split("\n")[0],
                                  "YAML recipe (configs/cat_seg/*.yaml)",
                                  "run folder: log, checkpoint, catseg.safetensors + catseg.json")


def main(argv=None) -> int:
    return rt.head_trainer_main(argv, build_parser(), load_config, Trainer, META_FILE)


if __name__ == "__main__":
    run_main(main)
