"""What a toy model has learned, measured at three levels (the toy-world issue's diagnosis).

    python experiments/toy_diagnose.py --models toy-clip,toy-silc-c [--images 300] [--json OUT]

For each model, on scenes of the toy world (`--world`, default 2) at the models' own input size
(64 px, one window):
1. image level: "is class c in the picture?" scored by cosine(global embedding, class text
   embedding); AUROC per class, averaged over thing and over stuff classes. Text embeddings come
   from two prompt sets: the toy world's own (`toyworld`, worded like its captions) and CLIP's 80
   ImageNet templates, which use words the toy captions never contain.
2. patch level, zero-shot: each 8x8 patch labelled by the class covering most of it; the patch's
   dense feature (the model's default dense path) classified by cosine to the class texts;
   patch accuracy and mIoU over things and stuff (the patch-level core of zs-seg).
   Context leakage: restricted to the thing classes, how often a thing patch's wrong answer (and a
   stuff patch's answer) names a thing that is elsewhere in the same picture. A patch feature that
   says "what is in this image" rather than "what is here" scores high; chance is the share of
   the other thing classes present.
3. patch level, linear probe: a softmax classifier trained on frozen dense features of scenes of
   the "train" stream, tested on "validation" scenes. Compared with the same probe on raw pixels
   (the patch's 8x8x3 values) and on the same architecture at random initialisation: information
   in the features versus information merely present in the pixels.

`--window N` computes the dense features on N-px windows tiled over each scene (a quarter of it
for N = 32) instead of the whole 64-px scene: less context per patch, to see how much of a
model's patch error comes from context mixed in by the encoder.

An experiment, not part of the library: it calls the public model interface (`load_model`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's silc_bench, installed or not

from silc_bench.checkpoints import load_model  # noqa: E402
from silc_bench.data import prompts  # noqa: E402
from silc_bench.data import toyworld as tw  # noqa: E402
from silc_bench.harness.zs_seg import class_embeddings  # noqa: E402

SIZE, PATCH = 64, 8
NST = len(tw.STUFF_CLASSES)


def scenes(split: str, n: int, seed: int = 0, world: int = 2):
    """Images [n, 3, 64, 64] in [0, 1], patch labels [n, 8, 8], presence [n, C]."""
    imgs, plabels, present = [], [], []
    g = SIZE // PATCH
    for i in range(n):
        s = tw.render(i, seed, SIZE, split, world=world)
        imgs.append(torch.from_numpy(s.image).permute(2, 0, 1).float() / 255)
        blocks = s.labels.reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g, g, -1)
        plabels.append(np.apply_along_axis(lambda v: np.bincount(v, minlength=tw.NUM_CLASSES).argmax(), 2, blocks))
        present.append(np.bincount(s.labels.ravel(), minlength=tw.NUM_CLASSES) > 0)
    return torch.stack(imgs), torch.from_numpy(np.stack(plabels)).long(), np.stack(present)


@torch.inference_mode()
def text_embeddings(model, templates: list[str]) -> torch.Tensor:
    """[C, D]: zs-seg's own class embeddings (each prompt normalised, averaged, renormalised)."""
    return class_embeddings(model, [[name] for name in tw.CLASSES], templates, "cpu")[:, 0]


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half); NaN when a class has no positive or no negative."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="stable")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    allv = np.concatenate([pos, neg])
    for v in np.unique(allv):  # average ranks of ties
        m = allv == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def miou(pred: torch.Tensor, gt: torch.Tensor, classes) -> float:
    ious = []
    for c in classes:
        inter = ((pred == c) & (gt == c)).sum().item()
        union = ((pred == c) | (gt == c)).sum().item()
        if (gt == c).any():
            ious.append(inter / union)
    return 100 * float(np.mean(ious))


def leakage(sim: torch.Tensor, patch_labels: torch.Tensor, present: np.ndarray) -> dict:
    """sim [n, h, w, C] patch-text cosines; thing-only argmax; see the module docstring."""
    pred = sim[..., NST:].argmax(-1) + NST
    things = patch_labels >= NST
    pres = torch.from_numpy(present)
    n = pred.shape[0]
    named_present = pres[torch.arange(n)[:, None, None].expand_as(pred), pred]
    wrong = things & (pred != patch_labels)
    others = (pres[:, NST:].sum(1).float() - 1).clamp(min=0) / (tw.NUM_CLASSES - NST - 1)
    return {"thing_patch_acc_among_things": 100 * (pred[things] == patch_labels[things]).float().mean().item(),
            "wrong_thing_names_present_thing": 100 * named_present[wrong].float().mean().item(),
            "stuff_patch_names_present_thing": 100 * named_present[~things].float().mean().item(),
            "chance_present_other_thing": 100 * others.mean().item()}


def split_scores(pred, gt) -> dict:
    return {"patch_acc": 100 * (pred == gt).float().mean().item(),
            "mIoU": miou(pred, gt, range(tw.NUM_CLASSES)),
            "mIoU_things": miou(pred, gt, range(NST, tw.NUM_CLASSES)),
            "mIoU_stuff": miou(pred, gt, range(NST))}


@torch.inference_mode()
def features(model, images: torch.Tensor, batch: int = 100, mode: str | None = None, window: int = SIZE):
    """Global embeddings [n, D] and dense features [n, 8, 8, D]; dense from `window`-px tiles."""
    if SIZE % window or window % PATCH:
        raise SystemExit(f"--window must divide {SIZE} and be a multiple of {PATCH}")
    glob, dense = [], []
    t = window // PATCH
    for i in range(0, len(images), batch):
        x = model.preprocess.normalize(images[i:i + batch])
        glob.append(model.encode_image(x).float())
        d = None
        for y0 in range(0, SIZE, window):
            for x0 in range(0, SIZE, window):
                tile = model.dense_features(x[:, :, y0:y0 + window, x0:x0 + window], mode).float()
                if d is None:
                    d = tile.new_zeros(tile.shape[0], SIZE // PATCH, SIZE // PATCH, tile.shape[-1])
                d[:, y0 // PATCH:y0 // PATCH + t, x0 // PATCH:x0 // PATCH + t] = tile
        dense.append(d)
    return torch.cat(glob), torch.cat(dense)


def linear_probe(train_x, train_y, test_x, steps: int = 300, seed: int = 0) -> torch.Tensor:
    """Softmax regression (full-batch Adam on standardised features, tiny weight decay); test predictions."""
    torch.manual_seed(seed)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], tw.NUM_CLASSES, requires_grad=True)
    bias = torch.zeros(tw.NUM_CLASSES, requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.05, weight_decay=1e-5)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(a @ w + bias, train_y).backward()
        opt.step()
    with torch.no_grad():
        return (b @ w + bias).argmax(1)


def raw_patches(images: torch.Tensor) -> torch.Tensor:
    n = images.shape[0]
    g = SIZE // PATCH
    return images.reshape(n, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(n * g * g, -1)


def diagnose(model, data: dict, with_probe: bool = True, mode: str | None = None, window: int = SIZE) -> dict:
    test_imgs, test_pl, test_present = data["test"]
    glob, dense = features(model, test_imgs, mode=mode, window=window)
    out = {}
    for set_name in ("toyworld", "openai_imagenet_80"):
        txt = text_embeddings(model, prompts.get_templates(set_name))
        sims = (F.normalize(glob, dim=-1) @ txt.T).numpy()
        au = [auroc(sims[:, c], test_present[:, c]) for c in range(tw.NUM_CLASSES)]
        patch_sims = F.normalize(dense, dim=-1) @ txt.T
        zs = patch_sims.argmax(-1)
        out[set_name] = {"auroc_things": float(np.nanmean(au[NST:])), "auroc_stuff": float(np.nanmean(au[:NST])),
                         "zero_shot_patch": split_scores(zs.reshape(-1), test_pl.reshape(-1)),
                         "context_leakage": leakage(patch_sims, test_pl, test_present)}
    if with_probe:
        train_imgs, train_pl, _ = data["train"]
        _, train_dense = features(model, train_imgs, mode=mode, window=window)
        pred = linear_probe(train_dense.reshape(-1, train_dense.shape[-1]), train_pl.reshape(-1),
                            dense.reshape(-1, dense.shape[-1]))
        out["linear_probe_patch"] = split_scores(pred, test_pl.reshape(-1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/toy_diagnose.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy-clip,toy-silc-c", help="comma-separated model specs (load_model)")
    ap.add_argument("--images", type=int, default=300, help="test scenes (validation stream)")
    ap.add_argument("--train-images", type=int, default=300, help="probe training scenes (train stream)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-init probes")
    ap.add_argument("--no-probe", action="store_true", help="image level and zero-shot patches only")
    ap.add_argument("--world", type=int, default=2, help="toy world version of the scenes (silc_bench.data.toyworld.WORLDS)")
    ap.add_argument("--dense-mode", help="dense path (default: the model's own, map_value for MAP models)")
    ap.add_argument("--window", type=int, default=SIZE, help="dense features from windows of this size (px)")
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    data = {"test": scenes("validation", args.images, world=args.world)}
    if not args.no_probe:
        data["train"] = scenes("train", args.train_images, world=args.world)
    results = {}
    for spec in args.models.split(","):
        model = load_model(spec)
        model.eval()
        results[spec] = diagnose(model, data, not args.no_probe, args.dense_mode, args.window)
        print(spec, json.dumps(results[spec], indent=1), flush=True)
    if not args.no_probe and not args.no_baselines:
        from silc_bench.models.two_tower import BigVisionModel, TwoTower

        ref = load_model(args.models.split(",")[0])
        rand = BigVisionModel(TwoTower.from_config(ref.config, seed=0).eval(), ref.tokenizer, ref.preprocess)
        results["random-init"] = diagnose(rand, data)
        pred = linear_probe(raw_patches(data["train"][0]), data["train"][1].reshape(-1), raw_patches(data["test"][0]))
        results["raw-pixels"] = {"linear_probe_patch": split_scores(pred, data["test"][1].reshape(-1))}
        for k in ("random-init", "raw-pixels"):
            print(k, json.dumps(results[k], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
