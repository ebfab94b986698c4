"""Open-vocabulary segmentation with a trained CAT-Seg model (CAT-Seg's inference protocol; SILC Table 3).

The protocol is CAT-Seg's (KU-CVLAB/CAT-Seg at 6d3a188, read for facts): detectron2's test-time
`ResizeShortestEdge(640, 2560)` (PIL bilinear on the uint8 image), then
`CATSeg.inference_sliding_window`: resize to 640x640 ignoring aspect, four 384 windows with stride
256 plus the whole image resized to 384, per-view logits upsampled to 384 and passed through a
sigmoid, windows averaged per pixel (fold / count), `(windows + global) / 2`, bilinear to the label
size (`sem_seg_postprocess`), argmax. VOC-21 ("PAS-20b") asks the model about voc20b's 59 names
and maps each predicted name to a label (the 39 non-VOC names to background), as its `VOCbEvaluator`
does. Scores: mmseg-style mIoU (the headline) and detectron2's classes-present mean (`mIoU_present`,
the number CAT-Seg prints).

Why it is fast: views of several images share one forward (`batch_size` views at a time), images are
decoded and resized by DataLoader workers, and everything runs under `torch.inference_mode`.
Why it is exact: every step after the forward is per class, so classes are processed in chunks
(bounded memory at 847 classes) with a running first-index argmax, which equals one argmax over all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from silc_bench import paths
from silc_bench.data.loading import iterate
from silc_bench.errors import UserError
from silc_bench.harness.zs_seg import bilinear_into, class_blocks, fold_argmax, resized_per_class, slide_windows
from silc_bench.harness.base import CountsHarness
from silc_bench.harness.predictions import save_prediction
from silc_bench.hashing import sha256_json
from silc_bench.metrics.segmentation import SegmentationMetric

# Classes combined at a time after the forward (C x 640^2 maps at once would not fit for ADE-847).
# Resizes of large maps run PyTorch's generic CPU kernel, per value whatever the chunk (see
# zs_seg.resized_per_class); small ones (height + width <= 128) are combined in one chunk. The
# sigmoid can still round 1 ulp differently where a thread's share of a block ends inside a vector
# (README, Speed), as it can in CAT-Seg's own loop under another thread count.
CLASS_CHUNK = 64
# On a CPU, blocks of classes whose maps fit about this many bytes (cache), as zs-seg's stitching.
CPU_COMBINE_BLOCK_BYTES = 10 * 2**20
_REQUIRED = ("out_res", "crop", "stride", "global_view")
# Descriptive protocol keys: the only values implemented (an override to another value is refused).
FIXED = {"score": "sigmoid", "combine": "mean", "upsample": "bilinear", "vocabulary": "dataset", "background": "voc20b"}


@dataclass
class OvSegSetup:
    protocol: dict
    query_names: list[list[str]]  # what the model is asked about (comma-separated synonyms per class)
    query_to_label: torch.Tensor | None  # [Q] predicted query -> label index; None = identity
    boxes: list[tuple[int, int, int, int]]
    classes: object = None  # what forward gets: the names, or their text embeddings computed once
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- datasets
def dataset_entries(name: str, mapping: dict | None) -> list[str]:
    """datasets.yaml entries that can serve column `name`, preferred first (the task spec's
    `dataset_entries`, e.g. tasks/ov-seg.yaml)."""
    return list((mapping or {}).get(name) or [name])


def open_dataset(name: str, data_root, limit: int | None = None, mapping: dict | None = None):
    """The first entry of `dataset_entries(name, mapping)` whose label folder exists (the record keeps `name`).

    The entries of one column hold the same images and the same label values in different on-disk
    layouts (CAT-Seg's prepared files, or mmseg's), so whichever is present gives the same numbers;
    `details.dataset_entry` records which one was read.
    """
    from silc_bench import registry
    from silc_bench.data.segmentation import open_dataset as _open
    from silc_bench.data.segmentation import split_pattern

    root = paths.data_root(data_root)
    candidates = dataset_entries(name, mapping)
    expected = []
    for entry_name in candidates:
        entry = registry.dataset_entry(entry_name)
        folder = root / entry["root"] / split_pattern(entry["labels"])[0]
        if entry.get("generate") or folder.is_dir():
            return _open(entry_name, root, limit=limit)
        expected.append(f"{entry_name}: {folder}")
    try:
        return _open(candidates[0], root, limit=limit)  # raises, naming the preferred layout's folder
    except UserError as e:
        if len(candidates) == 1:
            raise
        raise UserError(f"{e}\n  dataset {name!r} can also be read from (none found): {'; '.join(expected[1:])}",
                        path=e.path) from None


def query_vocabulary(dataset) -> tuple[list[list[str]], torch.Tensor | None]:
    """(names the model is asked about, predicted index -> label index or None).

    A dataset entry may ask about other names than it scores (`query_classnames`, a file in
    silc_bench/data/classnames/) with `query_to_label` mapping each to a label index.
    """
    from silc_bench.data.segmentation import CLASSNAMES_DIR, load_classnames

    spec = getattr(dataset, "spec", None) or {}
    where = paths.CONFIGS_DIR / "datasets.yaml"
    if not spec.get("query_classnames"):
        if spec.get("query_to_label") is not None:
            raise UserError(f"dataset {dataset.name!r} gives query_to_label without query_classnames", path=where,
                            fix="give both, or neither (the model is then asked about the scored classes)")
        return dataset.classnames, None
    names = load_classnames(CLASSNAMES_DIR / spec["query_classnames"])
    table = spec.get("query_to_label")
    ok = isinstance(table, list) and len(table) == len(names) and all(
        isinstance(v, int) and 0 <= v < dataset.num_classes for v in table)
    if not ok:
        raise UserError(f"dataset {dataset.name!r}: query_to_label must list one label index in "
                        f"0..{dataset.num_classes - 1} for each of the {len(names)} names of {spec['query_classnames']}",
                        path=where,
                        fix="write `query_to_label: [label of query 0, label of query 1, ...]`")
    return names, torch.tensor(table, dtype=torch.long)


# ---------------------------------------------------------------------- protocol pieces
def d2_resize_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 `ResizeShortestEdge.get_output_shape` (the test-time resize before the model)."""
    scale = short * 1.0 / min(height, width)
    newh, neww = (short * 1.0, scale * width) if height < width else (scale * height, short * 1.0)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


class _D2Resized(torch.utils.data.Dataset):
    """Items of `dataset` at `indices`, images resized as detectron2's test mapper does (in workers)."""

    def __init__(self, dataset, indices, short: int | None, max_size: int | None):
        self.dataset, self.indices, self.short, self.max_size = dataset, list(indices), short, max_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        sample = self.dataset[self.indices[i]]
        image = sample["image"]
        if self.short:
            h, w = d2_resize_shape(*image.shape[-2:], self.short, self.max_size or 2**31)
            if (h, w) != tuple(image.shape[-2:]):  # PIL bilinear on uint8, as detectron2's ResizeTransform
                pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
                image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous()
        return {"image": image, "label": sample["label"], "index": sample["index"]}


def check_protocol(protocol: dict) -> dict:
    other = {k: protocol[k] for k in FIXED if k in protocol and protocol[k] != FIXED[k]}
    if other:
        raise UserError(f"ov-seg implements only {', '.join(f'{k}={FIXED[k]}' for k in other)} (got {other})",
                        path=paths.TASKS_DIR / "ov-seg.yaml", fix="drop those --protocol overrides")
    missing = [k for k in _REQUIRED if k not in protocol]
    out, crop, stride = (protocol.get(k) for k in ("out_res", "crop", "stride"))
    resize = [protocol.get(k) for k in ("resize_short", "resize_max") if protocol.get(k) is not None]
    bad = missing or not all(isinstance(v, int) and v > 0 for v in (out, crop, stride, *resize)) or crop > out
    if not bad and (out - crop) % stride:
        bad = True  # CAT-Seg's Unfold would leave the last rows / columns uncovered
    if bad:
        raise UserError(f"ov-seg protocol needs positive integers crop <= out_res with (out_res - crop) a "
                        f"multiple of stride, global_view, and resize_short / resize_max positive or null (got {protocol})",
                        path=paths.TASKS_DIR / "ov-seg.yaml",
                        fix="fix the task's protocol or the --protocol overrides (CAT-Seg: out_res=640 crop=384 stride=256)")
    return protocol


def make_views(image: torch.Tensor, protocol: dict, boxes, normalize) -> torch.Tensor:
    """float [3, h, w] in 0..255 -> normalised views [V, 3, crop, crop]: the windows, then the global one."""
    out, crop = protocol["out_res"], protocol["crop"]
    square = F.interpolate(image[None], size=(out, out), mode="bilinear", align_corners=False)[0]
    views = [square[:, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes]
    if protocol["global_view"]:
        views.append(F.interpolate(image[None], size=(crop, crop), mode="bilinear", align_corners=False)[0])
    return normalize(torch.stack(views) / 255.0)


def combine_views(logits: torch.Tensor, boxes, protocol: dict, label_size: tuple[int, int],
                  query_to_label: torch.Tensor | None = None, classes_per_block: int | None = None) -> torch.Tensor:
    """View logits [V, Q, h, w] (windows, then global) -> predicted labels [H, W] at the label size.

    CAT-Seg's `inference_sliding_window`, a block of classes at a time (`classes_per_block`,
    default CLASS_CHUNK): logits bilinear to the window and sigmoid, windows summed and divided by
    the count, averaged with the global view, bilinear to the label, running argmax."""
    out, crop = protocol["out_res"], protocol["crop"]
    n_win, num, device = len(boxes), logits.shape[1], logits.device
    count = torch.zeros(1, out, out, device=device)
    for y1, x1, y2, x2 in boxes:
        count[:, y1:y2, x1:x2] += 1
    logits = logits.contiguous()  # a channels-last stack would take the channel-vectorised resize
    resizes = [(tuple(logits.shape[-2:]), (crop, crop)), ((crop, crop), (out, out)), ((out, out), tuple(label_size))]
    blocks = class_blocks(num, (classes_per_block or CLASS_CHUNK) if resized_per_class(resizes) else None)
    small_blocks = any(c1 - c0 <= 8 for c0, c1 in blocks[1:])
    if small_blocks and not torch.isfinite(logits).all():  # small blocks: a CPU's (or a short last chunk)
        blocks = [(0, num)]  # NaN / inf: the whole stack, max's own NaN rule
    widest = max(c1 - c0 for c0, c1 in blocks)
    # Buffers reused by every block; in-place steps do the same arithmetic as CAT-Seg's out-of-place ones.
    probs_buf = torch.empty(logits.shape[0], widest, crop, crop, device=device, dtype=logits.dtype)
    canvas_buf = torch.empty(widest, out, out, device=device, dtype=logits.dtype)
    whole_buf = torch.empty(1, widest, out, out, device=device, dtype=logits.dtype)
    scores_buf = torch.empty(1, widest, *label_size, device=device, dtype=logits.dtype)
    running = None
    for c0, c1 in blocks:
        n = c1 - c0
        probs = bilinear_into(logits[:, c0:c1], probs_buf[:, :n]).sigmoid_()
        canvas = canvas_buf[:n].zero_()
        for (y1, x1, y2, x2), p in zip(boxes, probs[:n_win]):
            canvas[:, y1:y2, x1:x2] += p
        canvas.div_(count)
        if protocol["global_view"]:
            canvas.add_(bilinear_into(probs[n_win:n_win + 1], whole_buf[:, :n])[0]).div_(2.0)
        running = fold_argmax(running, bilinear_into(canvas[None], scores_buf[:, :n])[0], c0)
    best_idx = running.pred
    return best_idx if query_to_label is None else query_to_label.to(best_idx.device)[best_idx]


def combine_block_size(num_queries: int, views: int, protocol: dict, label_size, device) -> int:
    """Classes per combining block: CLASS_CHUNK on an accelerator; on a CPU what fits
    CPU_COMBINE_BLOCK_BYTES of window maps, canvas, global map and label-size scores."""
    if torch.device(device).type != "cpu":
        return CLASS_CHUNK
    out, crop = protocol["out_res"], protocol["crop"]
    per_class = 4 * (views * crop * crop + 2 * out * out + label_size[0] * label_size[1])
    return max(1, min(CLASS_CHUNK, num_queries, CPU_COMBINE_BLOCK_BYTES // per_class))


# ---------------------------------------------------------------------- harness API
def setup(model, dataset, protocol: dict, device, cache=None) -> OvSegSetup:
    """Check the protocol and fix the vocabulary.

    CatSeg's forward takes class names or their embeddings (`encode_classes`); the embeddings are
    computed here once, not on every forward (847 prompts per batch would cost more than the images).
    """
    if not hasattr(getattr(model, "backbone", None), "preprocess"):
        raise UserError(f"ov-seg evaluates a trained CAT-Seg model, got a {type(model).__name__}",
                        path=paths.TASKS_DIR / "ov-seg.yaml",
                        fix="pass the catseg.json written by `silc-bench train cat-seg` as --model (the task's "
                            "harness loads it with the catseg model loader)")
    protocol = check_protocol(protocol)
    names, table = query_vocabulary(dataset)
    classes = names
    if callable(getattr(model, "encode_classes", None)):
        with torch.inference_mode():
            classes = model.encode_classes(names)
    boxes = slide_windows(protocol["out_res"], protocol["out_res"], protocol["crop"], protocol["stride"])
    details = {
        "dataset_entry": getattr(dataset, "name", None),
        "num_queries": len(names),
        "query_classnames_sha256": sha256_json(names),
        "query_to_label": table.tolist() if table is not None else None,
        "views_per_image": len(boxes) + (1 if protocol["global_view"] else 0),
        "class_input": "names" if classes is names else "embeddings",
    }
    return OvSegSetup(protocol=protocol, query_names=names, query_to_label=table, boxes=boxes, details=details,
                      classes=classes)


@dataclass
class _Pending:
    label: torch.Tensor
    logits: list
    remaining: int


@torch.inference_mode()
def evaluate(model, dataset, prepared: OvSegSetup, indices, *, device, batch_size: int = 16, workers: int = 0,
             progress=None) -> dict:
    """Run the protocol on `indices` of `dataset`; return the metric's mergeable state."""
    p = prepared.protocol
    metric = SegmentationMetric(dataset.num_classes, ignore_index=dataset.ignore_index, device=device)
    resized = _D2Resized(dataset, indices, p.get("resize_short"), p.get("resize_max"))
    loader = iterate(resized, range(len(resized)), workers=workers, device=device)  # bad files: their message only
    normalize = model.backbone.preprocess.normalize
    pending: dict[int, _Pending] = {}
    queue: list[tuple[int, int, torch.Tensor]] = []  # (image id, view number, view)

    def flush():
        batch = queue[:]
        queue.clear()
        logits = model(torch.stack([v for _, _, v in batch]), prepared.classes).float()
        if logits.dim() != 4 or logits.shape[:2] != (len(batch), len(prepared.query_names)):
            raise RuntimeError(f"CAT-Seg returned logits of shape {tuple(logits.shape)}; expected "
                               f"[{len(batch)}, {len(prepared.query_names)}, h, w]")
        for (image_id, view, _), out in zip(batch, logits):
            item = pending[image_id]
            item.logits[view] = out
            item.remaining -= 1
            if item.remaining == 0:
                del pending[image_id]
                block = combine_block_size(len(prepared.query_names), len(item.logits), p, item.label.shape, device)
                pred = combine_views(torch.stack(item.logits), prepared.boxes, p, item.label.shape,
                                     prepared.query_to_label, block)
                metric.update(pred, item.label)
                save_prediction(prepared, dataset, image_id, pred)
                if progress is not None:
                    progress.update(1)

    for sample in loader:
        image = sample["image"].to(device, non_blocking=True).float()
        views = make_views(image, p, prepared.boxes, normalize)
        image_id = int(sample["index"])
        pending[image_id] = _Pending(sample["label"].to(device, non_blocking=True), [None] * len(views), len(views))
        for v, view in enumerate(views):
            queue.append((image_id, v, view))
            if len(queue) >= batch_size:
                flush()
    if queue:
        flush()
    assert not pending, "every image must be finished"
    return metric.state()


def class_labels(classnames: list[list[str]]) -> list[str]:
    """One unique name per class for per-class results (ADE-847 repeats some first names)."""
    firsts = [syns[0] for syns in classnames]
    names = [f if firsts.count(f) == 1 else ", ".join(syns) for f, syns in zip(firsts, classnames)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} #{seen[n]}")
    return out


def finalize(dataset, state: dict) -> tuple[dict, dict]:
    """Mergeable state -> (headline metrics, per-class metrics keyed by class name)."""
    metric = SegmentationMetric(dataset.num_classes, ignore_index=dataset.ignore_index)
    metric.merge(state)
    result = metric.compute()
    present = metric.compute_present_only()
    headline = {k: result[k] for k in ("mIoU", "aAcc", "mAcc")}
    headline["mIoU_present"] = present["mIoU"]  # detectron2 SemSegEvaluator: CAT-Seg's printed mIoU
    headline["mAcc_present"] = present["mACC"]
    names = class_labels(dataset.classnames)
    per_class = {"IoU": dict(zip(names, result["IoU"])), "Acc": dict(zip(names, result["Acc"]))}
    return headline, per_class


class OpenVocabSegmentation(CountsHarness):
    """`ov-seg` behind the task interface: `--model` names a trained CAT-Seg; the task spec's
    `dataset_entries` say which on-disk layouts can serve each Table 3 column."""

    model_loader = "catseg"
    saves_predictions = True  # --save-predictions: each image's class map beside the record

    def open_dataset(self, name, data_root, limit=None):
        dataset = open_dataset(name, data_root, limit=limit, mapping=self.task.get("dataset_entries"))
        dataset.decoder = "pil_exif"  # detectron2's read_image: PIL with EXIF orientation applied
        return dataset

    module_setup, module_evaluate, module_finalize = staticmethod(setup), staticmethod(evaluate), staticmethod(finalize)
