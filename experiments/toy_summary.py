"""Every world-2 and world-3 toy setting with per-seed records in one table: toy SILC-C against toy CLIP, seed by seed,
and the toy-world issue's bar (a lead of 3x the larger seed std, CLIP >= 15 mIoU, a lead >= 5).

    python experiments/toy_summary.py     # prints the table and writes results/toy/summary.md

It reads the committed records of each `results/toy/<setting>/` folder that
`experiments/toy_seeds.py` wrote (that folder's table.md names the variant and seed of each
checkpoint, and the records are named by checkpoint) and trains or evaluates nothing, so a test
regenerates the table and compares it with the committed one. In each folder the CLIP row is the
variant starting `clip` without views, the SILC-C row the one starting `silc_c`; both trained with
the same seeds, so their same-seed difference is what the two recipes do not share.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's silc_bench, installed or not

from silc_bench.paths import RESULTS_DIR  # noqa: E402
from silc_bench.results.record import atomic_write_text  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_seeds import stuff_and_things  # noqa: E402

# What each folder changes, in the words of docs/toyworld.md (folder name otherwise).
SETTINGS = {
    "seeds_w2": "world 2 (the main job's recipes)",
    "ladder_w2": "world 2, Table 6 ladder",
    "background_w2": "world 2, background named in every caption",
    "rare_background_w2": "world 2, background named in 7% of captions",
    "seeds_w3": "world 3 (larger objects)",
    "background_w3": "world 3, background always named",
    "background_w3_1200": "world 3, background always named, 1200 steps",
    "small_local_w3": "world 3, background always named, local crops 5-15%",
    "half_things_w3": "world 3, background named, half the things named",
    "ladder_half_things_w3": "world 3, half the things named, Table 6 ladder",
    "distill2_half_things_w3": "world 3, half the things named, self-distillation weight 2",
    "quarter_things_w3": "world 3, background named, things named at 0.25",
    "ladder_quarter_things_w3": "world 3, things named at 0.25, Table 6 ladder",
}
CHECKPOINT_ROW = re.compile(r"^\| (\w+) \| (\d+) \| `([0-9a-f]{12})` \|$")
BAR = {"std_ratio": 3.0, "clip_miou": 15.0, "lead": 5.0}  # the toy-world issue's aim


def read_setting(folder: Path) -> dict[str, dict[int, dict]]:
    """{variant: {seed: {"mIoU", "stuff", "things"}}} from a toy_seeds.py folder."""
    scores = {}
    for path in sorted((folder / "records" / "zs-seg").glob("*/toyworld*.json")):
        record = json.loads(path.read_text())
        stuff, things = stuff_and_things(record)
        scores[record["model"]["sha256"][:12]] = {"mIoU": record["metrics"]["mIoU"], "stuff": stuff, "things": things}
    runs: dict[str, dict[int, dict]] = {}
    for line in (folder / "table.md").read_text().splitlines():
        match = CHECKPOINT_ROW.match(line)
        if match:
            variant, seed, sha = match.group(1), int(match.group(2)), match.group(3)
            if sha not in scores:
                raise SystemExit(f"{folder / 'table.md'}: checkpoint {sha} ({variant}, seed {seed}) has no record "
                                 f"under {folder / 'records'}; rerun experiments/toy_seeds.py for that folder")
            runs.setdefault(variant, {})[seed] = scores[sha]
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def fmt(mean: float, std: float) -> str:
    return f"{mean:.2f}" if std != std else f"{mean:.2f} ± {std:.2f}"


def compare(runs: dict[str, dict[int, dict]]) -> dict | None:
    """CLIP against SILC-C over their common seeds; None when the folder lacks one of them."""
    clip = [v for v in runs if v.startswith("clip") and "views" not in v]
    silc = [v for v in runs if v.startswith("silc_c")]
    ema = [v for v in runs if v.startswith("clip_views_ema")]
    if len(clip) != 1 or len(silc) != 1:
        return None
    a, b = runs[clip[0]], runs[silc[0]]
    seeds = sorted(set(a) & set(b))
    lead = [b[s]["mIoU"] - a[s]["mIoU"] for s in seeds]
    out = {
        "seeds": seeds,
        "clip": mean_std([a[s]["mIoU"] for s in seeds]),
        "silc": mean_std([b[s]["mIoU"] for s in seeds]),
        "lead": mean_std(lead),
        "ahead": sum(x > 0 for x in lead),
        "thing_lead": mean_std([b[s]["things"] - a[s]["things"] for s in seeds]),
        "distill_step": None,
    }
    larger_std = max(out["clip"][1], out["silc"][1])
    out["ratio"] = out["lead"][0] / larger_std if larger_std == larger_std else float("nan")
    out["bar_met"] = (out["ratio"] >= BAR["std_ratio"] and out["clip"][0] >= BAR["clip_miou"]
                      and out["lead"][0] >= BAR["lead"])
    if len(ema) == 1 and set(seeds) <= set(runs[ema[0]]):
        out["distill_step"] = mean_std([b[s]["mIoU"] - runs[ema[0]][s]["mIoU"] for s in seeds])
    return out


def summary_table(root: Path) -> str:
    lines = [
        "Every world-2 and world-3 setting with per-seed records: zero-shot segmentation mIoU (%) of toy CLIP and toy "
        "SILC-C on the "
        "500-image validation split of the world they were trained on (30 classes, chance 3.3), 400 steps of "
        "batch 64 unless the setting says otherwise. Written by `python experiments/toy_summary.py` from the "
        "records in each folder. Not here: world 1 (both models at chance; README) and world 2 at 1200 steps "
        "(three CLIP seeds, one SILC-C; docs/toyworld.md), which have no per-seed records folder.",
        "",
        "| setting | folder | seeds | CLIP | SILC-C | SILC-C minus CLIP, same seed | ahead on | lead / larger std "
        "| paired t | thing IoU lead | self-distillation step (SILC-C minus + EMA) | issue's bar met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    folders = [p for p in root.iterdir() if (p / "table.md").exists() and (p / "records" / "zs-seg").is_dir()]
    order = list(SETTINGS)
    for folder in sorted(folders, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name)):
        row = compare(read_setting(folder))
        if row is None:
            continue
        n = len(row["seeds"])
        seeds = f"{row['seeds'][0]}-{row['seeds'][-1]}" if row["seeds"] == list(range(row["seeds"][0], row["seeds"][-1] + 1)) and n > 1 else ",".join(map(str, row["seeds"]))
        step = fmt(*row["distill_step"]) if row["distill_step"] else ""
        ratio = "" if row["ratio"] != row["ratio"] else f"{row['ratio']:.1f}x"
        t = "" if n < 2 else f"{row['lead'][0] / (row['lead'][1] / n ** 0.5):.1f}"
        lines.append(f"| {SETTINGS.get(folder.name, folder.name)} | `{folder.name}` | {seeds} | {fmt(*row['clip'])} "
                     f"| {fmt(*row['silc'])} | {fmt(*row['lead'])} | {row['ahead']} of {n} | {ratio} | {t} "
                     f"| {fmt(*row['thing_lead'])} | {step} | {'yes' if row['bar_met'] else 'no'} |")
    lines += ["", f"The issue's bar: a lead of at least {BAR['std_ratio']:g}x the larger seed std, with CLIP at "
              f"{BAR['clip_miou']:g} mIoU or more and a lead of {BAR['lead']:g} or more. Folders that share runs "
              "(a ladder and its pair) repeat them. Paired t: the mean same-seed difference over its standard error "
              "(with 3 seeds, 4.3 is the two-sided 5% level; with 5 seeds, 2.8)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/toy_summary.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(RESULTS_DIR / "toy"), help="folder of toy_seeds.py output folders")
    ap.add_argument("--out", help="where to write the table (default: <root>/summary.md; '-' prints only)")
    args = ap.parse_args(argv)
    table = summary_table(Path(args.root))
    if args.out != "-":
        atomic_write_text(Path(args.out or Path(args.root) / "summary.md"), table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
