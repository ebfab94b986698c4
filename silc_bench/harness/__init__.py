"""Task harnesses: one module per task, each a `Harness` (silc_bench/harness/base.py).

`HARNESSES` is the registry: a task spec's `harness:` names an entry, "module:Class", imported on
first use (so a task's heavy imports load only when it runs).
"""
from __future__ import annotations

import importlib

from silc_bench.errors import UserError

HARNESSES = {
    "zs_seg": "silc_bench.harness.zs_seg:ZeroShotSegmentation",
    "ov_seg": "silc_bench.harness.ov_seg:OpenVocabSegmentation",
    "zs_cls": "silc_bench.harness.zs_cls:ZeroShotClassification",
    "fewshot": "silc_bench.harness.fewshot:FewShotLinear",
    "retrieval": "silc_bench.harness.retrieval:ImageTextRetrieval",
    "ov_det": "silc_bench.harness.ov_det:OpenVocabDetection",
    "lit_decoder": "silc_bench.harness.lit_decoder:LitDecoderEval",
}


def get_harness(task: dict):
    """The harness instance for a task spec (given its whole spec)."""
    name = task.get("harness")
    if name not in HARNESSES:
        raise UserError(f"task {task.get('name')!r} names unknown harness {name!r}", path=task.get("_path"),
                        fix=f"use one of: {', '.join(sorted(HARNESSES))}")
    module, _, cls = HARNESSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(task)
