"""DataLoaders for the harnesses: decoding in worker processes, bad files reported cleanly.

A `UserError` raised while a worker decodes a file would reach the user wrapped in the worker's
traceback ("Caught UserError in DataLoader worker process 0 ..."). Items are therefore read
through `_Guarded`, which hands the error back as data; the main process raises it as the one
clear message it is.
"""
from __future__ import annotations

import os

import torch

from silc_bench.errors import UserError

_ERROR = "_silc_bench_error"


class _Guarded(torch.utils.data.Dataset):
    def __init__(self, dataset, indices, transform=None):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        try:
            item = self.dataset[self.indices[i]]
            return self.transform(item) if self.transform is not None else item
        except UserError as e:
            return {_ERROR: str(e)}


def default_workers() -> int:
    """Loader worker processes when `--workers` is not given: the cores left once the main process
    (the forward, with its intra-op threads) has two, at most 4. So 0 on a 2-core machine, where a
    worker slows the forward more than it hides decoding (benchmarks/zs_seg_vs_anchor_loop.py on 2
    cores: 5.89 s with 2 workers, 5.22 s with 0). Workers never change a number."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 2))


def _raise_if_error(item):
    if isinstance(item, dict) and _ERROR in item:
        raise UserError(item[_ERROR])
    return item


def iterate(dataset, indices, *, workers: int = 0, device="cpu", transform=None, prefetch: int = 4):
    """Items `dataset[i]` for i in `indices`, in order, each passed through `transform` in the
    worker; a bad file ends the run with its own message, not a worker traceback."""
    loader = torch.utils.data.DataLoader(
        _Guarded(dataset, indices, transform), batch_size=None, num_workers=workers,
        pin_memory=str(device).startswith("cuda"), prefetch_factor=prefetch if workers else None,
    )
    for item in loader:
        yield _raise_if_error(item)
