"""zs-seg on one accelerator: crops per second, and the share of the device's bf16 peak it reaches.

    python benchmarks/zs_seg_device.py --device cuda --precision bf16            # one GPU
    python benchmarks/zs_seg_device.py --device cuda --precision bf16 --compile  # torch.compile'd model
    python benchmarks/zs_seg_device.py --device cpu --images 2                   # runs anywhere (no peak)

The model is an open_clip ViT (random weights: the cost does not depend on them) through its
MaskCLIP dense path; the images are ADE-sized (512x683, two 448 windows each) in the ADE layout;
the harness runs its own `evaluate` at the CLI's defaults (batch 16, 2 workers) after one untimed
image (warm-up: cuDNN autotuning, the compiler). The model's FLOPs per crop are counted by
`torch.utils.flop_counter` (matmuls, convolutions, attention; a multiply-add is 2 FLOPs); the
peak is the device's dense bf16 tensor-core rate from its datasheet (`PEAK_BF16_TFLOPS`, matched
on the device name) or `--peak-tflops`. A bare forward over the same number of crops, in the
same run, says how much of the harness's time is the model.

Last line: `crops_per_s=X model_tflops_per_s=Y fraction_of_bf16_peak=Z harness_over_bare_forward=W`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from silc_bench.checkpoints import load_model
from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.precision import autocast, check, compile_model

# Dense (no sparsity) bf16 tensor-core TFLOP/s from the vendors' datasheets; first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0), ("A6000", 155.0), ("4090", 165.0),
)


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def flops_per_crop(model, crop: int, device: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    # With autograd on: under inference_mode nn.MultiheadAttention takes its fused fast path, an op
    # the counter does not know, and the attention blocks' FLOPs would go uncounted.
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        model.dense_features(torch.zeros(1, 3, crop, crop, device=device))
    return counter.get_total_flops()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, help="the device's bf16 peak, where the table does not know it")
    args = ap.parse_args()
    check(args.precision, args.device)
    from silc_bench import registry
    from silc_bench.harness import get_harness

    tmp = Path(tempfile.mkdtemp(prefix="silc_device_"))
    write_segmentation_fixture("ade150", tmp / "data", num_images=args.images + 1, size=(512, 683), seed=0)
    torch.manual_seed(0)
    model = load_model(f"open_clip:{args.arch}:random-init", device=args.device)
    flops = flops_per_crop(model, 448, args.device)  # before compiling: the counter sees eager ops
    if args.compile:
        compile_model(model)
    harness = get_harness(registry.task_spec("zs-seg"))
    dataset = harness.open_dataset("ade150", tmp / "data")
    with autocast(args.precision, args.device):
        prepared = harness.setup(model, dataset, harness.protocol_for(dataset, {"templates": "a_photo_of"}),
                                 args.device)

    def evaluate(indices):
        with autocast(args.precision, args.device):
            return harness.evaluate(model, dataset, prepared, indices, device=args.device,
                                    batch_size=args.batch_size, workers=args.workers)

    evaluate([0])  # warm-up, untimed
    sync(args.device)
    t0 = time.perf_counter()
    evaluate(range(1, args.images + 1))
    sync(args.device)
    t_harness = time.perf_counter() - t0
    crops = 2 * args.images  # 512x683 -> 448x598: two 448 windows per image
    pixels = torch.randn(args.batch_size, 3, 448, 448, device=args.device)
    with torch.inference_mode(), autocast(args.precision, args.device):
        model.dense_features(pixels)  # warm-up at this batch size
        sync(args.device)
        t0 = time.perf_counter()
        for i in range(0, crops, args.batch_size):
            model.dense_features(pixels[: min(args.batch_size, crops - i)])
        sync(args.device)
        t_bare = time.perf_counter() - t0
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    peak = peak_tflops(args.device, args.peak_tflops)
    rate = crops / t_harness
    achieved = rate * flops / 1e12
    print(f"{args.arch} on {name}, {args.precision}{' compiled' if args.compile else ''}, {args.images} images of "
          f"512x683 ({crops} crops of 448), batch {args.batch_size}, {args.workers} workers")
    print(f"model: {flops / 1e9:.1f} GFLOPs per 448 crop; device bf16 peak: {peak or 'unknown'} TFLOP/s")
    print(f"harness {t_harness:.2f} s ({rate:.2f} crops/s) | bare forward {t_bare:.2f} s ({crops / t_bare:.2f} crops/s)")
    fraction = f"{achieved / peak:.3f}" if peak else "n/a"
    print(f"crops_per_s={rate:.3f} model_tflops_per_s={achieved:.3f} fraction_of_bf16_peak={fraction} "
          f"harness_over_bare_forward={t_harness / t_bare:.3f}")


if __name__ == "__main__":
    main()
