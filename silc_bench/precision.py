"""Numeric precision of an evaluation: a recorded choice, part of a record's identity.

fp32 is the reference (every exactness test runs at fp32). bf16 / fp16 run the harness under
`torch.autocast` on the evaluation device: bf16 on CUDA and on CPUs (fast where the CPU has
AVX512-BF16 or AMX, correct but slow elsewhere; the record says which), fp16 on CUDA only.

`--compile` (torch.compile of the model's image path) belongs here too: fused kernels round
differently from eager ones (measured: features differ by ~2e-6 at fp32), so a compiled run is
its own record (`<dataset>@compiled.json`), never mixed with the eager one.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from silc_bench.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check(precision: str, device) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}", fix=f"use one of: {', '.join(PRECISIONS)}")
    if precision == "fp16" and not str(device).startswith("cuda"):
        raise UserError(f"--precision fp16 needs a CUDA device (got {device})",
                        fix="use --precision bf16 on a CPU, or fp32 (the reference)")
    return precision


def autocast(precision: str, device):
    """The context a harness runs in: nothing for fp32, torch.autocast otherwise."""
    if check(precision, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=_DTYPES[precision])


def compile_model(model):
    """torch.compile, in place, what the harnesses call per image: a two-tower model's image path
    (`dense_features`, `encode_image`; text embeddings are computed once and cached), any other
    model's `forward` (CAT-Seg). Shapes are static: a new crop shape compiles once more."""
    from silc_bench.models.base import VisionLanguageModel

    names = ("dense_features", "encode_image") if isinstance(model, VisionLanguageModel) else ("forward",)
    for name in names:
        setattr(model, name, torch.compile(getattr(model, name), dynamic=False))
    return model


def describe(precision: str, device, compiled: bool = False) -> dict:
    info = {"mode": precision, "autocast": precision != "fp32"}
    if compiled:
        info["compiled"] = f"torch.compile (torch {torch.__version__}, dynamic=False)"
    if precision == "bf16" and not str(device).startswith("cuda"):
        info["cpu_bf16_instructions"] = cpu_has_bf16()
    return info
