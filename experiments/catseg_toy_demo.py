"""Toy CAT-Seg demo: paper Table 3's question on the toy world, end to end on a CPU.

For each toy backbone: train CAT-Seg on the toy world's seen classes (configs/cat_seg/toy.yaml),
evaluate it with `ov-seg` on the toy validation split (which contains the unseen classes), and set
its seen / unseen mIoU beside the zero-shot (`zs-seg`) mIoU of the same backbone on the same split.

    python experiments/catseg_toy_demo.py            # toy-clip and toy-silc-c, ~13 min on 2 CPU cores
    python experiments/catseg_toy_demo.py --world 2  # toy-clip-w2 and toy-silc-c-w2 (the main job's models)
    python experiments/catseg_toy_demo.py --world 2 --backbones RUN_CLIP/model.npz,RUN_SILC/model.npz

An experiment, not part of the library: it drives the public command line (`silc-bench train
cat-seg`) and runner API.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's silc_bench, installed or not

from silc_bench import registry  # noqa: E402
from silc_bench.cli import main as silc_bench  # noqa: E402
from silc_bench.data import toyworld  # noqa: E402
from silc_bench.paths import CONFIGS_DIR, RESULTS_DIR  # noqa: E402
from silc_bench.results.record import atomic_write_text, read_record  # noqa: E402
from silc_bench.runner import RunOptions, output_path, run  # noqa: E402


SHIPPED_BACKBONES = {1: "toy-clip,toy-silc-c", 2: "toy-clip-w2,toy-silc-c-w2"}  # configs/models.yaml


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def seen_unseen(record: dict, unseen: set[str]) -> tuple[float, float]:
    """Mean IoU over seen and over unseen classes (classes absent from labels and predictions skipped)."""
    iou = record["per_class"]["IoU"]
    return (_mean(v for k, v in iou.items() if k not in unseen), _mean(v for k, v in iou.items() if k in unseen))


def evaluated(task: str, spec: str, dataset: str, opts: RunOptions) -> dict:
    run(task, [spec], [dataset], opts)  # skipped when the record exists
    return read_record(output_path(task, spec, dataset, opts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/catseg_toy_demo.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", help="model specs or run folders' model.npz (default: the world's shipped "
                    "toy models, " + "; ".join(f"world {w}: {b}" for w, b in SHIPPED_BACKBONES.items()) + ")")
    ap.add_argument("--world", type=int, default=1, choices=sorted(toyworld.WORLDS),
                    help="toy world version (its recipe: configs/cat_seg/toy.yaml, toy_w2.yaml, ...)")
    ap.add_argument("--out", help="default: results/toy/catseg (world N > 1: results/toy/catseg_wN)")
    ap.add_argument("--data-root", help="where the toy world's splits are written (default: <out>/data)")
    ap.add_argument("--steps", type=int, help="override the recipe's training steps")
    args = ap.parse_args(argv)
    if not args.backbones and args.world not in SHIPPED_BACKBONES:
        ap.error(f"world {args.world} has no shipped toy models: pass --backbones")
    args.backbones = args.backbones or SHIPPED_BACKBONES[args.world]
    suffix = toyworld.recipe_suffix(args.world)
    dataset = toyworld.dataset_name(args.world)
    out = Path(args.out or RESULTS_DIR / "toy" / ("catseg" + suffix))
    data_root = args.data_root or str(out / "data")
    unseen = set(registry.dataset_entry(dataset)["unseen_classes"])
    opts = RunOptions(data_root=data_root, out_dir=out / "records", workers=0, progress=False, device="cpu")
    rows = []
    for backbone in args.backbones.split(","):
        name = Path(backbone).parent.name if backbone.endswith(".npz") else backbone  # a run folder's name, not a path
        run_dir = out / "runs" / name
        if not (run_dir / "catseg.json").exists():
            extra = ["--steps", str(args.steps)] if args.steps else []
            code = silc_bench(["train", "cat-seg", "--model", backbone, "--config",
                               str(CONFIGS_DIR / "cat_seg" / f"toy{suffix}.yaml"), "--out", str(run_dir),
                               "--data-root", data_root, "--resume", *extra])
            if code:
                return code
        ov = evaluated("ov-seg", str(run_dir), dataset, opts)
        zs = evaluated("zs-seg", backbone, dataset, opts)
        rows.append((name, ov["metrics"]["mIoU"], *seen_unseen(ov, unseen), zs["metrics"]["mIoU"], *seen_unseen(zs, unseen)))

    header = ("| backbone | CAT-Seg mIoU | CAT-Seg seen | CAT-Seg unseen | zero-shot mIoU | zero-shot seen | zero-shot unseen |\n"
              "|---|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(f"| {b} | " + " | ".join(f"{v:.1f}" for v in vals) + " |\n" for b, *vals in rows)
    table = (f"Toy world {args.world}, Table 3 layout: CAT-Seg trained on {30 - len(unseen)} seen classes, evaluated on the "
             f"toy validation split (500 images, 30 classes, unseen: {', '.join(sorted(unseen))}); mIoU %.\n\n"
             + header + body)
    atomic_write_text(out / "table.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
