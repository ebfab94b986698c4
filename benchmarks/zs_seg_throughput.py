"""Zero-shot segmentation throughput: the harness vs a bare forward vs the anchors' per-crop loop.

All three see the same model, images and crops in one run; text embeddings are computed once
beforehand and excluded from every timing. Last line:
    speedup_vs_per_crop_loop=X overhead_vs_bare_forward=Y
X = per-crop loop time / harness time; Y = harness time / bare forward time.

    python benchmarks/zs_seg_throughput.py                 # ViT-B/16 MAP model, 448 crops
    python benchmarks/zs_seg_throughput.py --arch small    # ViT-S/16
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.data.segmentation import open_dataset
from silc_bench.harness import zs_seg
from silc_bench.metrics.segmentation import SegmentationMetric
from silc_bench.models.base import Tokenizer
from silc_bench.models.text import TextConfig
from silc_bench.models.two_tower import BigVisionModel, TwoTower, TwoTowerConfig
from silc_bench.models.vit import ViTConfig

ARCHS = {
    "base": dict(width=768, depth=12, heads=12),
    "small": dict(width=384, depth=12, heads=6),
    "tiny": dict(width=192, depth=12, heads=3),
}


class HashTokenizer(Tokenizer):
    """Deterministic ids without a vocabulary file (the benchmark times images, not text)."""

    context_length = 16

    def __call__(self, texts):
        ids = [[(hash(w) % 999) + 1 for w in t.split()][: self.context_length] for t in texts]
        return torch.tensor([row + [0] * (self.context_length - len(row)) for row in ids])

    def describe(self):
        return {"kind": "hash"}


def build_model(arch: str) -> BigVisionModel:
    cfg = TwoTowerConfig(img=ViTConfig(**ARCHS[arch], patch_size=16, grid=(14, 14), pool_type="map"),
                         txt=TextConfig(vocab_size=1000, width=ARCHS[arch]["width"], depth=2, heads=ARCHS[arch]["heads"],
                                        length=16, out_dim=ARCHS[arch]["width"]))
    return BigVisionModel(TwoTower.from_config(cfg, seed=0), HashTokenizer()).eval()


def resized_image(model, sample, p):
    image = sample["image"].float()
    h, w = zs_seg.rescale_size(*image.shape[-2:], p["short_side"], p["long_side_max"])
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False).round().clamp(0, 255)
    return model.preprocess.normalize(image / 255.0)[0]


def per_crop_loop(model, dataset, prepared, p):
    """The anchors' loop: one crop per forward under no_grad, data read in the main process."""
    metric = SegmentationMetric(dataset.num_classes)
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            image = resized_image(model, sample, p)
            h, w = image.shape[-2:]
            total = torch.zeros(1, dataset.num_classes, h, w)
            count = torch.zeros(1, 1, h, w)
            for y1, x1, y2, x2 in zs_seg.slide_windows(h, w, p["crop"], p["stride"]):
                patch_logits = zs_seg._patch_logits(model, prepared, image[None, :, y1:y2, x1:x2])[0]
                total[0, :, y1:y2, x1:x2] += zs_seg._upsample(patch_logits, (y2 - y1, x2 - x1))
                count[:, :, y1:y2, x1:x2] += 1
            out = F.interpolate(total / count, size=sample["label"].shape, mode="bilinear", align_corners=False)
            metric.update(out[0].argmax(0), sample["label"])
    return metric.compute()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="base", choices=list(ARCHS))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as root:
        write_segmentation_fixture("ade150", root, num_images=args.images, size=(512, 683), seed=0)
        dataset = open_dataset("ade150", root)
        model = build_model(args.arch)
        task_protocol = {"short_side": 448, "long_side_max": 2048, "crop": 448, "stride": 224,
                         "templates": "openai_imagenet_80", "dense_mode": None}
        prepared = zs_seg.setup(model, dataset, task_protocol, "cpu")
        crops = []
        for i in range(len(dataset)):
            image = resized_image(model, dataset[i], task_protocol)
            for y1, x1, y2, x2 in zs_seg.slide_windows(*image.shape[-2:], 448, 224):
                crops.append(image[:, y1:y2, x1:x2])
        print(f"model ViT-{args.arch}/16 MAP, {len(dataset)} images 512x683, {len(crops)} crops of 448, "
              f"{torch.get_num_threads()} threads", flush=True)

        # Warm-up so no method pays for first-call allocations.
        with torch.inference_mode():
            model.dense_features(crops[0][None])

        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(crops), args.batch_size):
                model.dense_features(torch.stack(crops[i:i + args.batch_size]))
        bare = time.perf_counter() - t
        print(f"bare forward (batch {args.batch_size}):  {bare:8.2f} s  {len(crops) / bare:6.2f} crops/s", flush=True)

        t = time.perf_counter()
        state = zs_seg.evaluate(model, dataset, prepared, range(len(dataset)), device="cpu",
                                batch_size=args.batch_size, workers=args.workers)
        harness = time.perf_counter() - t
        metrics, _ = zs_seg.finalize(dataset, state)
        print(f"harness (batch {args.batch_size}, workers {args.workers}): {harness:8.2f} s  "
              f"{len(dataset) / harness:6.2f} img/s  mIoU {metrics['mIoU']:.4f}", flush=True)

        t = time.perf_counter()
        loop_metrics = per_crop_loop(model, dataset, prepared, task_protocol)
        loop = time.perf_counter() - t
        print(f"per-crop loop:           {loop:8.2f} s  {len(dataset) / loop:6.2f} img/s  mIoU {loop_metrics['mIoU']:.4f}",
              flush=True)
        assert abs(loop_metrics["mIoU"] - metrics["mIoU"]) < 1e-6 or (metrics["mIoU"] != metrics["mIoU"]), \
            "the per-crop loop and the harness must agree"
        print(f"speedup_vs_per_crop_loop={loop / harness:.2f} overhead_vs_bare_forward={harness / bare:.2f}")


if __name__ == "__main__":
    main()
