"""SegmentationMetric against a naive reference written here and against mmseg's IoUMetric."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from silc_bench.metrics.segmentation import SegmentationMetric

IGNORE = 255


# ---------------------------------------------------------------------- naive references
def naive_areas(batches, num_classes, ignore=IGNORE):
    """Per-class pixel counts by explicit loops over classes (mmseg semantics)."""
    inter = np.zeros(num_classes, np.int64)
    pred_area = np.zeros(num_classes, np.int64)
    label_area = np.zeros(num_classes, np.int64)
    for pred, gt in batches:
        pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
        keep = gt != ignore
        pred, gt = pred[keep], gt[keep]
        for c in range(num_classes):
            inter[c] += np.sum((pred == c) & (gt == c))
            pred_area[c] += np.sum(pred == c)
            label_area[c] += np.sum(gt == c)
    return inter, pred_area, label_area


def naive_mmseg(batches, num_classes):
    inter, pred_area, label_area = naive_areas(batches, num_classes)
    union = pred_area + label_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / label_area
    return {
        "mIoU": np.nanmean(iou) * 100, "mAcc": np.nanmean(acc) * 100,
        "aAcc": inter.sum() / label_area.sum() * 100, "IoU": iou * 100, "Acc": acc * 100,
    }


def naive_detectron2(batches, num_classes):
    """detectron2 SemSegEvaluator: confusion matrix with an extra row/column for ignored pixels."""
    conf = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for pred, gt in batches:
        pred, gt = np.asarray(pred).ravel().copy(), np.asarray(gt).ravel().copy()
        gt[gt == IGNORE] = num_classes
        conf += np.bincount((num_classes + 1) * pred + gt, minlength=conf.size).reshape(conf.shape)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(0).astype(float)
    pos_pred = conf[:-1, :-1].sum(1).astype(float)
    acc = np.full(num_classes, np.nan)
    iou = np.full(num_classes, np.nan)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    iou_valid = acc_valid & (union > 0)
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    weights = pos_gt / pos_gt.sum()
    return {
        "mIoU": 100 * iou[iou_valid].sum() / iou_valid.sum(),
        "fwIoU": 100 * (iou[iou_valid] * weights[iou_valid]).sum(),
        "mACC": 100 * acc[acc_valid].sum() / acc_valid.sum(),
        "pACC": 100 * tp.sum() / pos_gt.sum(),
        "IoU": 100 * iou, "ACC": 100 * acc,
    }


def random_batches(seed, num_classes, shapes, absent=(), pred_only=(), ignore_frac=0.2):
    """Random (pred, gt) pairs; classes in `absent` never occur, those in `pred_only` only in preds."""
    g = torch.Generator().manual_seed(seed)
    allowed_gt = torch.tensor([c for c in range(num_classes) if c not in absent and c not in pred_only])
    allowed_pred = torch.tensor([c for c in range(num_classes) if c not in absent])
    out = []
    for shape in shapes:
        gt = allowed_gt[torch.randint(len(allowed_gt), shape, generator=g)]
        pred = allowed_pred[torch.randint(len(allowed_pred), shape, generator=g)]
        agree = torch.rand(shape, generator=g) < 0.4  # make some IoUs sizeable
        pred = torch.where(agree, gt, pred)
        gt = torch.where(torch.rand(shape, generator=g) < ignore_frac, torch.full_like(gt, IGNORE), gt)
        out.append((pred, gt))
    return out


def assert_close_nan(a, b, rtol=1e-9, atol=1e-9):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.array_equal(np.isnan(a), np.isnan(b)), (a, b)
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=rtol, atol=atol)


SHAPES = [(17, 23), (2, 9, 11), (1, 3, 5, 7), (31, 4)]


# ---------------------------------------------------------------------- against the naive reference
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference(seed):
    c = 9
    batches = random_batches(seed, c, SHAPES, absent=(3, 7), pred_only=(5,))
    metric = SegmentationMetric(c)
    for pred, gt in batches:
        metric.update(pred, gt)
    got, want = metric.compute(), naive_mmseg(batches, c)
    for k in ("mIoU", "mAcc", "aAcc"):
        assert got[k] == pytest.approx(want[k], rel=1e-12)
    assert_close_nan(got["IoU"], want["IoU"])
    assert_close_nan(got["Acc"], want["Acc"])
    assert math.isnan(got["IoU"][3]) and math.isnan(got["IoU"][7])  # absent from both
    assert got["IoU"][5] == 0.0 and math.isnan(got["Acc"][5])  # predicted, never in the GT

    inter, pred_area, label_area = naive_areas(batches, c)
    s = metric.state()
    assert all(v.dtype == torch.int64 for v in s.values())
    np.testing.assert_array_equal(s["intersect"].numpy(), inter)
    np.testing.assert_array_equal(s["pred_area"].numpy(), pred_area)
    np.testing.assert_array_equal(s["label_area"].numpy(), label_area)
    np.testing.assert_array_equal(s["union"].numpy(), pred_area + label_area - inter)


@pytest.mark.parametrize("seed", [0, 3])
def test_present_only_matches_detectron2_reference(seed):
    c = 8
    batches = random_batches(seed, c, SHAPES, absent=(2,), pred_only=(6,))
    metric = SegmentationMetric(c)
    for pred, gt in batches:
        metric.update(pred, gt)
    got, want = metric.compute_present_only(), naive_detectron2(batches, c)
    for k in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert got[k] == pytest.approx(want[k], rel=1e-12)
    assert_close_nan(got["IoU"], want["IoU"])
    assert_close_nan(got["ACC"], want["ACC"])
    # the mmseg mean counts class 6 (IoU 0, predicted but absent from GT); detectron2's does not
    assert metric.compute()["mIoU"] < got["mIoU"]


def test_state_merge_equals_single_pass():
    c = 6
    batches = random_batches(4, c, SHAPES * 2, absent=(1,))
    whole = SegmentationMetric(c)
    shards = [SegmentationMetric(c), SegmentationMetric(c), SegmentationMetric(c)]
    for i, (pred, gt) in enumerate(batches):
        whole.update(pred, gt)
        shards[i % 3].update(pred, gt)
    merged = SegmentationMetric(c)
    for s in shards:
        merged.merge(s.state())
    assert_close_nan(merged.compute()["IoU"], whole.compute()["IoU"])
    assert merged.compute()["mIoU"] == whole.compute()["mIoU"]
    # summing states (what an all-reduce does) and rebuilding gives the same numbers
    summed = {k: sum(s.state()[k] for s in shards) for k in ("intersect", "pred_area", "label_area")}
    rebuilt = SegmentationMetric.from_state(summed)
    assert rebuilt.compute()["mIoU"] == whole.compute()["mIoU"]
    # merging a metric object works too, and the state survives pickling
    m2 = pickle.loads(pickle.dumps(SegmentationMetric(c).merge(shards[0])))
    assert torch.equal(m2.state()["intersect"], shards[0].state()["intersect"])


def test_counts_are_exact_int64_beyond_float32():
    c = 3
    m = SegmentationMetric(c)
    big = {"intersect": torch.tensor([2**25 + 1, 0, 1]), "pred_area": torch.tensor([2**25 + 3, 1, 1]),
           "label_area": torch.tensor([2**25 + 1, 0, 1])}
    m.merge(big)
    m.update(torch.tensor([0, 0]), torch.tensor([0, 0]))
    s = m.state()
    assert s["intersect"][0].item() == 2**25 + 3
    assert s["union"][0].item() == 2**25 + 5
    assert m.compute()["IoU"][0] == pytest.approx(100 * (2**25 + 3) / (2**25 + 5), rel=1e-15)


def test_out_of_range_predictions_and_targets_follow_mmseg():
    c = 4
    pred = torch.tensor([0, 1, 4, 9, 2, 3])  # 4 and 9 are outside the classes: not counted as predictions
    gt = torch.tensor([0, 1, 1, 2, 255, 7])  # 7 outside: not counted as a label; 255 ignored
    m = SegmentationMetric(c)
    m.update(pred, gt)
    s = m.state()
    assert s["intersect"].tolist() == [1, 1, 0, 0]
    assert s["pred_area"].tolist() == [1, 1, 0, 1]
    assert s["label_area"].tolist() == [1, 2, 1, 0]


def test_input_checks_and_empty_metric():
    m = SegmentationMetric(5)
    with pytest.raises(ValueError):
        m.update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError):
        m.update(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    r = m.compute()
    assert math.isnan(r["mIoU"]) and math.isnan(r["aAcc"]) and len(r["IoU"]) == 5
    assert math.isnan(m.compute_present_only()["mIoU"])
    m.update(torch.full((4,), 2), torch.full((4,), 255))  # all ignored
    assert math.isnan(m.compute()["mIoU"])


def test_device_argument_places_state():
    m = SegmentationMetric(3, device="cpu")
    assert m.state()["intersect"].device.type == "cpu"
    m.update(torch.tensor([[0, 1], [2, 2]], dtype=torch.uint8), torch.tensor([[0, 1], [2, 0]], dtype=torch.int32))
    assert m.state()["intersect"].tolist() == [1, 1, 1]


# ---------------------------------------------------------------------- against mmseg IoUMetric
def _mmseg_iou_metric():
    try:
        from mmseg.evaluation import IoUMetric
    except Exception as e:  # ImportError, or mmcv/mmengine version asserts
        pytest.skip(f"mmseg.evaluation.IoUMetric is not importable ({type(e).__name__}: {e}); "
                    "install mmsegmentation>=1.2.2 mmcv-lite>=2.1,<2.2 mmengine to cross-check")
    return IoUMetric


@pytest.mark.parametrize("seed,num_classes,absent,pred_only", [
    (0, 7, (2, 5), (3,)),
    (1, 12, (0, 11), ()),
    (2, 4, (), (1,)),
])
def test_equals_mmseg_iou_metric(seed, num_classes, absent, pred_only):
    IoUMetric = _mmseg_iou_metric()
    shapes = [(13, 19), (2, 8, 10), (21, 6), (1, 16, 16), (9, 9)]
    batches = random_batches(seed, num_classes, shapes, absent=absent, pred_only=pred_only)

    ref = IoUMetric(ignore_index=IGNORE, iou_metrics=["mIoU"])
    ref.dataset_meta = {"classes": [f"class{i}" for i in range(num_classes)]}
    ours = SegmentationMetric(num_classes, ignore_index=IGNORE)
    for pred, gt in batches:
        ours.update(pred, gt)
        # mmseg takes one data sample per image: {"pred_sem_seg": {"data": [1,H,W]}, "gt_sem_seg": {...}}
        p2, g2 = pred.reshape(-1, *pred.shape[-2:]), gt.reshape(-1, *gt.shape[-2:])
        samples = [{"pred_sem_seg": {"data": p[None]}, "gt_sem_seg": {"data": g[None]}} for p, g in zip(p2, g2)]
        ref.process({}, samples)

    got = ours.compute()
    # per-class arrays, before mmseg's rounding to 2 decimals
    areas = [sum(r[i] for r in ref.results) for i in range(4)]
    per_class = IoUMetric.total_area_to_metrics(*areas, metrics=["mIoU"])
    assert_close_nan(np.asarray(got["IoU"]) / 100, per_class["IoU"], rtol=1e-6, atol=1e-7)
    assert_close_nan(np.asarray(got["Acc"]) / 100, per_class["Acc"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ours.state()["intersect"].numpy(), areas[0].numpy().astype(np.int64))
    np.testing.assert_array_equal(ours.state()["union"].numpy(), areas[1].numpy().astype(np.int64))
    # the summary mmseg reports (percent, rounded to 2 decimals)
    summary = ref.compute_metrics(ref.results)
    for k in ("mIoU", "mAcc", "aAcc"):
        assert round(got[k], 2) == pytest.approx(float(summary[k]), abs=0.011), k
        assert got[k] == pytest.approx(float(summary[k]), abs=0.005 + 1e-4), k
