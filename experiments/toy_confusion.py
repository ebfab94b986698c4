"""Where the toy world's pixels go under zero-shot segmentation: for every thing pixel, was it called
its own class, a thing of the same colour (worlds 2-3; the same shape in world 1), a thing of another
colour that is in the picture, a thing that is not, or a stuff class; for every stuff pixel, its
own stuff, other stuff, a thing in the picture, or a thing that is not. It separates the failures that mIoU mixes:
a pattern the features miss, context leaking into patches, and stuff against things.

    silc-bench run zs-seg --model toy-clip-w2,toy-silc-c-w2 --datasets toyworld_v2 --save-predictions --out OUT [--data-root DATA]
    python experiments/toy_confusion.py --records OUT [--data-root DATA] [--dataset toyworld_v2]

Reads the records' saved predictions (`<record>.predictions/*.png`) and the split's labels.
An experiment, not part of the library.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's silc_bench, installed or not

from silc_bench import registry  # noqa: E402
from silc_bench.data import toyworld  # noqa: E402
from silc_bench.data.segmentation import map_label  # noqa: E402
from silc_bench.data.toyworld import CLASSES, PATTERNS, STUFF_CLASSES, THING_CLASSES  # noqa: E402
from silc_bench.paths import data_root  # noqa: E402
from silc_bench.results.record import read_record  # noqa: E402

# Checked in this order, so each pixel lands in the first outcome that fits it.
THING_OUTCOMES = ("own class", "thing of the same colour (worlds 2-3) / shape (world 1)",
                  "thing of another colour / shape in the picture", "thing not in the picture", "stuff")
STUFF_OUTCOMES = ("own class", "other stuff", "thing in the picture", "thing not in the picture")
IS_THING_CLASS = np.array([name not in STUFF_CLASSES for name in CLASSES])


def grid_rows() -> np.ndarray:
    """Per class id: the thing's row in the class grid, which is its colour in worlds 2-3 and its shape
    in world 1 (the same rows in both); -1 for stuff."""
    return np.array([-1 if name in STUFF_CLASSES else THING_CLASSES.index(name) // len(PATTERNS) for name in CLASSES])


GRID_ROWS = grid_rows()


def decode_labels(png: np.ndarray, entry: dict) -> np.ndarray:
    """Class ids from a label PNG in the dataset's encoding (ADE's: class k stored as k + 1, 0 unlabelled),
    as the segmentation reader maps them."""
    return map_label(png, bool(entry.get("reduce_zero_label")), int(entry.get("ignore_index", 255)),
                     tuple(int(v) for v in entry.get("ignore_values", ())))


def tally(label: np.ndarray, pred: np.ndarray, counts: dict[str, np.ndarray]) -> None:
    """Add one image's pixels to `counts` (label and pred: class ids, 255 ignored)."""
    keep = label != 255
    label, pred = label[keep].astype(np.int64), pred[keep].astype(np.int64)
    present = np.zeros(len(CLASSES), bool)
    present[np.unique(label)] = True
    right = pred == label
    thing_label, thing_pred = IS_THING_CLASS[label], IS_THING_CLASS[pred]
    same_row = GRID_ROWS[pred] == GRID_ROWS[label]
    counts["thing"] += [np.sum(thing_label & right),
                        np.sum(thing_label & thing_pred & ~right & same_row),
                        np.sum(thing_label & thing_pred & ~same_row & present[pred]),
                        np.sum(thing_label & thing_pred & ~same_row & ~present[pred]),
                        np.sum(thing_label & ~thing_pred)]
    stuff_label = ~thing_label
    counts["stuff"] += [np.sum(stuff_label & right), np.sum(stuff_label & ~right & ~thing_pred),
                        np.sum(stuff_label & thing_pred & present[pred]),
                        np.sum(stuff_label & thing_pred & ~present[pred])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python experiments/toy_confusion.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", required=True, help="the --out folder of a `run zs-seg --save-predictions`")
    ap.add_argument("--data-root", help="as given to that run (default: $SILC_BENCH_DATA, else ~/data)")
    ap.add_argument("--dataset", default="toyworld_v2", choices=[toyworld.dataset_name(w) for w in toyworld.WORLDS])
    args = ap.parse_args(argv)
    entry = registry.dataset_entry(args.dataset)
    labels_dir = (data_root(args.data_root) / entry["root"] / entry["labels"]).parent
    found = sorted(Path(args.records).glob(f"zs-seg/*/{args.dataset}.json"))
    if not found:
        print(f"no zs-seg records of {args.dataset} under {args.records}", file=sys.stderr)
        return 2
    # Every input is checked before the table starts, so a bad one leaves no partial table.
    work = []
    for record_file in found:
        pred_dir = record_file.with_name(record_file.stem + ".predictions")
        if not pred_dir.is_dir():
            print(f"{record_file}: no saved predictions; rerun with --save-predictions", file=sys.stderr)
            return 2
        pairs = [(labels_dir / p.name, p) for p in sorted(pred_dir.glob("*.png"))]
        missing = [label for label, _ in pairs if not label.is_file()]
        if missing:
            print(f"{missing[0]}: label file not found ({len(missing)} missing); pass the --data-root that the "
                  f"zs-seg run used", file=sys.stderr)
            return 2
        work.append((record_file, read_record(record_file), pairs))
    print(f"| {args.dataset}, share of pixels (%) | thing pixels: " + " | ".join(THING_OUTCOMES)
          + " | stuff pixels: " + " | ".join(STUFF_OUTCOMES) + " |")
    print("|---|" + "---:|" * (len(THING_OUTCOMES) + len(STUFF_OUTCOMES)))
    for record_file, record, pairs in work:
        counts = {"thing": np.zeros(len(THING_OUTCOMES)), "stuff": np.zeros(len(STUFF_OUTCOMES))}
        for label_file, pred_file in pairs:
            tally(decode_labels(np.asarray(Image.open(label_file)), entry), np.asarray(Image.open(pred_file)), counts)
        shares = [100 * counts[k] / counts[k].sum() for k in ("thing", "stuff")]
        name = f"{record_file.parent.name} (sha256 {record['model']['sha256'][:12]})"
        print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in shares[0]) + " | "
              + " | ".join(f"{x:.1f}" for x in shares[1]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
