"""Metrics: `SegmentationMetric` (mmseg's IoUMetric mIoU / aAcc / mAcc, plus detectron2's classes-present mIoU)."""
from silc_bench.metrics.segmentation import SegmentationMetric

__all__ = ["SegmentationMetric"]
