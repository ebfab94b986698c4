"""The toy Table 2 over several pretraining seeds: mean and spread of zero-shot mIoU on the toy world.

    python experiments/toy_seeds.py --variants clip,silc_c --seeds 0,1,2
    python experiments/toy_seeds.py --world 2 --variants clip,clip_views,clip_views_ema,silc_c   # Table 6 ladder

For each (variant, seed): pretrain `configs/pretrain/toy_<variant>.yaml` (world N > 1:
`toy_<variant>_wN.yaml`) with that seed into `<runs>/<variant>_s<seed>` (skipped when its
model.npz exists; an interrupted run resumes), run `zs-seg` on `toyworld` (world N:
`toyworld_vN`), and write `<out>/table.md`: mIoU, then the stuff and the thing classes' mean IoU,
one row per variant (with two variants, also their same-seed difference). An experiment, not
part of the library: it drives the public command line (`silc-bench pretrain`) and runner API.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's silc_bench, installed or not

from silc_bench.cli import main as silc_bench  # noqa: E402
from silc_bench.data import toyworld  # noqa: E402
from silc_bench.data.toyworld import STUFF_CLASSES, WORLDS  # noqa: E402
from silc_bench.paths import CONFIGS_DIR, RESULTS_DIR  # noqa: E402
from silc_bench.results.record import atomic_write_text, read_record  # noqa: E402
from silc_bench.runner import RunOptions, output_path, run  # noqa: E402


def summarise(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def stuff_and_things(record: dict) -> tuple[float, float]:
    """Mean IoU of the stuff classes and of the thing classes (the mIoU mixes 6 stuff with 24 things)."""
    iou = {k: v for k, v in record["per_class"]["IoU"].items() if not math.isnan(v)}  # NaN: absent class
    stuff = [v for k, v in iou.items() if k in STUFF_CLASSES]
    things = [v for k, v in iou.items() if k not in STUFF_CLASSES]
    return (statistics.mean(stuff) if stuff else math.nan), (statistics.mean(things) if things else math.nan)


def table_lines(seeds: list[int], rows: list[tuple[str, list[float]]]) -> list[str]:
    """Markdown rows, one per variant; with exactly two variants also their same-seed difference,
    whose spread is the seed noise that the two recipes do not share."""
    lines = ["| toy model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    lines += [f"| {v} | " + " | ".join(f"{x:.2f}" for x in xs) + f" | {summarise(xs)} |" for v, xs in rows]
    if len(rows) == 2:  # the same pretraining seed for both recipes: the paired difference
        diff = [b - a for a, b in zip(rows[0][1], rows[1][1])]
        lines.append(f"| {rows[1][0]} minus {rows[0][0]}, same seed | " + " | ".join(f"{x:.2f}" for x in diff)
                     + f" | {summarise(diff)} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/toy_seeds.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="clip,silc_c", help="toy configs: configs/pretrain/toy_<variant>.yaml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", help="pretraining run folders (default: <out>/runs)")
    ap.add_argument("--out", help="records and table.md (default: results/toy/seeds, world N > 1: results/toy/seeds_wN)")
    ap.add_argument("--data-root", help="where the toy world's evaluation split is written (default: <out>/data)")
    ap.add_argument("--world", type=int, default=1, choices=sorted(WORLDS), help="toy world version (silc_bench/data/toyworld.py)")
    ap.add_argument("--steps", type=int, help="overrides the recipes' train.steps (run folders get a _<steps> suffix)")
    args = ap.parse_args(argv)
    suffix = toyworld.recipe_suffix(args.world)
    dataset = toyworld.dataset_name(args.world)
    out = Path(args.out or RESULTS_DIR / "toy" / ("seeds" + suffix))
    args.runs = args.runs or str(out / "runs")
    opts = RunOptions(data_root=args.data_root or str(out / "data"), out_dir=out / "records", workers=0,
                      progress=False, device="cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, stuff_rows, thing_rows, checkpoints = [], [], [], []
    for variant in args.variants.split(","):
        scores, stuff, things = [], [], []
        for seed in seeds:
            run_dir = Path(args.runs) / (f"{variant}{suffix}_s{seed}" + (f"_{args.steps}" if args.steps else ""))
            if not (run_dir / "model.npz").exists():
                resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
                steps = ["--steps", str(args.steps)] if args.steps else []
                code = silc_bench(["pretrain", "--config", str(CONFIGS_DIR / "pretrain" / f"toy_{variant}{suffix}.yaml"),
                                   "--seed", str(seed), "--out", str(run_dir), *steps, *resume])
                if code:
                    return code
            spec = str(run_dir / "model.npz")
            run("zs-seg", [spec], [dataset], opts)
            record = read_record(output_path("zs-seg", spec, dataset, opts))
            scores.append(record["metrics"]["mIoU"])
            checkpoints.append(f"| {variant} | {seed} | `{record['model']['sha256'][:12]}` |")
            stuff_iou, thing_iou = stuff_and_things(record)
            stuff.append(stuff_iou)
            things.append(thing_iou)
        rows.append((variant, scores))
        stuff_rows.append((variant, stuff))
        thing_rows.append((variant, things))
    table = (f"Toy world {args.world}, Table 2 layout: zero-shot segmentation mIoU (%) on the 500-image `{dataset}` "
             "validation split (30 classes), one pretraining run per seed.\n\n" + "\n".join(table_lines(seeds, rows))
             + f"\n\nThe same records, mean IoU (%) of the {len(STUFF_CLASSES)} stuff classes:\n\n"
             + "\n".join(table_lines(seeds, stuff_rows))
             + "\n\nand of the thing classes:\n\n" + "\n".join(table_lines(seeds, thing_rows))
             + "\n\nThe checkpoints (the records are named by them):\n\n| toy model | seed | sha256 |\n|---|---:|---|\n"
             + "\n".join(checkpoints) + "\n")
    atomic_write_text(out / "table.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
