"""CAT-Seg (cost aggregation for open-vocabulary segmentation) over any silc-bench backbone.

`CatSeg` / `CatSegConfig` (model.py), the trainer `main` (train.py), `load_catseg` (train.py).
"""
from silc_bench.catseg.model import CatSeg, CatSegConfig

__all__ = ["CatSeg", "CatSegConfig", "load_catseg"]


def load_catseg(path, **kwargs):
    """A trained CAT-Seg from its checkpoint (see `silc_bench.catseg.train.load_catseg`)."""
    from silc_bench.catseg.train import load_catseg as _load

    return _load(path, **kwargs)
