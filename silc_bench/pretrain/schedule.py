"""Learning-rate schedule of big_vision (`utils.create_learning_rate_schedule`, decay_type "rsqrt").

lr(step) = base / sqrt(1 + (step - warmup) / timescale) after the warm-up (base during it),
times min(1, step / warmup) (linear warm-up from 0) and min(1, (total - step) / cooldown) (linear
cool-down to 0 at the end). `step` counts optimizer updates from 0, as optax's count does, so the
first update has lr 0 when there is a warm-up. SILC: base 1e-3, 50k warm-up, 50k cool-down, and we
take timescale = warm-up steps (the brief's convention; big_vision's default is 10k).
"""
from __future__ import annotations

import math


def rsqrt_lr(step: int, *, total_steps: int, base: float, warmup_steps: int = 0, cooldown_steps: int = 0,
             timescale: float | None = None, shift: int = 0) -> float:
    if total_steps > 1 and warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})")
    timescale = timescale or max(warmup_steps, 1)
    if step >= warmup_steps:
        lr = base / math.sqrt(1 + (step + shift - warmup_steps) / timescale)
    else:
        lr = base / math.sqrt(1 + shift / timescale)
    if warmup_steps:
        lr *= min(1.0, step / warmup_steps)
    if cooldown_steps:
        lr *= min(1.0, (total_steps - step) / cooldown_steps)
    return lr
