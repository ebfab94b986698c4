"""Pretraining defaults, stated once: the paper's recipe (SILC section 4.1; Table 6 budget: 5B
examples seen = 305,176 steps at batch 16,384).

Everything else reads them from here: the recipe merger (`trainer.load_config` merges a YAML file
over `defaults()`), the trainer's command line (its help shows them), the multi-crop views
(`MultiCropConfig`, whose own defaults are the paper's), the objectives' temperatures and momenta
and the paper recipes in configs/pretrain/ (which hold only their variant; `silc-bench pretrain
--config FILE --print-config` prints every setting).

Not in the SILC paper (SigLIP's recipe, our choice): Adam b2 0.95, weight decay 1e-4, gradient
clipping at 1.0, temperature / bias init 10 / -10, the 64-token c4_en tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from silc_bench.pretrain.multicrop import MultiCropConfig


@dataclass(frozen=True)
class DistillSettings:
    """SILC self-distillation (after DINO): K-dim projection head, temperatures, centring."""

    out_dim: int = 65536
    hidden: int = 2048
    bottleneck: int = 256
    layers: int = 3
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    weight: float = 1.0  # L = L_contrastive + weight * L_self-dist


@dataclass(frozen=True)
class OptimSettings:
    """AdamW on the rsqrt schedule (schedule.rsqrt_lr); timescale None = warmup_steps."""

    lr: float = 1e-3
    warmup_steps: int = 50_000
    cooldown_steps: int = 50_000
    timescale: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 16384  # global: split over the processes
    steps: int = 305_176     # the schedule's length
    seed: int = 0
    ckpt_every: int = 1000
    log_every: int = 1
    print_every: int = 10
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"
    prefetch: bool = True    # load the next batch in a thread while this one trains


# Settings a resumed run may change: they do not change what is computed.
RUNTIME_KEYS = ("ckpt_every", "log_every", "print_every", "prefetch", "device")


def _paper_model() -> dict:
    """TwoTowerConfig: ViT-B/16 with MAP pooling at 256 px (16 x 16 patches), B text tower, 64 tokens."""
    return {"img": {"width": 768, "depth": 12, "heads": 12, "patch_size": 16, "grid": [16, 16], "pool_type": "map"},
            "txt": {"vocab_size": 32000, "width": 768, "depth": 12, "heads": 12, "length": 64, "out_dim": 768},
            "temperature_init": 10.0, "bias_init": -10.0}


def _paper_tokenizer() -> dict:
    return {"kind": "sentencepiece", "file": "c4_en.model", "context_length": 64, "pad_id": 1,
            "lowercase": True, "eos": "sticky"}


@dataclass(frozen=True)
class PretrainSettings:
    """A whole recipe. `model`, `tokenizer` and `data` are free-form (checked where consumed)."""

    variant: str = "silc-c"
    objective: dict = field(default_factory=dict)  # overrides of the variant's switches
    model: dict = field(default_factory=_paper_model)
    tokenizer: dict = field(default_factory=_paper_tokenizer)
    data: dict = field(default_factory=lambda: {"kind": "webli"})  # WebLI is not public
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)
    distill: DistillSettings = field(default_factory=DistillSettings)
    ema_momentum: float = 0.966  # fixed, no schedule to 1.0
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)


OPEN_SECTIONS = ("model", "tokenizer", "data")


def defaults() -> dict:
    """The defaults as the plain nested dict that recipes are merged over (JSON types: lists)."""
    return json.loads(json.dumps(asdict(PretrainSettings())))
