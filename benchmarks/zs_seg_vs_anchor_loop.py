"""zs-seg against an independent anchor loop, a bare forward, and where the harness's time goes.

The anchor loop is written here as the mmseg-based repositories (TCL, SCLIP, ClearCLIP) write it,
without any harness code: mmcv's image reader and `imrescale`, one crop per forward, mmseg's
slide-window placement and pad-and-add accumulation, logits bilinear to each crop, the overlap
average, bilinear to the label, argmax, and a numpy confusion matrix. The model is an open_clip
ViT (random weights: the cost does not depend on them), its MaskCLIP dense path through
`model.dense_features`. The harness runs its own `evaluate` with the CLI's defaults (the task's
default batch size for the device; `default_workers()`: 0 on 2 cores) and with 0 workers. Class
text embeddings (one template, a row per synonym; a class scores its best synonym, as SCLIP does)
are computed once before any timing and given to both: the benchmark times and compares the image
path. Both must predict the same number of pixels of each class and hit the same
number (per-class histograms: random weights score ~0 mIoU), checked here.

    python benchmarks/zs_seg_vs_anchor_loop.py [--arch ViT-B-16] [--images 4] [--size 512 683]

Last line: `speedup_vs_anchor_loop=X overhead_vs_bare_forward=Y` (X > 1: the harness is faster).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from silc_bench.checkpoints import load_model
from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.data.loading import default_workers

PROTOCOL = {"templates": "a_photo_of"}


@torch.inference_mode()
def anchor_loop(model, root: Path, text, short=448, long=2048, crop=448, stride=224):
    """`text`: [C, S, D] class embeddings, one row per synonym; a class scores its best synonym,
    as SCLIP's `cls_*.txt` lists are used."""
    import mmcv

    num_classes, synonyms, dim = text.shape
    conf = np.zeros((num_classes, num_classes), np.int64)
    t0 = time.perf_counter()
    images = sorted((root / "ADEChallengeData2016/images/validation").glob("*.jpg"))
    for path in images:
        bgr = mmcv.imfrombytes(path.read_bytes(), flag="color", backend="cv2")
        img = mmcv.imrescale(bgr, (long, short), interpolation="bilinear")[..., ::-1].copy()
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0
        x = model.preprocess.normalize(x)
        h, w = x.shape[-2:]
        preds = torch.zeros(1, num_classes, h, w)
        count = torch.zeros(1, 1, h, w)
        rows, cols = max(h - crop + stride - 1, 0) // stride + 1, max(w - crop + stride - 1, 0) // stride + 1
        for r in range(rows):
            for c in range(cols):
                y1, x1 = r * stride, c * stride
                y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                feats = F.normalize(model.dense_features(x[:, :, y1:y2, x1:x2]).float(), dim=-1)
                logits = torch.einsum("bhwd,nd->bnhw", feats, text.view(num_classes * synonyms, dim))
                logits = logits.view(1, num_classes, synonyms, *logits.shape[-2:]).amax(dim=2)
                logits = F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
                preds += F.pad(logits, (x1, w - x2, y1, h - y2))
                count[:, :, y1:y2, x1:x2] += 1
        label_path = root / "ADEChallengeData2016/annotations/validation" / f"{path.stem}.png"
        label = mmcv.imread(str(label_path), flag="unchanged").astype(np.int64) - 1  # ADE: reduce_zero_label
        logits = F.interpolate(preds / count, size=label.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].numpy()
        ok = (label >= 0) & (label < num_classes)
        np.add.at(conf, (label[ok], pred[ok]), 1)
    return time.perf_counter() - t0, conf


@torch.inference_mode()
def bare_forward(model, crops: int, crop=448, batch=16):
    x = torch.randn(crops, 3, crop, crop)
    t0 = time.perf_counter()
    for i in range(0, crops, batch):
        model.dense_features(x[i:i + batch])
    return time.perf_counter() - t0


def harness(model, root, workers, profile=False):
    """The harness's own evaluate over every image (one shard; the CLI's default batch size), after
    an untimed setup (class text embeddings), as `silc-bench run` calls it."""
    from silc_bench import registry
    from silc_bench.harness import get_harness

    h = get_harness(registry.task_spec("zs-seg"))
    dataset = h.open_dataset("ade150", root)
    prepared = h.setup(model, dataset, h.protocol_for(dataset, PROTOCOL), "cpu")
    batch = h.default_batch_size(model, prepared, "cpu")
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    result = h.evaluate(model, dataset, prepared, range(len(dataset)), device="cpu", batch_size=batch, workers=workers)
    h.finalize(dataset, h.merge([result]), prepared)  # timed: the run ends with its metrics
    if profiler:
        profiler.disable()
    counts = {k: np.asarray(v) for k, v in next(iter(result.values())).items()}
    return time.perf_counter() - t0, counts, batch, profiler


def breakdown(profiler, total: float) -> list[str]:
    """Cumulative seconds of the harness's stages, read from a workers=0 profile."""
    stats = pstats.Stats(profiler)
    stages = {"decode (cv2.imdecode)": ("imdecode",), "resize (cv2.resize)": ("resize",),
              "forward (dense_features)": ("dense_features",),
              "stitch (upsample, average, resize, argmax)": ("stitch_and_argmax",), "metric update": ("update",)}
    out = []
    for name, funcs in stages.items():
        secs = sum(v[3] for (file, _, fn), v in stats.stats.items()
                   if (fn in funcs and "silc_bench" in file) or (file == "~" and any(f in fn for f in funcs)))
        out.append(f"  {name:44s} {secs:7.2f} s  {100 * secs / total:5.1f}%")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 683))
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed rounds (anchor, harness, bare forward interleaved); medians are reported")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="silc_anchor_"))
    write_segmentation_fixture("ade150", tmp / "data", num_images=args.images, size=tuple(args.size), seed=0)
    spec = f"open_clip:{args.arch}:random-init"
    torch.manual_seed(0)  # open_clip's random init: the same weights in every load below
    model = load_model(spec)
    from silc_bench import registry
    from silc_bench.harness import get_harness

    # The class text embeddings, untimed and shared: what is compared and timed is the image path.
    h = get_harness(registry.task_spec("zs-seg"))
    dataset = h.open_dataset("ade150", tmp / "data")
    text = h.setup(model, dataset, h.protocol_for(dataset, PROTOCOL), "cpu").text
    with torch.inference_mode():  # warm-up, untimed: the first forward allocates
        model.dense_features(torch.randn(1, 3, 448, 448))
    workers = default_workers()
    crops = sum(2 for _ in range(args.images))  # 512x683 -> 448x598: two 448 windows per image
    rounds = {"anchor": [], "harness": [], "harness0": [], "bare": [], "bare16": []}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits every contender alike
        t, conf = anchor_loop(model, tmp / "data", text)
        rounds["anchor"].append(t)
        t, counts, batch, _ = harness(model, tmp / "data", workers=workers)
        rounds["harness"].append(t)
        rounds["harness0"].append(harness(model, tmp / "data", workers=0)[0])
        rounds["bare"].append(bare_forward(model, crops, batch=batch))
        rounds["bare16"].append(bare_forward(model, crops, batch=16))
    t_anchor, t_harness, t_harness0, t_bare, t_bare16 = (statistics.median(rounds[k]) for k in
                                                         ("anchor", "harness", "harness0", "bare", "bare16"))
    t_profiled, _, _, profiler = harness(model, tmp / "data", workers=0, profile=True)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = 100 * np.nanmean(np.where(union > 0, inter / union, np.nan))
    # Random weights score ~0 mIoU, so compare the histograms: pixels predicted per class, hits per class.
    same = (np.array_equal(counts["pred_area"], conf.sum(0)) and np.array_equal(counts["intersect"], inter)
            and np.array_equal(counts["label_area"], conf.sum(1)))
    print(f"{args.arch}, {args.images} images of {args.size[0]}x{args.size[1]}, {crops} crops of 448, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    print(f"anchor loop (one crop per forward): {t_anchor:7.2f} s   mIoU {miou:.6f}")
    print(f"harness (CLI defaults: batch {batch}, {workers} workers): {t_harness:7.2f} s")
    print(f"harness (0 workers):                {t_harness0:7.2f} s")
    print(f"bare forward (batch {batch}):  {t_bare:7.2f} s   (batch 16: {t_bare16:.2f} s)")
    print(f"where the harness's time goes (workers=0 profile, {t_profiled:.2f} s):")
    print("\n".join(breakdown(profiler, t_profiled)))
    print(f"same predictions as the anchor loop (pixels predicted and hit, per class): {same} "
          f"({len(np.flatnonzero(conf.sum(0)))} classes predicted)")
    print(f"speedup_vs_anchor_loop={t_anchor / t_harness:.3f} overhead_vs_bare_forward={t_harness / t_bare:.3f}")


if __name__ == "__main__":
    main()
