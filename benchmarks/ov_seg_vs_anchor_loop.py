"""ov-seg (CAT-Seg) against an independent anchor loop, a bare forward, and where the harness's time goes.

The anchor loop is written here as CAT-Seg's own code runs inference, without any harness code:
detectron2's `ResizeShortestEdge(640, 2560)` (PIL bilinear on the uint8 image), then
`inference_sliding_window`: the image bilinear to 640x640, `nn.Unfold` into four 384 windows
plus the whole image at 384, the five views in one forward per image, logits bilinear to 384 and
sigmoid, `nn.Fold` / count, `(windows + global) / 2`, bilinear to the label size, argmax, and a
numpy confusion matrix. The model is a CAT-Seg head (CVPR configuration) on an open_clip ViT
(random weights: the cost does not depend on them). In the anchor loop its forward holds every
(view, class) map in each tensor, as CAT-Seg's own code does; the harness's default runs them in
chunks (`benchmarks/catseg_chunks.py`), with the same logits to the bit. The harness runs its own `evaluate` with the
CLI's defaults (batch 16, `default_workers()`: 0 on 2 cores) and with 0 workers. Class text embeddings are computed
before any timing. Both must predict the same number of pixels of each class and hit the same
number (per-class histograms: random weights score ~0 mIoU), checked here.

    python benchmarks/ov_seg_vs_anchor_loop.py [--arch ViT-B-16] [--images 2]

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
from PIL import Image
from torch import nn

from silc_bench.catseg.model import CatSeg, whole_stack
from silc_bench.checkpoints import load_model
from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.data.loading import default_workers
from silc_bench.harness import ov_seg


@torch.inference_mode()
def anchor_loop(model, dataset, classes, short=640, longest=2560, out=640, kernel=384, stride=256):
    with whole_stack():  # CAT-Seg's own forward holds every (view, class) map in each tensor
        return _anchor_loop(model, dataset, classes, short, longest, out, kernel, stride)


def _anchor_loop(model, dataset, classes, short, longest, out, kernel, stride):
    unfold, fold = nn.Unfold(kernel_size=kernel, stride=stride), nn.Fold([out, out], kernel_size=kernel, stride=stride)
    n = len(dataset.classnames)
    conf = np.zeros((n, n), np.int64)
    t0 = time.perf_counter()
    for sample in dataset.samples:
        with Image.open(sample.image) as im:
            pil = im.convert("RGB")
        w0, h0 = pil.size
        scale = short / min(h0, w0)
        nh, nw = (short, scale * w0) if h0 < w0 else (scale * h0, short)
        if max(nh, nw) > longest:
            nh, nw = nh * longest / max(nh, nw), nw * longest / max(nh, nw)
        pil = pil.resize((int(nw + 0.5), int(nh + 0.5)), Image.BILINEAR)
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)[None].float()
        big = F.interpolate(image, size=(out, out), mode="bilinear", align_corners=False)[0]
        crops = unfold(big[None])[0].T.reshape(-1, 3, kernel, kernel)
        whole = F.interpolate(image, size=(kernel, kernel), mode="bilinear", align_corners=False)
        views = model.backbone.preprocess.normalize(torch.cat((crops, whole)) / 255.0)
        outputs = F.interpolate(model(views, classes), size=kernel, mode="bilinear", align_corners=False).sigmoid()
        global_output = F.interpolate(outputs[-1:], size=(out, out), mode="bilinear", align_corners=False)
        outputs = fold(outputs[:-1].flatten(1).T[None]) / fold(unfold(torch.ones(1, 1, out, out)))
        outputs = (outputs + global_output) / 2.0
        pred = F.interpolate(outputs, size=(h0, w0), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        label = np.asarray(Image.open(sample.label)).astype(np.int64) - 1  # ADE: reduce_zero_label
        ok = (label >= 0) & (label < n)
        np.add.at(conf, (label[ok], pred[ok]), 1)
    return time.perf_counter() - t0, conf


@torch.inference_mode()
def bare_forward(model, classes, x: torch.Tensor, batch=16):
    """The model alone on the benchmark's own views (CAT-Seg on random normal input runs ~8% faster
    than on image views, so random input would not be the same work)."""
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        model(x[i:i + batch], classes)
    return time.perf_counter() - t0


def all_views(dataset, prepared, model) -> torch.Tensor:
    """Every image's normalised views, as the harness makes them (untimed)."""
    p = prepared.protocol
    resized = ov_seg._D2Resized(dataset, range(len(dataset)), p["resize_short"], p["resize_max"])
    return torch.cat([ov_seg.make_views(resized[i]["image"].float(), p, prepared.boxes,
                                        model.backbone.preprocess.normalize) for i in range(len(resized))])


def harness(model, harness_obj, dataset, workers, profile=False):
    prepared = harness_obj.setup(model, dataset, harness_obj.protocol_for(dataset, None), "cpu")
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    result = harness_obj.evaluate(model, dataset, prepared, range(len(dataset)), device="cpu", batch_size=16,
                                  workers=workers)
    harness_obj.finalize(dataset, harness_obj.merge([result]), prepared)
    if profiler:
        profiler.disable()
    counts = {k: np.asarray(v) for k, v in next(iter(result.values())).items()}
    return time.perf_counter() - t0, counts, prepared, profiler


def breakdown(profiler, total: float) -> list[str]:
    stats = pstats.Stats(profiler)
    stages = {"decode + resize (PIL, in __getitem__)": ("__getitem__",), "views (make_views)": ("make_views",),
              "forward (CatSeg)": ("_call_impl",), "combine views + argmax": ("combine_views",),
              "metric update": ("update",)}
    out = []
    for name, funcs in stages.items():
        rows = [v for (file, _, fn), v in stats.stats.items() if fn in funcs and
                ("silc_bench" in file or (fn == "_call_impl" and "torch/nn" in file))]
        secs = max((v[3] for v in rows), default=0.0) if funcs == ("_call_impl",) else sum(v[3] for v in rows)
        out.append(f"  {name:40s} {secs:7.2f} s  {100 * secs / total:5.1f}%")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 683))
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed rounds (anchor, harness, bare forward interleaved); medians are reported")
    args = ap.parse_args()
    from silc_bench import registry
    from silc_bench.harness import get_harness

    tmp = Path(tempfile.mkdtemp(prefix="silc_ovseg_"))
    write_segmentation_fixture("ade150", tmp / "data", num_images=args.images, size=tuple(args.size), seed=0)
    torch.manual_seed(0)
    model = CatSeg(load_model(f"open_clip:{args.arch}:random-init")).eval()
    h = get_harness(registry.task_spec("ov-seg"))
    dataset = h.open_dataset("ade150", tmp / "data")
    workers = default_workers()
    rounds = {"anchor": [], "harness": [], "harness0": [], "bare": []}
    for _ in range(args.repeats):  # interleaved, so that load from other processes hits every contender alike
        t, conf = anchor_loop(model, dataset, h.setup(model, dataset, h.protocol_for(dataset, None), "cpu").classes)
        rounds["anchor"].append(t)
        t, counts, prepared, _ = harness(model, h, dataset, workers=workers)
        rounds["harness"].append(t)
        rounds["harness0"].append(t if workers == 0 else harness(model, h, dataset, workers=0)[0])
        rounds["bare"].append(bare_forward(model, prepared.classes, all_views(dataset, prepared, model)))
    t_anchor, t_harness, t_harness0, t_bare = (statistics.median(rounds[k]) for k in
                                               ("anchor", "harness", "harness0", "bare"))
    t_profiled, _, _, profiler = harness(model, h, dataset, workers=0, profile=True)
    inter, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
    with np.errstate(invalid="ignore", divide="ignore"):
        miou = 100 * np.nanmean(np.where(union > 0, inter / union, np.nan))
    views = args.images * prepared.details["views_per_image"]
    print(f"CAT-Seg on {args.arch}, {args.images} images of {args.size[0]}x{args.size[1]}, {views} views of 384, "
          f"{len(dataset.classnames)} classes, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds")
    print(f"anchor loop (one image per forward): {t_anchor:7.2f} s   mIoU {miou:.6f}")
    print(f"harness (CLI defaults, {workers} workers):   {t_harness:7.2f} s")
    if workers:
        print(f"harness (0 workers):                 {t_harness0:7.2f} s")
    print(f"bare forward (batch 16):             {t_bare:7.2f} s")
    print(f"where the harness's time goes (workers=0 profile, {t_profiled:.2f} s):")
    print("\n".join(breakdown(profiler, t_profiled)))
    # Random weights score ~0 mIoU, so compare the histograms: pixels predicted per class, hits per class.
    same = (np.array_equal(counts["pred_area"], conf.sum(0)) and np.array_equal(counts["intersect"], inter)
            and np.array_equal(counts["label_area"], conf.sum(1)))
    print(f"same predictions as the anchor loop (pixels predicted and hit, per class): {same} "
          f"({len(np.flatnonzero(conf.sum(0)))} classes predicted)")
    print(f"speedup_vs_anchor_loop={t_anchor / t_harness:.3f} overhead_vs_bare_forward={t_harness / t_bare:.3f}")


if __name__ == "__main__":
    main()
