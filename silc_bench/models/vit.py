"""big_vision's ViT (`big_vision/models/vit.py`) in PyTorch, with the dense paths silc-bench needs.

Semantics follow big_vision exactly so that converted `.npz` weights give the same numbers:
patch conv -> + learned pos_embedding -> (prepend `cls` for pool "tok") -> pre-LN blocks
(LayerNorm eps 1e-6, tanh-GELU MLP) -> `encoder_norm` -> pooling -> optional pre_logits -> head.
Module names are readable; `silc_bench.checkpoints.big_vision` maps them to big_vision's names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # flax.linen.LayerNorm default
POOL_TYPES = ("map", "tok", "gap", "0", "none")
POSEMB_RESAMPLE_MODES = ("bilinear", "bicubic")


@dataclass
class ViTConfig:
    """Architecture of a big_vision ViT. `grid` is the pos-embedding grid the weights were trained at."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int | None = None  # None: 4 * width (big_vision default)
    patch_size: int = 16
    grid: tuple[int, int] = (14, 14)
    pool_type: str = "map"  # map | tok | gap | 0 | none
    out_dim: int | None = None  # `head` Dense output dim; None: no head (SigLIP B/16)
    rep_size: int | None = None  # `pre_logits` Dense + tanh before the head (rarely used)
    map_heads: int | None = None  # None: same as `heads` (big_vision MAPHead uses the ViT's)
    map_mlp_dim: int | None = None  # None: same as `mlp_dim`

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"unknown pool_type {self.pool_type!r}; choose one of {POOL_TYPES}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def mlp(self) -> int:
        return self.mlp_dim or 4 * self.width

    @property
    def output_dim(self) -> int:
        return self.out_dim or self.rep_size or self.width


class Attention(nn.Module):
    """flax MultiHeadDotProductAttention: separate q/k/v/out projections, q scaled by 1/sqrt(hd)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor | None = None) -> torch.Tensor:
        x_kv = x_q if x_kv is None else x_kv
        b, lq, d = x_q.shape
        lk = x_kv.shape[1]
        hd = d // self.heads
        q = self.query(x_q).view(b, lq, self.heads, hd).transpose(1, 2)
        k = self.key(x_kv).view(b, lk, self.heads, hd).transpose(1, 2)
        v = self.value(x_kv).view(b, lk, self.heads, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, lq, d))

    def single_token(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of every token to itself alone: softmax over one key is 1, so out(value(x))."""
        return self.out(self.value(x))


class Mlp(nn.Module):
    """big_vision MlpBlock: Dense_0 -> tanh-GELU -> Dense_1."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """Pre-LN transformer block (big_vision Encoder1DBlock)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then a residual MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = Attention(dim, heads)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, D]
        y = self.attn(self.probe.expand(x.shape[0], -1, -1), x)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]

    def per_token(self, x: torch.Tensor, mlp: bool = True) -> torch.Tensor:
        """What the head outputs when the probe attends to each token alone ([B, L, D] -> [B, L, D])."""
        e = self.attn.single_token(x)
        return e + self.mlp(self.norm(e)) if mlp else e


def resample_grid(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int], mode: str) -> torch.Tensor:
    """Resample a (1, oh*ow, D) position table to (1, nh*nw, D).

    "bilinear" equals big_vision's `resample_posemb` (scipy.ndimage.zoom, order=1): zoom maps output
    index i to input coordinate i*(in-1)/(out-1), i.e. corners aligned -> align_corners=True.
    "bicubic" equals open_clip's `resize_pos_embed` (bicubic, align_corners=False, antialias=True).
    """
    if tuple(old) == tuple(new):
        return table
    d = table.shape[-1]
    grid = table.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2).float()
    if mode == "bilinear":
        grid = F.interpolate(grid, size=tuple(new), mode="bilinear", align_corners=True)
    elif mode == "bicubic":
        grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False, antialias=True)
    else:
        raise ValueError(f"unknown posemb resample mode {mode!r}; choose one of {POSEMB_RESAMPLE_MODES}")
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d).to(table.dtype)


class ViT(nn.Module):
    """big_vision ViT. `forward(pixels) -> (embedding [B, D_out], intermediates)`; pixels NCHW in [-1, 1]."""

    def __init__(self, config: ViTConfig, posemb_resample: str = "bilinear"):
        super().__init__()
        self.config = c = config
        if posemb_resample not in POSEMB_RESAMPLE_MODES:
            raise ValueError(f"unknown posemb resample mode {posemb_resample!r}")
        self.posemb_resample = posemb_resample
        self.patch_embed = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos_embedding = nn.Parameter(torch.zeros(1, c.grid[0] * c.grid[1], c.width))
        self.cls = nn.Parameter(torch.zeros(1, 1, c.width)) if c.pool_type == "tok" else None
        self.blocks = nn.ModuleList(EncoderBlock(c.width, c.heads, c.mlp) for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.width, eps=LN_EPS)
        self.map_head = (
            MAPHead(c.width, c.map_heads or c.heads, c.map_mlp_dim or c.mlp) if c.pool_type == "map" else None
        )
        self.pre_logits = nn.Linear(c.width, c.rep_size) if c.rep_size else None
        self.head = nn.Linear(c.rep_size or c.width, c.out_dim) if c.out_dim else None
        self._posemb_cache: dict = {}

    @property
    def dense_modes(self) -> tuple[str, ...]:
        return ("map_value", "map_value_no_mlp", "tokens") if self.map_head is not None else ("tokens",)

    @property
    def default_dense_mode(self) -> str:
        return "map_value" if self.map_head is not None else "tokens"

    def posemb(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a patch grid; resampled tables are cached in eval mode."""
        grid = tuple(grid)
        if grid == self.config.grid:
            return self.pos_embedding
        p = self.pos_embedding
        cacheable = not self.training and not (torch.is_grad_enabled() and p.requires_grad)
        key = (grid, self.posemb_resample, p.device, p.dtype, p._version)
        if cacheable and key in self._posemb_cache:
            return self._posemb_cache[key]
        table = resample_grid(p, self.config.grid, grid, self.posemb_resample)
        if cacheable:
            self._posemb_cache = {k: v for k, v in self._posemb_cache.items() if k[1:] == key[1:]}
            table = self._posemb_cache[key] = table.detach()
        return table

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], dict]:
        """Pixels -> encoder-normed tokens [B, L, D] (cls first for pool "tok"), grid (h, w), intermediates."""
        out: dict[str, torch.Tensor] = {}
        p = self.config.patch_size
        # A side that is not a multiple of the patch size: the last partial patch row / column is
        # dropped, as a stride-p patch convolution (open_clip, timm, transformers) does.
        h, w = pixels.shape[-2] // p * p, pixels.shape[-1] // p * p
        if h == 0 or w == 0:
            raise ValueError(f"image size {tuple(pixels.shape[-2:])} is smaller than one patch ({p})")
        pixels = pixels[..., :h, :w]
        x = self.patch_embed(pixels)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = out["with_posemb"] = x + self.posemb((h, w)).to(x.dtype)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, -1, -1).to(x.dtype), x], dim=1)
        for i, block in enumerate(self.blocks):
            x = out[f"block{i:02d}"] = block(x)
        x = out["encoded"] = self.encoder_norm(x)
        return x, (h, w), out

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """pre_logits (tanh) and head, shared by the pooled and the dense paths."""
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        if self.head is not None:
            x = self.head(x)
        return x

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x, _, out = self.encode(pixels)
        pool = self.config.pool_type
        if pool == "map":
            x = self.map_head(x)
        elif pool == "gap":
            x = x.mean(dim=1)
        else:  # "tok", "0", "none": the first token
            x = x[:, 0]
        out["head_input"] = x
        if self.pre_logits is not None:
            out["pre_logits"] = torch.tanh(self.pre_logits(x))
        else:
            out["pre_logits"] = x
        x = self._project(x)
        return x, out

    def patch_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder-normed patch tokens [B, h*w, D] (without cls)."""
        x, grid, _ = self.encode(pixels)
        return (x[:, 1:] if self.cls is not None else x), grid

    def dense(self, pixels: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Per-patch embeddings [B, h, w, D_out] in the space of `forward`'s embedding.

        "map_value": z_i = e_i + MLP(LN(e_i)), e_i = out(value(x_i)) (the MAP head on token i alone);
        "map_value_no_mlp": z_i = e_i; "tokens": the encoded patch tokens. All then pre_logits/head.
        """
        mode = self._check_mode(mode)
        x, (h, w) = self.patch_tokens(pixels)
        return self._dense_head(x, mode).reshape(x.shape[0], h, w, -1)

    def dense_with_intermediates(self, pixels: torch.Tensor, mode: str | None = None,
                                 blocks=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`dense` plus the patch tokens after `blocks` ({i: [B, h, w, width]}, before encoder_norm)."""
        from silc_bench.models.base import resolve_blocks

        mode = self._check_mode(mode)
        x, (h, w), out = self.encode(pixels)
        skip = 1 if self.cls is not None else 0
        inter = {i: out[f"block{i:02d}"][:, skip:].reshape(x.shape[0], h, w, -1)
                 for i in resolve_blocks(blocks, self.config.depth)}
        return self._dense_head(x[:, skip:], mode).reshape(x.shape[0], h, w, -1), inter

    def _check_mode(self, mode: str | None) -> str:
        mode = mode or self.default_dense_mode
        if mode not in self.dense_modes:
            raise ValueError(f"dense mode {mode!r} is not offered by this model; choose one of {self.dense_modes}")
        return mode

    def _dense_head(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Encoder-normed patch tokens [B, L, width] -> dense embeddings [B, L, D_out] (see `dense`)."""
        if mode == "map_value":
            x = self.map_head.per_token(x, mlp=True)
        elif mode == "map_value_no_mlp":
            x = self.map_head.per_token(x, mlp=False)
        return self._project(x)


def init_vit_(vit: nn.Module, width: int) -> None:
    """big_vision-like random init: xavier-uniform Dense, lecun-normal stem, N(0, 1/width) posemb."""
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("head") and not name.endswith("map_head"):
                nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / m.in_features))
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / fan_in))
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, MAPHead):
            bound = math.sqrt(6.0 / (1 + width))  # xavier-uniform on (1, 1, D)
            nn.init.uniform_(m.probe, -bound, bound)
    pos = getattr(vit, "pos_embedding", None)
    if pos is not None:
        nn.init.normal_(pos, std=1.0 / math.sqrt(width))
    cls = getattr(vit, "cls", None)
    if cls is not None:
        nn.init.zeros_(cls)
