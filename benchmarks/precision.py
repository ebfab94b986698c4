"""bf16 (or fp16) against fp32 on the same run: zs-seg speed ratio and mIoU difference.

    python benchmarks/precision.py [--model toy-silc-c] [--dataset toyworld] [--limit 100] [--precision bf16]

Both runs use the same model, images, batch size and device in one process, records written to a
temporary folder (never mixed with real results). On a GPU pass --device cuda (fp16 too).
Last line: `speed_ratio_vs_fp32=X miou_diff_vs_fp32=Y` (X > 1: faster than fp32).
"""
from __future__ import annotations

import argparse
import tempfile
import time

from silc_bench.runner import RunOptions, default_device, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-silc-c")
    ap.add_argument("--dataset", default="toyworld")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-root")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="silc_precision_")
    result = {}
    for precision in ("fp32", args.precision, "fp32", args.precision):  # twice each: the first warms up
        opts = RunOptions(data_root=args.data_root, out_dir=out, device=args.device, batch_size=args.batch_size,
                          limit=args.limit, precision=precision, force=True, progress=False, cache=False)
        start = time.perf_counter()
        (record,) = run("zs-seg", [args.model], [args.dataset], opts)
        result[precision] = (time.perf_counter() - start, record["metrics"]["mIoU"])
    (t32, m32), (tlow, mlow) = result["fp32"], result[args.precision]
    print(f"device={args.device} model={args.model} dataset={args.dataset} images={args.limit}")
    print(f"fp32: {t32:.2f} s  mIoU {m32:.4f}")
    print(f"{args.precision}: {tlow:.2f} s  mIoU {mlow:.4f}")
    print(f"speed_ratio_vs_fp32={t32 / tlow:.3f} miou_diff_vs_fp32={mlow - m32:+.4f}")


if __name__ == "__main__":
    main()
