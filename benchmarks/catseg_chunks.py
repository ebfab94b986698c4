"""CAT-Seg's inference forward over chunks of (image, class) maps against the whole stack, same run.

The model is a CAT-Seg head (CVPR configuration) on an open_clip ViT with random weights (the cost
does not depend on them), run on one ADE-sized fixture image's five views (four 384 windows and the
whole image), 150 classes, as `ov-seg` runs it. "Whole stack" is the forward before chunking
(every tensor holds all B x K maps; CAT-Seg's own code does the same); "chunks" is the default
(`silc_bench.catseg.model.CPU_CHUNK_BYTES`). Contenders alternate; medians are reported, with the
process's page faults and kernel (system) CPU seconds per forward, and the logits are compared
bit for bit.

    python benchmarks/catseg_chunks.py [--arch ViT-B-16] [--repeats 3]

Last line: `catseg_chunk_speedup=X same_logits=True` (X > 1: chunks are faster).
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from silc_bench import registry
from silc_bench.catseg import model as catseg_model
from silc_bench.checkpoints import load_model
from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.harness import get_harness, ov_seg


@torch.inference_mode()
def timed_forward(model, views, classes, whole: bool):
    with catseg_model.whole_stack() if whole else contextlib.nullcontext():
        before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        logits = model(views, classes)
        seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime, logits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="silc_catseg_chunks_"))
    write_segmentation_fixture("ade150", tmp / "data", num_images=1, size=(512, 683), seed=0)
    torch.manual_seed(0)
    model = catseg_model.CatSeg(load_model(f"open_clip:{args.arch}:random-init")).eval()
    h = get_harness(registry.task_spec("ov-seg"))
    dataset = h.open_dataset("ade150", tmp / "data")
    prepared = h.setup(model, dataset, h.protocol_for(dataset, None), "cpu")
    p = prepared.protocol
    resized = ov_seg._D2Resized(dataset, [0], p["resize_short"], p["resize_max"])
    views = ov_seg.make_views(resized[0]["image"].float(), p, prepared.boxes, model.backbone.preprocess.normalize)
    with torch.inference_mode():  # warm-up, untimed
        model(views[:2], prepared.classes)
    contenders = {"whole stack": True, "chunks": False}
    rounds = {name: [] for name in contenders}
    logits = {}
    for _ in range(args.repeats):
        for name, whole in contenders.items():
            seconds, faults, system, logits[name] = timed_forward(model, views, prepared.classes, whole)
            rounds[name].append((seconds, faults, system))
    print(f"CAT-Seg on {args.arch}, {len(views)} views of 384, {len(dataset.classnames)} classes, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating rounds")
    medians = {}
    for name, runs in rounds.items():
        medians[name] = [statistics.median(r[i] for r in runs) for i in range(3)]
        seconds, faults, system = medians[name]
        print(f"{name:12s} {seconds:7.2f} s per forward   page faults {faults / 1e6:6.2f} M   system CPU {system:6.2f} s")
    same = torch.equal(logits["whole stack"], logits["chunks"])
    print(f"catseg_chunk_speedup={medians['whole stack'][0] / medians['chunks'][0]:.3f} same_logits={same}")


if __name__ == "__main__":
    main()
