"""Data defects: label values reported as stored in the file; the documented metrics import."""
import re

import numpy as np
import pytest
from PIL import Image

from silc_bench.data.fixtures import write_segmentation_fixture
from silc_bench.data.segmentation import open_dataset
from silc_bench.errors import UserError


def _set_first_label_pixel(ds, value):
    path = ds.samples[0].label
    with Image.open(path) as im:
        mode, palette = im.mode, im.getpalette()
        array = np.array(im)
    array[0, 0] = value
    out = Image.fromarray(array, mode=mode if mode in ("L", "P") else None)
    if palette:
        out.putpalette(palette)
    out.save(path)
    return path


def test_out_of_range_label_is_reported_as_stored_with_reduce_zero_label(tmp_path):
    """PC-59 stores class k as k + 1 (reduce_zero_label): a stored 99 is reported as 99, not 98."""
    write_segmentation_fixture("pc59", tmp_path, num_images=1, size=(40, 48), seed=0)
    ds = open_dataset("pc59", tmp_path)
    path = _set_first_label_pixel(ds, 99)
    with pytest.raises(UserError) as e:
        ds[0]
    msg = str(e.value)
    assert re.search(r"stored label value 99\b", msg), msg
    assert "1..59" in msg  # the valid stored range
    assert str(path) in msg
    assert not re.search(r"label values? 98\b", msg), msg  # the reduced value is not passed off as the stored one


def test_out_of_range_label_without_reduce_zero_label(tmp_path):
    write_segmentation_fixture("cityscapes", tmp_path, num_images=1, size=(40, 48), seed=0)
    ds = open_dataset("cityscapes", tmp_path)
    _set_first_label_pixel(ds, 99)
    with pytest.raises(UserError) as e:
        ds[0]
    msg = str(e.value)
    assert re.search(r"stored label value 99\b", msg) and "0..18 and 255" in msg, msg


def test_segmentation_metric_is_importable_from_metrics():
    from silc_bench.metrics import SegmentationMetric
    from silc_bench.metrics.segmentation import SegmentationMetric as Impl

    assert SegmentationMetric is Impl
    import silc_bench.metrics

    assert "SegmentationMetric" in silc_bench.metrics.__all__
