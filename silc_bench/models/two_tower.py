"""big_vision two-tower model (`models/proj/image_text/two_towers.py`) and its harness interface.

`TwoTower` is the trainable nn.Module (towers `img`, `txt`, log-temperature `t`, optional sigmoid
bias `b`); `BigVisionModel` wraps one with a tokenizer and preprocessing behind
`VisionLanguageModel`, which is all harnesses see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from silc_bench.models.base import BIG_VISION_PREPROCESS, Preprocess, Tokenizer, VisionLanguageModel
from silc_bench.models.text import TextConfig, TextTransformer, init_text_
from silc_bench.models.vit import ViT, ViTConfig, init_vit_


@dataclass
class TwoTowerConfig:
    """Both towers plus the logit parameters. `bias`: sigmoid-loss model (SigLIP/SILC) with `b`."""

    img: ViTConfig = field(default_factory=ViTConfig)
    txt: TextConfig = field(default_factory=TextConfig)
    bias: bool = True
    temperature_init: float = 10.0  # t = log(temperature_init); SigLIP uses 10
    bias_init: float = -10.0  # SigLIP uses -10

    def __post_init__(self):
        if isinstance(self.img, dict):
            self.img = ViTConfig(**self.img)
        if isinstance(self.txt, dict):
            self.txt = TextConfig(**self.txt)


class TwoTower(nn.Module):
    """Image and text towers; `forward` returns L2-normalised embeddings like big_vision (+1e-8)."""

    def __init__(self, config: TwoTowerConfig, posemb_resample: str = "bilinear"):
        super().__init__()
        self.config = config
        self.img = ViT(config.img, posemb_resample=posemb_resample)
        self.txt = TextTransformer(config.txt)
        self.t = nn.Parameter(torch.full((1,), math.log(config.temperature_init)))
        self.b = nn.Parameter(torch.full((1,), float(config.bias_init))) if config.bias else None

    @classmethod
    def from_config(cls, config: TwoTowerConfig, seed: int | None = None, **kw) -> "TwoTower":
        """A randomly initialised model (big_vision-like init) for pretraining or tests."""
        model = cls(config, **kw)
        gen_state = None
        if seed is not None:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
        try:
            init_vit_(model.img, config.img.width)
            init_text_(model.txt)
        finally:
            if gen_state is not None:
                torch.random.set_rng_state(gen_state)
        return model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.img(pixels)[0]

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.txt(token_ids)[0]

    def forward(self, pixels: torch.Tensor | None = None, token_ids: torch.Tensor | None = None):
        """-> (zimg, ztxt, out): normalised embeddings (None if not given); out has "t" = exp(t), "b"."""
        out: dict[str, torch.Tensor] = {}
        zimg = ztxt = None
        if pixels is not None:
            zimg, img_out = self.img(pixels)
            out.update({f"img/{k}": v for k, v in img_out.items()})
            zimg = zimg / (zimg.norm(dim=-1, keepdim=True) + 1e-8)
        if token_ids is not None:
            ztxt, txt_out = self.txt(token_ids)
            out.update({f"txt/{k}": v for k, v in txt_out.items()})
            ztxt = ztxt / (ztxt.norm(dim=-1, keepdim=True) + 1e-8)
        out["t"] = self.t.exp()
        if self.b is not None:
            out["b"] = self.b
        return zimg, ztxt, out


class BigVisionModel(VisionLanguageModel):
    """A `TwoTower` behind the harness interface. Embeddings are returned un-normalised."""

    def __init__(self, two_tower: TwoTower, tokenizer: Tokenizer, preprocess: Preprocess | None = None):
        super().__init__()
        self.model = two_tower
        self.tokenizer = tokenizer
        c = two_tower.config.img
        self.patch_size = c.patch_size
        self.preprocess = preprocess or Preprocess(
            image_size=(c.grid[0] * c.patch_size, c.grid[1] * c.patch_size), **BIG_VISION_PREPROCESS
        )
        self.dense_modes = two_tower.img.dense_modes
        self.default_dense_mode = two_tower.img.default_dense_mode

    @property
    def config(self) -> TwoTowerConfig:
        return self.model.config

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(token_ids.to(self.model.t.device))

    def encode_image_pre_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """big_vision ViT `out["pre_logits"]`: the pooled token (after the optional tanh
        pre-logits layer), before the head that maps it into the text space."""
        return self.model.img(pixels)[1]["pre_logits"]

    def dense_features(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        return self.model.img.dense(pixels, self.check_dense_mode(mode))

    def detection_tokens(self, pixels: torch.Tensor):
        vit = self.model.img
        x, (h, w), _ = vit.encode(pixels)
        if vit.cls is not None:
            return x[:, 1:].reshape(x.shape[0], h, w, -1), x[:, 0], "cls"
        grid = x.reshape(x.shape[0], h, w, -1)
        if vit.map_head is not None:
            return grid, vit.map_head(x), "map"
        return grid, None, "none"

    def dense_features_with_intermediates(self, pixels: torch.Tensor, mode: str | None = None, blocks=()):
        return self.model.img.dense_with_intermediates(pixels, self.check_dense_mode(mode), blocks)

    def qv_parameters(self, towers=("image", "text"), scope: str = "qv") -> list[tuple[str, nn.Parameter]]:
        """big_vision blocks have separate `query`/`value` Dense layers: their kernels and biases.
        scope "attention+pos": query/key/value/out of every block plus `pos_embedding`. The MAP
        heads' attention is pooling, not a block, and is never included."""
        from silc_bench.models.base import check_finetune_args

        towers = check_finetune_args(towers, scope)
        parts = ("query", "value") if scope == "qv" else ("query", "key", "value", "out")
        out = []
        for tower, prefix in (("image", "model.img"), ("text", "model.txt")):
            if tower not in towers:
                continue
            module = self.model.img if tower == "image" else self.model.txt
            if scope != "qv":
                out.append((f"{prefix}.pos_embedding", module.pos_embedding))
            for i, block in enumerate(module.blocks):
                for part in parts:
                    lin = getattr(block.attn, part)
                    out += [(f"{prefix}.blocks.{i}.attn.{part}.{n}", p) for n, p in lin.named_parameters()]
        return out

    @property
    def logit_scale(self) -> float:
        return float(self.model.t.detach().exp())

    @property
    def logit_bias(self) -> float | None:
        return None if self.model.b is None else float(self.model.b.detach())

    def logits(self, zimg: torch.Tensor, ztxt: torch.Tensor) -> torch.Tensor:
        """[Bi, Bt] logits = exp(t) * <zimg, ztxt> (+ b) on normalised embeddings."""
        zimg = zimg / (zimg.norm(dim=-1, keepdim=True) + 1e-8)
        ztxt = ztxt / (ztxt.norm(dim=-1, keepdim=True) + 1e-8)
        out = self.logit_scale * zimg @ ztxt.T
        return out + self.logit_bias if self.logit_bias is not None else out
