"""CAT-Seg (cost aggregation for open-vocabulary segmentation) over any silc-bench backbone.

`CatSeg` / `CatSegConfig` (model.py), the trainer (train.py). A trained CAT-Seg's files and their
loader (`load_catseg`, `load_catseg_model`): silc_bench.checkpoints.catseg.
"""
from silc_bench.catseg.model import CatSeg, CatSegConfig

__all__ = ["CatSeg", "CatSegConfig"]
