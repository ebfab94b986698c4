"""Zero-shot segmentation from dense patch features (TCL protocol; SILC Table 2).

Why it is fast: crops from several images share one forward (`batch_size` crops at a time), text
embeddings are computed once per (model, class list, templates), images are decoded and resized by
DataLoader workers while the model runs, everything runs under `torch.inference_mode`, and on a
CPU an image's class maps are stitched a cache-sized block of classes at a time, never as C
full-resolution maps (`stitch_and_argmax`).
Why it matches the mmseg-based anchors pixel for pixel: images are decoded with cv2 (mmcv's reader,
EXIF orientation applied) and resized with cv2 INTER_LINEAR on the 8-bit image (mmcv.imrescale).
Why it is exact: per-crop logits are upsampled to the crop, summed over overlapping crops and
divided by the count, resized to the label and argmaxed, as in mmseg's slide inference; batching
only changes which crops share a forward, and stitching over blocks of classes (on a CPU, to stay
in cache) only changes which classes are resized together, never the arithmetic done per value.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from silc_bench.data.loading import iterate
from silc_bench.data.prompts import get_templates, prompt_set_hash
from silc_bench.harness.base import CountsHarness
from silc_bench.harness.predictions import save_prediction
from silc_bench.harness.text import cache_key, text_embeddings
from silc_bench.metrics.segmentation import SegmentationMetric


def rescale_size(height: int, width: int, short_side: int, long_side_max: int) -> tuple[int, int]:
    """mmseg `Resize(scale=(long, short), keep_ratio=True)`: fit inside (long, short)."""
    factor = min(long_side_max / max(height, width), short_side / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def cv2_rescale(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w] as mmcv's `imresize(..., interpolation="bilinear")` does
    it: cv2.resize with INTER_LINEAR on the 8-bit image (fixed-point arithmetic, so a float
    bilinear resize rounded to 8 bits differs by 1 in ~12% of values)."""
    import cv2

    h, w = size
    if (h, w) == tuple(image.shape[-2:]):
        return image
    array = cv2.resize(image.permute(1, 2, 0).numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class MmsegRescale:
    """Worker transform: mmseg's `Resize(scale=(long, short), keep_ratio=True)` = mmcv.imrescale."""

    def __init__(self, short_side: int, long_side_max: int):
        self.short_side, self.long_side_max = short_side, long_side_max

    def __call__(self, sample: dict) -> dict:
        size = rescale_size(*sample["image"].shape[-2:], self.short_side, self.long_side_max)
        return {**sample, "image": cv2_rescale(sample["image"], size)}


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, x1, y2, x2) exactly as mmseg's `slide_inference` places them."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes


@torch.inference_mode()
def class_embeddings(model, classnames: list[list[str]], templates: list[str], device, batch_size: int = 256) -> torch.Tensor:
    """[C, S, D] L2-normalised prompt-ensembled embeddings; S = most synonyms (short lists padded
    with their first name, which leaves a max over synonyms unchanged)."""
    names = sorted({n for syns in classnames for n in syns})
    prompts = [t.format(n) for n in names for t in templates]
    per_prompt = text_embeddings(model, prompts, device, batch_size).to(device)
    per_prompt = per_prompt.view(len(names), len(templates), -1)
    per_name = F.normalize(per_prompt.mean(dim=1), dim=-1)
    index = {n: i for i, n in enumerate(names)}
    width = max(len(s) for s in classnames)
    table = [[index[s[min(j, len(s) - 1)]] for j in range(width)] for s in classnames]
    return per_name[torch.tensor(table, device=per_name.device)]


@dataclass
class _Image:
    """One image's crops in arrival order, until its last crop is in."""

    height: int
    width: int
    label: torch.Tensor
    pending: int
    crops: list = field(default_factory=list)  # [(box, [C, gh, gw] patch logits)]


@dataclass
class ZsSegSetup:
    text: torch.Tensor  # [C, S, D]
    protocol: dict
    dense_mode: str
    details: dict = field(default_factory=dict)


def text_cache_key(model, classnames, templates) -> dict | None:
    """Everything that changes class text embeddings; None (do not cache) without a checkpoint hash."""
    return cache_key(model, "class_text_embeddings/v1", templates=list(templates), classnames=classnames)


def setup(model, dataset, protocol: dict, device, cache=None) -> ZsSegSetup:
    templates = get_templates(protocol["templates"])
    dense_mode = model.check_dense_mode(protocol.get("dense_mode"))

    def compute():
        return class_embeddings(model, dataset.classnames, templates, device)

    key = text_cache_key(model, dataset.classnames, templates)
    text = compute() if cache is None else cache.get_or_compute("text", key, compute).to(device)
    details = {
        "dense_mode": dense_mode,
        "templates": protocol["templates"],
        "num_templates": len(templates),
        "prompt_set_sha256": prompt_set_hash(templates),
    }
    return ZsSegSetup(text=text, protocol=protocol, dense_mode=dense_mode, details=details)


def _patch_logits(model, prepared: ZsSegSetup, crops: torch.Tensor) -> torch.Tensor:
    """[B, 3, h, w] normalised crops -> [B, C, gh, gw] cosine logits per patch (max over synonyms)."""
    feats = F.normalize(model.dense_features(crops, mode=prepared.dense_mode).float(), dim=-1)  # [B, gh, gw, D]
    c, s, d = prepared.text.shape
    logits = torch.einsum("bhwd,nd->bnhw", feats, prepared.text.view(c * s, d))
    return logits.reshape(logits.shape[0], c, s, *logits.shape[2:]).amax(dim=2)


def bilinear_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`F.interpolate(x, size=out.shape[-2:], mode="bilinear", align_corners=False)` written into
    `out`: the same ATen kernel and arithmetic (tests compare every pixel), no fresh allocation."""
    return torch.ops.aten.upsample_bilinear2d.out(x, list(out.shape[-2:]), False, None, None, out=out)


# On a CPU the stitching below runs over blocks of classes whose canvas and resized logits fit in
# about this many bytes (the L2/L3 caches), instead of materialising C full-resolution maps twice:
# 2.2x faster for ADE-150 at 448x598 -> 512x683 on 2 cores (benchmarks/class_blocks.py).
CPU_STITCH_BLOCK_BYTES = 10 * 2**20


def stitch_and_argmax(crops, height: int, width: int, out_size, classes_per_block: int | None = None) -> torch.Tensor:
    """mmseg's slide-inference tail for one image: each crop's [C, gh, gw] logits bilinear to its
    window, summed over overlapping windows in arrival order and divided by the count, bilinear to
    `out_size`, argmax over classes -> [h, w] int64.

    Bilinear resizing and the overlap average act on each class alone, so running them over blocks
    of classes does the same arithmetic per value; the running argmax keeps the first maximal class,
    as `argmax` does, so the prediction is identical for any block size (tests/test_zs_seg.py,
    tests/test_zs_seg_mmseg_exact.py).
    """
    (_, first), device = crops[0], crops[0][1].device
    num_classes = first.shape[0]
    blocks = class_blocks(num_classes, classes_per_block)
    if len(blocks) > 1 and not (resized_per_class(stitch_resizes(crops, height, width, out_size))
                                and all(torch.isfinite(logits).all() for _, logits in crops)):
        blocks = [(0, num_classes)]  # the whole stack: as before, and argmax's own NaN rule
    # (Blocks are only made on a CPU, so the finiteness check never waits for an accelerator.)
    count = torch.zeros(1, 1, height, width, device=device)
    for y1, x1, y2, x2 in (box for box, _ in crops):
        count[0, :, y1:y2, x1:x2] += 1
    # Buffers reused by every block (fresh multi-MB tensors per block cost page faults on a CPU).
    widest = max(c1 - c0 for c0, c1 in blocks)
    canvas = torch.empty(1, widest, height, width, device=device)
    scores = torch.empty(1, widest, *out_size, device=device)
    # Crops are upsampled in their own dtype (bf16 under --precision bf16) and summed in fp32, into
    # one buffer sized for the largest window, viewed per window shape.
    largest = max((y2 - y1) * (x2 - x1) for (y1, x1, y2, x2), _ in crops)
    flat = torch.empty(widest * largest, device=device, dtype=first.dtype)
    running = None
    for c0, c1 in blocks:
        part = canvas[:, :c1 - c0].zero_()
        for (y1, x1, y2, x2), logits in crops:
            window = (1, c1 - c0, y2 - y1, x2 - x1)
            up = bilinear_into(logits[None, c0:c1], flat[:window[1] * window[2] * window[3]].view(window))
            part[0, :, y1:y2, x1:x2] += up[0]
        block_scores = bilinear_into(part.div_(count), scores[:, :c1 - c0])[0]
        if len(blocks) == 1:
            return block_scores.argmax(dim=0)
        running = fold_argmax(running, block_scores, c0)
    return running.pred


class RunningArgmax:
    """The argmax over classes of score maps that arrive a block of classes at a time."""

    def __init__(self, scores: torch.Tensor, c0: int):
        self.best, self.pred = scores.max(dim=0)
        self.pred += c0
        self.better = torch.empty_like(self.pred, dtype=torch.bool)


def fold_argmax(running: RunningArgmax | None, scores: torch.Tensor, c0: int) -> RunningArgmax:
    """Fold the [n, h, w] scores of classes c0..c0+n-1 into `running`. A class replaces the best so
    far only where strictly greater, so ties keep the earlier class, as one `argmax` over all classes
    does. After the first block, small blocks go class by class (on a CPU a max over a few outer
    rows is slow); callers give those finite scores."""
    if running is None:
        return RunningArgmax(scores, c0)
    if scores.shape[0] > 8:  # (the accelerator path: blocks of CLASS_CHUNK in ov-seg, NaN as argmax's)
        value, index = scores.max(dim=0)
        torch.gt(value, running.best, out=running.better)
        running.better |= value.isnan() & ~running.best.isnan()
        running.pred = torch.where(running.better, index + c0, running.pred)
        torch.maximum(running.best, value, out=running.best)
        return running
    for j, score in enumerate(scores, start=c0):
        running.pred.masked_fill_(torch.gt(score, running.best, out=running.better), j)
        torch.maximum(running.best, score, out=running.best)
    return running


def class_blocks(num_classes: int, block: int | None) -> list[tuple[int, int]]:
    """[c0, c1) ranges of `block` classes; never 3 classes in one (see `resized_per_class`)."""
    if block is None or block >= num_classes or num_classes == 3:
        return [(0, num_classes)]
    block = 4 if block == 3 else max(1, block)
    blocks = [(c0, min(c0 + block, num_classes)) for c0 in range(0, num_classes, block)]
    if blocks[-1][1] - blocks[-1][0] == 3:  # fold a last block of 3 into the one before
        blocks[-2:] = [(blocks[-2][0], num_classes)]
    return blocks


def resized_per_class(resizes) -> bool:
    """Whether every bilinear resize, given as ((in_h, in_w), (out_h, out_w)), runs PyTorch's generic
    CPU kernel, which computes each value alone, the same whatever the number of channels resized
    with it. Its other kernel vectorises over channels (a value's rounding then depends on its
    channel's place in the vector); PyTorch picks that one for outputs with height + width <= 128,
    channels-last inputs of more than 3 channels (a 1x1 input is both layouts; callers pass
    contiguous maps) and, on one thread, 3 channels, which `class_blocks` never makes. Only then may
    classes be resized in blocks (zs-seg's stitching, ov-seg's view combining). Checked on every
    pixel in tests/test_zs_seg.py and tests/test_ov_seg.py."""
    return all(hi * wi > 1 and ho + wo > 128 for (hi, wi), (ho, wo) in resizes)


def stitch_resizes(crops, height: int, width: int, out_size) -> list:
    """The resizes of `stitch_and_argmax`: each crop's patch grid to its window, the canvas to the label."""
    return ([(tuple(logits.shape[-2:]), (y2 - y1, x2 - x1)) for (y1, x1, y2, x2), logits in crops]
            + [((height, width), tuple(out_size))])


def stitch_block_size(num_classes: int, height: int, width: int, out_size, device) -> int:
    """Classes per stitching block: all of them on an accelerator; on a CPU what fits
    CPU_STITCH_BLOCK_BYTES of canvas plus resized logits."""
    if torch.device(device).type != "cpu":
        return num_classes
    per_class = 4 * (height * width + out_size[0] * out_size[1])
    return max(1, min(num_classes, CPU_STITCH_BLOCK_BYTES // per_class))


@torch.inference_mode()
def evaluate(model, dataset, prepared: ZsSegSetup, indices, *, device, batch_size: int = 16, workers: int = 0,
             progress=None) -> dict:
    """Run the protocol on `indices` of `dataset`; return the metric's mergeable state."""
    p = prepared.protocol
    metric = SegmentationMetric(dataset.num_classes, ignore_index=dataset.ignore_index, device=device)
    rescale = MmsegRescale(p["short_side"], p.get("long_side_max", 2048))
    # Decoded and resized in the workers; a bad file ends the run with its message, no worker traceback.
    loader = iterate(dataset, indices, workers=workers, device=device, transform=rescale)
    images: dict[int, _Image] = {}
    queues: dict[tuple[int, int], list] = defaultdict(list)  # crop shape -> [(image id, box, crop)]

    def finish(image_id: int):
        image = images.pop(image_id)
        out_size = tuple(image.label.shape)
        block = stitch_block_size(dataset.num_classes, image.height, image.width, out_size, device)
        pred = stitch_and_argmax(image.crops, image.height, image.width, out_size, block)
        metric.update(pred, image.label)
        save_prediction(prepared, dataset, image_id, pred)
        if progress is not None:
            progress.update(1)

    def flush(shape):
        batch = queues.pop(shape)
        logits = _patch_logits(model, prepared, torch.stack([crop for _, _, crop in batch]))
        for (image_id, box, _), patch_logits in zip(batch, logits):
            image = images[image_id]
            # Contiguous: the einsum leaves a channels-last view, on which CPU upsampling is ~7x slower.
            image.crops.append((box, patch_logits.contiguous()))
            image.pending -= 1
            if image.pending == 0:
                finish(image_id)

    for sample in loader:
        image = sample["image"].to(device, non_blocking=True).float()  # already at the protocol's size
        label = sample["label"].to(device, non_blocking=True)
        h, w = image.shape[-2:]
        image = model.preprocess.normalize(image[None] / 255.0)[0]
        boxes = slide_windows(h, w, p["crop"], p["stride"])
        image_id = sample["index"]
        images[image_id] = _Image(height=h, width=w, label=label, pending=len(boxes))
        for box in boxes:
            y1, x1, y2, x2 = box
            shape = (y2 - y1, x2 - x1)
            queues[shape].append((image_id, box, image[:, y1:y2, x1:x2]))
            if len(queues[shape]) >= batch_size:
                flush(shape)
    for shape in list(queues):
        flush(shape)
    assert not images, "every image must be finished"
    return metric.state()


def open_dataset(name: str, data_root, limit: int | None = None):
    """The dataset, its images decoded as mmseg's LoadImageFromFile does (mmcv's cv2 reader, EXIF
    orientation applied)."""
    from silc_bench.data.segmentation import open_dataset as _open
    from silc_bench.paths import data_root as _root

    dataset = _open(name, _root(data_root), limit=limit)
    dataset.decoder = "cv2"
    return dataset


def finalize(dataset, state: dict) -> tuple[dict, dict]:
    """Mergeable state -> (headline metrics, per-class metrics keyed by class name)."""
    metric = SegmentationMetric(dataset.num_classes, ignore_index=dataset.ignore_index)
    metric.merge(state)
    result = metric.compute()
    names = [syns[0] for syns in dataset.classnames]
    headline = {k: result[k] for k in ("mIoU", "aAcc", "mAcc")}
    headline["mIoU_present"] = metric.compute_present_only()["mIoU"]
    per_class = {"IoU": dict(zip(names, result["IoU"])), "Acc": dict(zip(names, result["Acc"]))}
    return headline, per_class


# On a CPU a forward of more tokens than this runs slower per crop (cache-bound), measured on 2 cores
# (README, Speed): ViT-B/16 at 448 (785 tokens) is fastest at batch 1, 1.1-1.3x slower per crop at
# 2-8; at 224 (197 tokens) batch 1-16 are within 10%; the toy models (65 tokens) are fastest at 16.
CPU_TOKENS_PER_FORWARD = 1024


def default_batch_size(model, prepared: ZsSegSetup, device) -> int:
    """Crops per forward: 16 on an accelerator; on a CPU as many as fit CPU_TOKENS_PER_FORWARD."""
    if torch.device(device).type != "cpu":
        return 16
    tokens = (prepared.protocol["crop"] // model.patch_size) ** 2 + 1
    return max(1, min(16, CPU_TOKENS_PER_FORWARD // tokens))


class ZeroShotSegmentation(CountsHarness):
    """`zs-seg` behind the task interface; the shard result is the metric's integer counts."""

    saves_predictions = True  # --save-predictions: each image's class map beside the record

    def default_batch_size(self, model, prepared, device):
        return default_batch_size(model, prepared, device)

    def open_dataset(self, name, data_root, limit=None):
        return open_dataset(name, data_root, limit=limit)  # decoded with cv2, as mmseg does

    module_setup, module_evaluate, module_finalize = staticmethod(setup), staticmethod(evaluate), staticmethod(finalize)
