"""Per-image predicted class maps (`silc-bench run --save-predictions`), written as PNGs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def prediction_format(num_classes: int) -> str:
    return "png-uint8" if num_classes < 255 else "png-uint16"


def save_prediction(prepared, dataset, index: int, pred) -> None:
    """Write `pred` [H, W] (class ids) as `<prepared.prediction_dir>/<image name>.png`, atomically;
    a no-op unless the runner set `prediction_dir` (--save-predictions)."""
    out = getattr(prepared, "prediction_dir", None)
    if not out:
        return
    samples = getattr(dataset, "samples", None)
    name = samples[index].name if samples is not None else f"{index:06d}"
    num_classes = dataset.num_classes
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arr = pred.detach().to("cpu").numpy()
    arr = arr.astype(np.uint8 if num_classes < 255 else np.uint16)
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".png.tmp")
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, out / f"{Path(str(name)).stem}.png")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_prediction(path) -> np.ndarray:
    return np.asarray(Image.open(path))
