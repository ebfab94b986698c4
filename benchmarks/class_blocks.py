"""Post-forward work by blocks of classes against the whole stack, on random logits, same run.

zs-seg: `stitch_and_argmax` for one ADE-sized image (two 448 windows of a 28x28 patch grid on a
448x598 canvas, label 512x683), all classes at once against the CPU's cache-sized blocks
(`stitch_block_size`). ov-seg: `combine_views` for CAT-Seg's 5 views (96x96 logits, 640 canvas,
384 windows, label 512x683) in 64-class chunks (the accelerator setting, and the CPU's before
blocks) against `combine_block_size`. Both check identical predictions.

    python benchmarks/class_blocks.py [--classes 150] [--repeats 5]

Last line: `zs_seg_block_speedup=X ov_seg_block_speedup=Y` (medians; X > 1: blocks are faster).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from silc_bench.harness import ov_seg, zs_seg


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out, times = fn(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    gen, label = torch.Generator().manual_seed(0), (512, 683)
    crops = [(box, torch.randn(args.classes, 28, 28, generator=gen) * 0.05)
             for box in zs_seg.slide_windows(448, 598, 448, 224)]
    block = zs_seg.stitch_block_size(args.classes, 448, 598, label, "cpu")
    t_whole, whole = timed(lambda: zs_seg.stitch_and_argmax(crops, 448, 598, label, None), args.repeats)
    t_block, blocked = timed(lambda: zs_seg.stitch_and_argmax(crops, 448, 598, label, block), args.repeats)
    print(f"zs-seg stitch, {args.classes} classes: whole stack {t_whole:.3f} s, blocks of {block} {t_block:.3f} s, "
          f"same prediction: {torch.equal(whole, blocked)}")

    protocol = {"out_res": 640, "crop": 384, "stride": 256, "global_view": True}
    boxes = ov_seg.slide_windows(640, 640, 384, 256)
    logits = torch.randn(len(boxes) + 1, args.classes, 96, 96, generator=gen)
    cpu_block = ov_seg.combine_block_size(args.classes, len(boxes) + 1, protocol, label, "cpu")
    t_chunk, chunked = timed(lambda: ov_seg.combine_views(logits, boxes, protocol, label, None, ov_seg.CLASS_CHUNK),
                             args.repeats)
    t_cpu, cpu = timed(lambda: ov_seg.combine_views(logits, boxes, protocol, label, None, cpu_block), args.repeats)
    print(f"ov-seg combine, {args.classes} classes: chunks of {ov_seg.CLASS_CHUNK} {t_chunk:.3f} s, blocks of "
          f"{cpu_block} {t_cpu:.3f} s, same prediction: {torch.equal(chunked, cpu)}")
    print(f"zs_seg_block_speedup={t_whole / t_block:.3f} ov_seg_block_speedup={t_chunk / t_cpu:.3f}")


if __name__ == "__main__":
    main()
