"""big_vision's text transformer (`models/proj/image_text/text_transformer.py`) in PyTorch.

Token embedding + learned pos_embedding -> pre-LN blocks (same as the ViT) -> `encoder_norm` ->
pooling ("last" = the final position; SigLIP relies on "sticky" EOS so that it is always EOS) ->
`head`. There is no causal mask and no padding mask: pad tokens are attended to, as in big_vision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from silc_bench.models.vit import LN_EPS, EncoderBlock, MAPHead, init_vit_

TEXT_POOL_TYPES = ("last", "first", "mean", "gap", "max", "gmp", "map")


@dataclass
class TextConfig:
    """Architecture of a big_vision text tower. `length` is the pos-embedding (context) length."""

    vocab_size: int = 32_000
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int | None = None  # None: 4 * width
    length: int = 64
    pool_type: str = "last"
    out_dim: int | None = 768  # `head` Dense output dim; None: no head
    map_heads: int | None = None
    map_mlp_dim: int | None = None

    def __post_init__(self):
        if self.pool_type not in TEXT_POOL_TYPES:
            raise ValueError(f"unknown text pool_type {self.pool_type!r}; choose one of {TEXT_POOL_TYPES}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def mlp(self) -> int:
        return self.mlp_dim or 4 * self.width

    @property
    def output_dim(self) -> int:
        return self.out_dim or self.width


class TextTransformer(nn.Module):
    """`forward(token_ids [B, length]) -> (embedding [B, D_out], intermediates)`."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.pos_embedding = nn.Parameter(torch.zeros(1, c.length, c.width))
        self.blocks = nn.ModuleList(EncoderBlock(c.width, c.heads, c.mlp) for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.width, eps=LN_EPS)
        self.map_head = (
            MAPHead(c.width, c.map_heads or c.heads, c.map_mlp_dim or c.mlp) if c.pool_type == "map" else None
        )
        self.head = nn.Linear(c.width, c.out_dim) if c.out_dim else None

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        c = self.config
        if token_ids.ndim != 2 or token_ids.shape[1] != c.length:
            raise ValueError(
                f"token ids must have shape [B, {c.length}] (the checkpoint's text length), got {tuple(token_ids.shape)}"
            )
        out: dict[str, torch.Tensor] = {}
        x = out["embedded"] = self.token_embedding(token_ids)
        x = x + self.pos_embedding.to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = out[f"block{i:02d}"] = block(x)
        x = out["transformed"] = self.encoder_norm(x)
        if c.pool_type == "last":
            x = x[:, -1]
        elif c.pool_type == "first":
            x = x[:, 0]
        elif c.pool_type in ("mean", "gap"):
            x = x.mean(dim=1)
        elif c.pool_type in ("max", "gmp"):
            x = x.max(dim=1).values
        else:
            x = self.map_head(x)
        out["pre_logits"] = x
        if self.head is not None:
            x = self.head(x)
        return x, out


def init_text_(txt: TextTransformer) -> None:
    """big_vision-like random init (flax Embed: N(0, 1/width); rest as the ViT)."""
    init_vit_(txt, txt.config.width)
    nn.init.normal_(txt.token_embedding.weight, std=1.0 / math.sqrt(txt.config.width))
