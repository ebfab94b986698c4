"""Semantic segmentation mIoU, equal to mmseg 1.x `IoUMetric` (the TCL / SILC Table 2 number).

Why not call mmseg: it needs mmcv and mmengine at run time and keeps one tensor tuple per image.
This accumulates four int64 histograms on the predictions' device (exact for any dataset size,
where mmseg's float32 `histc` sums round above 2**24 pixels per class), and its state is a dict of
tensors, so shards of a distributed or resumed run are merged by summing.

Semantics (mmseg `IoUMetric.intersect_and_union` / `total_area_to_metrics`):
- pixels whose target is `ignore_index` are dropped;
- predictions and targets outside [0, num_classes) are not counted in any histogram;
- IoU = I / U, Acc = I / label area, per class over the whole dataset; a class absent from both
  predictions and targets gets NaN and the means ignore NaN; aAcc = sum I / sum label area.
`compute_present_only` is detectron2's `SemSegEvaluator` (CAT-Seg): means over the classes that
occur in the targets only.
"""
from __future__ import annotations

import math

import torch

_KEYS = ("intersect", "union", "pred_area", "label_area")


class SegmentationMetric:
    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.device = torch.device(device) if device is not None else None
        self._state = None if self.device is None else self._zeros(self.device)

    def _zeros(self, device) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(self.num_classes, dtype=torch.int64, device=device) for k in _KEYS}

    def reset(self) -> None:
        self._state = None if self.device is None else self._zeros(self.device)

    def _ensure(self, device) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = self._zeros(device)
        return self._state

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: integer tensors of the same shape (any batch shape)."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer label maps (argmax the logits first)")
        state = self._ensure(pred.device)
        pred = pred.reshape(-1).long()
        target = target.to(pred.device).reshape(-1).long()
        c = self.num_classes
        keep = target != self.ignore_index
        pred_ok = keep & (pred >= 0) & (pred < c)
        target_ok = keep & (target >= 0) & (target < c)
        hit = pred_ok & (pred == target)
        # Pixels that do not count go to an extra bin C, dropped: no boolean indexing and no bincount,
        # both of which wait for the device (their output size depends on the data).
        dev = state["intersect"].device
        for key, values, ok in (("intersect", pred, hit), ("pred_area", pred, pred_ok), ("label_area", target, target_ok)):
            bins = torch.zeros(c + 1, dtype=torch.int64, device=pred.device)
            bins.index_add_(0, torch.where(ok, values, c), torch.ones_like(values))
            state[key] += bins[:c].to(dev)
        state["union"] = state["pred_area"] + state["label_area"] - state["intersect"]

    # ------------------------------------------------------------------ state / merge
    def state(self) -> dict[str, torch.Tensor]:
        """Per-class int64 histograms (copies): intersect, union, pred_area, label_area."""
        s = self._ensure(self.device or torch.device("cpu"))
        return {k: v.clone() for k, v in s.items()}

    def merge(self, other) -> "SegmentationMetric":
        """Add another metric's `state()` (or the metric itself); shards of a dataset sum."""
        other_state = other.state() if isinstance(other, SegmentationMetric) else other
        missing = [k for k in ("intersect", "pred_area", "label_area") if k not in other_state]
        if missing:
            raise ValueError(f"state lacks {missing}")
        s = self._ensure(self.device or torch.as_tensor(other_state["intersect"]).device)
        for k in ("intersect", "pred_area", "label_area"):
            v = torch.as_tensor(other_state[k]).to(s[k].device, torch.int64)
            if v.shape != (self.num_classes,):
                raise ValueError(f"state[{k!r}] has shape {tuple(v.shape)}, expected ({self.num_classes},)")
            s[k] += v
        s["union"] = s["pred_area"] + s["label_area"] - s["intersect"]
        return self

    @classmethod
    def from_state(cls, state: dict, ignore_index: int = 255) -> "SegmentationMetric":
        m = cls(len(state["intersect"]), ignore_index=ignore_index)
        return m.merge(state)

    # ------------------------------------------------------------------ results
    def _areas(self):
        s = self._ensure(self.device or torch.device("cpu"))
        i, p, l = (s[k].double().cpu() for k in ("intersect", "pred_area", "label_area"))
        return i, p + l - i, p, l

    def compute(self) -> dict:
        """mmseg IoUMetric numbers in percent: mIoU, aAcc, mAcc, and per-class IoU / Acc lists."""
        inter, union, _, label = self._areas()
        iou = inter / union  # 0/0 -> NaN for classes absent from both
        acc = inter / label
        total = label.sum().item()
        return {
            "mIoU": _nanmean(iou) * 100,
            "aAcc": (inter.sum().item() / total * 100) if total else math.nan,
            "mAcc": _nanmean(acc) * 100,
            "IoU": (iou * 100).tolist(),
            "Acc": (acc * 100).tolist(),
        }

    def compute_present_only(self) -> dict:
        """detectron2 SemSegEvaluator in percent: means over classes present in the targets."""
        inter, union, _, label = self._areas()
        present = label > 0
        valid = present & (union > 0)
        nan = torch.full_like(inter, math.nan)
        acc = torch.where(present, inter / label.clamp(min=1), nan)
        iou = torch.where(valid, inter / union.clamp(min=1), nan)
        total = label.sum().item()
        weights = label / total if total else torch.zeros_like(label)
        n_valid, n_present = int(valid.sum()), int(present.sum())
        return {
            "mIoU": (iou[valid].sum().item() / n_valid * 100) if n_valid else math.nan,
            "fwIoU": (iou[valid] * weights[valid]).sum().item() * 100 if n_valid else math.nan,
            "mACC": (acc[present].sum().item() / n_present * 100) if n_present else math.nan,
            "pACC": (inter.sum().item() / total * 100) if total else math.nan,
            "IoU": (iou * 100).tolist(),
            "ACC": (acc * 100).tolist(),
        }


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return x[ok].mean().item() if ok.any() else math.nan
