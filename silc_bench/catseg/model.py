"""CAT-Seg (Cho et al., CVPR 2024) over any `VisionLanguageModel`: cost aggregation for
open-vocabulary segmentation, in plain PyTorch. Architecture facts from KU-CVLAB/CAT-Seg (6d3a188:
cat_seg/modeling/transformer/model.py, cat_seg_predictor.py, configs/vitb_384.yaml); the code is
ours. SILC's Table 3 used the early CAT-Seg (arXiv:2303.11797 v1/v2): SILC's CLIP-B/16 row
(arXiv:2310.13355, Table 3) equals that version's; `version: early` (PRESETS) selects it.

cost volume: cosine(dense patch embeddings, class text embeddings), [B, P, C, h, w] (P = 1: the
  templates' embeddings are averaged first; P = #templates with cost_templates="channels", as the
  early CAT-Seg did) -> 7x7 conv to `hidden_dim` channels per class.
aggregation: `num_layers` x [spatial: 2 Swin blocks (window, shift window/2, no relative position
  bias, as CAT-Seg) over each class's map, appearance guidance (projected dense features) joined
  to the q/k inputs] + [class: linear-attention transformer over classes at `pooling_size`-pooled
  positions, text guidance (projected text embeddings) joined to q/k, classes padded with learned
  tokens to `max_classes`].
decoder: per class, `len(decoder_dims)` x [transposed-conv upsampling, concat projected guidance
  from ViT blocks (depth/3 - 1 and 2*depth/3 - 1: 3 and 7 for 12 blocks) upsampled by transposed
  convs, double conv + GroupNorm] -> 3x3 conv to one logit. Output stride patch/4 (H/4 for B/16).
More than `max_classes` classes: only the top `max_classes` by raw cosine (per image, max over
space) are aggregated; the others get the floor logit -100 (CAT-Seg's fill value, sigmoid ~ 0).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from silc_bench.models.base import VisionLanguageModel

CATSEG_SINGLE = ["A photo of a {} in the scene"]  # CVPR CAT-Seg's PROMPT_ENSEMBLE_TYPE "single"
MASK_VALUE = -100.0  # additive attention mask of shifted / padded windows (Swin and CAT-Seg)


@dataclass
class CatSegConfig:
    """Head sizes (defaults: CVPR CAT-Seg, ViT-B/16 at 384) and the fine-tuning / text switches."""

    version: str = "cvpr"              # "cvpr" | "early" (arXiv v1/v2, the one SILC's Table 3 used)
    templates: list | str = field(default_factory=lambda: list(CATSEG_SINGLE))  # list, or a prompts.py set name
    text_encoder: str = "finetune"     # "finetune": q/v trained like the image tower; "frozen"
    finetune: str = "qv"               # backbone scope: "qv" | "attention+pos" (image tower only if text frozen)
    cost_templates: str = "mean"       # "mean": average template embeddings first; "channels": one cost per template
    dense_mode: str | None = None      # None: the backbone's default dense path
    crop_size: int = 384               # training crop; sets the default window size
    hidden_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    window_size: int | None = None     # None: (crop_size / patch) // 2 -> 12 for 384 / 16
    pooling_size: int = 2
    mlp_ratio: float = 4.0
    appearance_guidance_dim: int = 128
    text_guidance_dim: int = 128
    decoder_dims: list = field(default_factory=lambda: [64, 32])
    decoder_guidance_dims: list = field(default_factory=lambda: [256, 128])
    decoder_guidance_proj_dims: list = field(default_factory=lambda: [32, 16])
    decoder_scales: list | None = None    # None: 2x per stage, product patch/4 (output at H/4)
    guidance_blocks: list | None = None   # None: round(depth * i / (stages + 1)) - 1
    max_classes: int = 256             # CAT-Seg pad_len: pad to / keep the top this many classes
    floor_logit: float = -100.0        # logit of classes left out by the top-k rule

    def __post_init__(self):
        checks = {"version": ("cvpr", "early"), "text_encoder": ("finetune", "frozen"),
                  "finetune": ("qv", "attention+pos"), "cost_templates": ("mean", "channels")}
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"CAT-Seg {key} must be one of {allowed}, got {getattr(self, key)!r}")
        n = len(self.decoder_dims)
        if not (len(self.decoder_guidance_dims) == len(self.decoder_guidance_proj_dims) == n):
            raise ValueError("decoder_dims, decoder_guidance_dims and decoder_guidance_proj_dims need one entry per stage")
        for given in (self.decoder_scales, self.guidance_blocks):
            if given is not None and len(given) != n:
                raise ValueError(f"decoder_scales / guidance_blocks need {n} entries (one per decoder stage)")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "CatSegConfig":
        """Preset of `version` ("cvpr" default, "early") overridden by the other keys."""
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown CAT-Seg settings {sorted(unknown)}")
        if d.get("version", "cvpr") not in PRESETS:
            raise ValueError(f"CAT-Seg version must be one of {tuple(PRESETS)}, got {d['version']!r}")
        return cls(**{**PRESETS[d.get("version", "cvpr")], **d})

    def template_list(self) -> list[str]:
        if isinstance(self.templates, str):
            from silc_bench.data.prompts import get_templates
            return get_templates(self.templates)
        return list(self.templates)


# The early CAT-Seg (arXiv:2303.11797 v1/v2; KU-CVLAB/CAT-Seg's first release, configs/vitb_r101_384.yaml:
# PROMPT_ENSEMBLE_TYPE "imagenet", CLIP_FINETUNE "attention", a ResNet-101 guidance backbone): frozen
# text encoder, CLIP's 80 ImageNet templates (= cat_seg/third_party/imagenet_templates.py
# IMAGENET_TEMPLATES) as 80 cost channels, image attention + position embedding fine-tuned. Its
# extra ImageNet ResNet-101 guidance backbone is not implemented.
PRESETS = {
    "cvpr": {},
    "early": dict(version="early", templates="openai_imagenet_80", text_encoder="frozen",
                  finetune="attention+pos", cost_templates="channels"),
}


def auto_scales(patch: int, stages: int) -> list[int]:
    """Per-stage upsampling whose product is patch/4 (2x per stage first); 4 overall if patch/4 is
    not an integer (CAT-Seg's fixed x4, e.g. ViT-L/14 -> stride 3.5)."""
    total = patch // 4 if patch % 4 == 0 and patch >= 4 else 4
    scales = []
    for _ in range(stages):
        s = 2 if total % 2 == 0 and total > 1 else 1
        scales.append(s)
        total //= s
    scales[-1] *= total
    return scales


def auto_guidance_blocks(depth: int, stages: int) -> list[int]:
    return [max(0, round(depth * (i + 1) / (stages + 1)) - 1) for i in range(stages)]


# ------------------------------------------------------------- chunks of (image, class) maps
# Without gradients, the per-class parts (spatial aggregation, decoder) run over chunks of the
# B x K (image, class) maps whose largest activation fits these bytes. On a CPU a tensor this small
# is reused from the allocator's heap, while the whole stack's (for ViT-B/16, 5 views x 150 classes:
# 1.8 GB per decoder tensor) is mapped fresh at every forward, and most of the forward went into the
# kernel zeroing pages (benchmarks/catseg_chunks.py: about 2x faster, the same logits to the bit). On
# an accelerator the chunks reduce peak memory. Convolutions, GroupNorm, window attention and
# linear layers act on each map alone, so on a CPU the logits do not depend on the chunking
# (tests/test_catseg_model.py), with one rule kept: PyTorch's CPU convolution takes its own kernel
# instead of oneDNN's for a batch of one small map, and, on one thread, for 1x1 convolutions on
# batches under 16 (a decoder stage of scale 1, as for patch-8 backbones); that kernel rounds
# differently. So a chunk never holds fewer maps than those rules allow (a smaller remainder joins
# the chunk before), and takes oneDNN as the whole stack does. (On a GPU cuDNN may choose another
# algorithm for another batch size, as it may for any batch.) Training keeps one chunk, so its
# gradients are summed as before.
CPU_CHUNK_BYTES = 16 * 2**20
ACCELERATOR_CHUNK_BYTES = 2**30
LEAST_MAPS = 2                # no batch of one map
LEAST_MAPS_1X1_CONV = 16      # no 1x1 convolution on a batch under 16


def maps_per_chunk(rows: int, row_bytes: int, device, least: int = LEAST_MAPS) -> int:
    """How many (image, class) maps one chunk holds: all of them when gradients are on."""
    if torch.is_grad_enabled():
        return rows
    budget = CPU_CHUNK_BYTES if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_BYTES
    return min(rows, max(least, budget // max(1, row_bytes)))


def row_chunks(rows: int, per_image: int, chunk: int, device, least: int = LEAST_MAPS):
    """(slice of rows, each row's image index) over image-major rows of `per_image` classes; a last
    chunk of fewer than `least` rows joins the one before."""
    starts = list(range(0, rows, chunk))
    if len(starts) > 1 and rows - starts[-1] < least:
        starts.pop()
    for start, stop in zip(starts, starts[1:] + [rows]):
        yield slice(start, stop), torch.arange(start, stop, device=device) // per_image


@contextmanager
def whole_stack():
    """Inference with every (image, class) map in each tensor, as CAT-Seg's own code runs it (for
    benchmarks against it; the logits are the same)."""
    global CPU_CHUNK_BYTES, ACCELERATOR_CHUNK_BYTES
    saved = CPU_CHUNK_BYTES, ACCELERATOR_CHUNK_BYTES
    CPU_CHUNK_BYTES = ACCELERATOR_CHUNK_BYTES = 2**62
    try:
        yield
    finally:
        CPU_CHUNK_BYTES, ACCELERATOR_CHUNK_BYTES = saved


# ---------------------------------------------------------------------------- spatial aggregation
def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[N, H, W, C] -> [N, nW, ws*ws, C]."""
    n, h, w, c = x.shape
    x = x.view(n, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // ws) * (w // ws), ws * ws, c)


def _unwindows(x: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    n, _, _, c = x.shape
    x = x.view(n, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, c)


def window_mask(h: int, w: int, ws: int, shift: int, device) -> torch.Tensor | None:
    """Additive mask [nW, N, N] for (shifted) windows over an h x w map padded to multiples of ws:
    tokens attend only within their pre-shift region (Swin), never to padding. None if unneeded."""
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    if not shift and (hp, wp) == (h, w):
        return None
    ids = torch.zeros(hp, wp, device=device)
    if shift:
        cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
        for i, rs in enumerate(cuts):
            for j, cs in enumerate(cuts):
                ids[rs, cs] = 3 * i + j
    pad = torch.ones(hp, wp, dtype=torch.bool, device=device)
    pad[:h, :w] = False
    ids[torch.roll(pad, (-shift, -shift), (0, 1))] = -1
    win = _windows(ids[None, :, :, None], ws)[0, ..., 0]  # [nW, N]
    return (win[:, :, None] != win[:, None, :]).float() * MASK_VALUE


class WindowAttention(nn.Module):
    """Multi-head attention in windows; q/k see [features, guidance], v sees the features only."""

    def __init__(self, dim: int, guidance_dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # x [N, nW, L, C+G]
        n, nw, length, _ = x.shape
        split = lambda t: t.view(n, nw, length, self.heads, -1).transpose(2, 3)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x[..., :self.dim]))
        mask = None if mask is None else mask[None, :, None].to(q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(2, 3).reshape(n, nw, length, self.dim))


class SwinBlock(nn.Module):
    """Pre-LN Swin block (no relative position bias, as CAT-Seg) with guidance joined to q/k."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, guidance_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self._masks: dict = {}

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x [N, h, w, C], guidance [N, h, w, G] or None."""
        n, h, w, c = x.shape
        ws, shift = self.window, self.shift
        if min(h, w) <= ws:  # CAT-Seg / Swin: a map no larger than a window is one unshifted window
            ws, shift = min(h, w), 0
        y = self.norm1(x)
        if guidance is not None:
            y = torch.cat([y, guidance], dim=-1)
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        if (hp, wp) != (h, w):
            y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        key = (h, w, ws, shift, str(y.device))
        if key not in self._masks:
            self._masks[key] = window_mask(h, w, ws, shift, y.device)
        y = _unwindows(self.attn(_windows(y, ws), self._masks[key]), ws, hp, wp)
        if shift:
            y = torch.roll(y, (shift, shift), (1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class SpatialAggregation(nn.Module):
    """Two Swin blocks (shift 0, then window/2) over each class's map; guidance LayerNormed once."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, window: int, mlp_ratio: float):
        super().__init__()
        self.block1 = SwinBlock(dim, guidance_dim, heads, window, 0, mlp_ratio)
        self.block2 = SwinBlock(dim, guidance_dim, heads, window, window // 2, mlp_ratio)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x [B, C, K, h, w], guidance [B, G, h, w] -> [B, C, K, h, w]."""
        b, c, k, h, w = x.shape
        y = x.permute(0, 2, 3, 4, 1).reshape(b * k, h, w, c)
        g = None if guidance is None else self.guidance_norm(guidance.permute(0, 2, 3, 1))
        chunk = maps_per_chunk(b * k, self.row_bytes(h, w, max(4, y.element_size())), y.device)
        if chunk >= b * k:  # one chunk (always in training): the graph as before, guidance expanded
            if g is not None:
                g = g[:, None].expand(b, k, h, w, g.shape[-1]).reshape(b * k, h, w, -1)
            y = self.block2(self.block1(y, g), g)
        else:
            parts = []
            for rows, images in row_chunks(b * k, k, chunk, y.device):
                gr = None if g is None else g.index_select(0, images)
                parts.append(self.block2(self.block1(y[rows], gr), gr))
            y = torch.cat(parts)
        return y.view(b, k, h, w, c).permute(0, 4, 1, 2, 3)

    def row_bytes(self, h: int, w: int, itemsize: int) -> int:
        """Bytes of the largest activation per (image, class) map: the MLP's hidden layer or the
        attention weights (heads x window tokens per position)."""
        ws = min(self.block1.window, h, w)
        per_position = max(self.block1.mlp[0].out_features, self.block1.attn.heads * ws * ws)
        return math.ceil(h / ws) * ws * math.ceil(w / ws) * ws * per_position * itemsize


# ------------------------------------------------------------------------------ class aggregation
def linear_attention(q, k, v, eps: float = 1e-6) -> torch.Tensor:
    """Katharopoulos et al. linear attention with elu+1 features; q, k, v [N, L, H, D].
    Values are scaled by 1/L and back (fp16 headroom), as LoFTR / CAT-Seg do."""
    q, k = F.elu(q) + 1, F.elu(k) + 1
    length = v.shape[1]
    kv = torch.einsum("nshd,nshe->nhde", k, v / length)
    norm = 1.0 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhde,nlh->nlhe", q, kv, norm) * length


class ClassAggregation(nn.Module):
    """Linear-attention transformer layer over classes at pooled positions, text guidance on q/k."""

    def __init__(self, dim: int, guidance_dim: int, heads: int, pooling: int, pad_len: int):
        super().__init__()
        self.heads, self.pooling, self.pad_len = heads, pooling, pad_len
        self.q = nn.Linear(dim + guidance_dim, dim)
        self.k = nn.Linear(dim + guidance_dim, dim)
        self.v = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.pad_token = nn.Parameter(torch.zeros(1, dim)) if pad_len else None
        self.pad_guidance = nn.Parameter(torch.zeros(1, guidance_dim)) if pad_len and guidance_dim else None

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        """x [B, C, K, h, w], guidance [B, K, G] -> [B, C, K, h, w]."""
        b, c, k, h, w = x.shape
        p = x.flatten(0, 2)[:, None]  # [B*C*K, 1, h, w]
        p = F.avg_pool2d(p, self.pooling) if self.pooling > 1 else p
        hp, wp = p.shape[-2:]
        t = p.view(b, c, k, hp * wp).permute(0, 3, 2, 1).reshape(b * hp * wp, k, c)  # tokens = classes
        pad = max(0, self.pad_len - k) if self.pad_token is not None else 0
        if pad:
            t = torch.cat([t, self.pad_token.to(t.dtype).expand(t.shape[0], pad, c)], dim=1)
        if guidance is not None:
            if pad and self.pad_guidance is not None:
                guidance = torch.cat([guidance, self.pad_guidance.to(guidance.dtype).expand(b, pad, -1)], dim=1)
            guidance = guidance[:, None].expand(b, hp * wp, *guidance.shape[1:]).reshape(b * hp * wp, k + pad, -1)
        y = self.norm1(t)
        qk_in = y if guidance is None else torch.cat([y, guidance], dim=-1)
        heads = lambda z: z.view(z.shape[0], z.shape[1], self.heads, -1)  # noqa: E731
        a = linear_attention(heads(self.q(qk_in)), heads(self.k(qk_in)), heads(self.v(y)))
        t = t + a.flatten(2)
        t = t + self.mlp(self.norm2(t))
        t = t[:, :k].reshape(b, hp, wp, k, c).permute(0, 4, 3, 1, 2)  # [B, C, K, hp, wp]
        if (hp, wp) != (h, w):
            t = F.interpolate(t.flatten(1, 2), size=(h, w), mode="bilinear", align_corners=True).view(b, c, k, h, w)
        return x + t


# ------------------------------------------------------------------------------------ decoder
class UpStage(nn.Module):
    """Transposed-conv upsampling to (in - guidance) channels, concat guidance, double conv + GN."""

    def __init__(self, in_ch: int, out_ch: int, guidance_ch: int, scale: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, in_ch - guidance_ch, kernel_size=scale, stride=scale)
        groups = max(1, out_ch // 16)
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.GroupNorm(groups, out_ch), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.GroupNorm(groups, out_ch), nn.ReLU())

    def forward(self, x: torch.Tensor, guidance: torch.Tensor | None,
                images: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, h, w]: (image, class) maps; guidance [B, G, H, W], shared by the classes of each
        image; `images`: each row's image (a chunk's rows), or None: all B x K rows, image-major."""
        x = self.up(x)
        if guidance is not None:
            if images is None:
                if x.shape[0] % guidance.shape[0]:
                    raise ValueError(f"{x.shape[0]} maps are not the same number of classes for each of "
                                     f"{guidance.shape[0]} images; pass each map's image")
                k = x.shape[0] // guidance.shape[0]
                g = guidance[:, None].expand(guidance.shape[0], k, *guidance.shape[1:]).flatten(0, 1)
            else:
                g = guidance.index_select(0, images)
            x = torch.cat([x, g], dim=1)
        return self.conv(x)


def _conv_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU())


class Aggregator(nn.Module):
    """Cost volume of the kept classes -> per-class logits (CAT-Seg's `Aggregator`)."""

    def __init__(self, cfg: CatSegConfig, cost_channels: int, embed_dim: int, text_dim: int, window: int,
                 scales: list[int]):
        super().__init__()
        c = cfg
        self.cost_embed = nn.Conv2d(cost_channels, c.hidden_dim, kernel_size=7, padding=3)
        self.appearance_proj = _conv_relu(embed_dim, c.appearance_guidance_dim)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, c.text_guidance_dim), nn.ReLU())
        self.decoder_guidance_proj = nn.ModuleList(
            _conv_relu(d, p) for d, p in zip(c.decoder_guidance_dims, c.decoder_guidance_proj_dims))
        self.spatial = nn.ModuleList(
            SpatialAggregation(c.hidden_dim, c.appearance_guidance_dim, c.num_heads, window, c.mlp_ratio)
            for _ in range(c.num_layers))
        self.classwise = nn.ModuleList(
            ClassAggregation(c.hidden_dim, c.text_guidance_dim, c.num_heads, c.pooling_size, c.max_classes)
            for _ in range(c.num_layers))
        ins = [c.hidden_dim] + list(c.decoder_dims[:-1])
        self.decoder = nn.ModuleList(UpStage(i, o, g, s) for i, o, g, s in
                                     zip(ins, c.decoder_dims, c.decoder_guidance_proj_dims, scales))
        self.out = nn.Conv2d(c.decoder_dims[-1], 1, kernel_size=3, padding=1)

    def forward(self, cost: torch.Tensor, dense: torch.Tensor, text: torch.Tensor,
                vit_guidance: list[torch.Tensor]) -> torch.Tensor:
        """cost [B, P, K, h, w]; dense [B, D, h, w]; text [B, K, P, D] (unit); vit_guidance: per
        decoder stage [B, G_i, h_i, w_i] -> logits [B, K, H', W']."""
        b, p, k, h, w = cost.shape
        x = self.cost_embed(cost.permute(0, 2, 1, 3, 4).reshape(b * k, p, h, w))
        x = x.view(b, k, -1, h, w).transpose(1, 2)  # [B, C, K, h, w]
        appearance = self.appearance_proj(dense)
        text_guidance = self.text_proj(F.normalize(text.mean(dim=2), dim=-1))
        for spatial, classwise in zip(self.spatial, self.classwise):
            x = classwise(spatial(x, appearance), text_guidance)
        y = x.transpose(1, 2).flatten(0, 1)  # [B*K, C, h, w]
        guidance = [proj(g) for proj, g in zip(self.decoder_guidance_proj, vit_guidance)]
        least = LEAST_MAPS_1X1_CONV if any(s.up.kernel_size == (1, 1) for s in self.decoder) else LEAST_MAPS
        chunk = maps_per_chunk(b * k, self.decoder_row_bytes(h, w, max(4, y.element_size())), y.device, least)
        if chunk >= b * k:  # one chunk (always in training): the graph as before, guidance expanded
            for stage, g in zip(self.decoder, guidance):
                y = stage(y, g)
            return self.out(y).view(b, k, *y.shape[-2:])
        out = []
        for rows, images in row_chunks(b * k, k, chunk, y.device, least):
            z = y[rows]
            for stage, g in zip(self.decoder, guidance):
                z = stage(z, g, images)
            out.append(self.out(z))
        return torch.cat(out).view(b, k, *out[0].shape[-2:])

    def decoder_row_bytes(self, h: int, w: int, itemsize: int) -> int:
        """Bytes of the decoder's largest activation per (image, class) map."""
        largest = 0
        for stage in self.decoder:
            h, w = h * stage.up.stride[0], w * stage.up.stride[1]
            largest = max(largest, h * w * max(stage.up.in_channels, stage.conv[0].out_channels))
        return largest * itemsize


class CatSegHead(nn.Module):
    """Everything CAT-Seg adds to the backbone: ViT-guidance upsamplers + the aggregator."""

    def __init__(self, cfg: CatSegConfig, embed_dim: int, text_dim: int, width: int, window: int,
                 scales: list[int], num_templates: int):
        super().__init__()
        self.cfg = cfg
        cumulative = [math.prod(scales[:i + 1]) for i in range(len(scales))]
        self.vit_upsample = nn.ModuleList(nn.ConvTranspose2d(width, d, kernel_size=s, stride=s)
                                          for d, s in zip(cfg.decoder_guidance_dims, cumulative))
        channels = num_templates if cfg.cost_templates == "channels" else 1
        self.aggregator = Aggregator(cfg, channels, embed_dim, text_dim, window, scales)

    def forward(self, dense: torch.Tensor, blocks: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """dense [B, h, w, D]; blocks: ViT tokens [B, h, w, W] per decoder stage; text [K, T, D]
        unit embeddings -> logits [B, K, H', W']."""
        c = self.cfg
        b, k = dense.shape[0], text.shape[0]
        if c.cost_templates == "mean":
            text = F.normalize(text.mean(dim=1, keepdim=True), dim=-1)
        img = F.normalize(dense, dim=-1)
        cost = torch.einsum("bhwd,kpd->bpkhw", img, text.to(img.dtype))
        text = text[None].expand(b, *text.shape)
        keep = None
        if c.max_classes and k > c.max_classes:
            keep = cost.amax(dim=(1, 3, 4)).topk(c.max_classes, dim=1).indices  # [B, max_classes]
            cost = cost.gather(2, keep[:, None, :, None, None].expand(-1, cost.shape[1], -1, *cost.shape[-2:]))
            text = text.gather(1, keep[:, :, None, None].expand(-1, -1, *text.shape[-2:]))
        guidance = [up(g.permute(0, 3, 1, 2)) for up, g in zip(self.vit_upsample, blocks)]
        logits = self.aggregator(cost, dense.permute(0, 3, 1, 2), text, guidance)
        if keep is None:
            return logits
        out = logits.new_full((b, k, *logits.shape[-2:]), c.floor_logit)
        return out.scatter(1, keep[:, :, None, None].expand(-1, -1, *logits.shape[-2:]), logits)


class CatSeg(nn.Module):
    """CAT-Seg over a `VisionLanguageModel`. Trainable: the head + the backbone's q/v projections
    (or, version "early", image attention + position embedding); the rest of the backbone is frozen
    and stays in eval mode."""

    def __init__(self, backbone: VisionLanguageModel, config: CatSegConfig | dict | None = None):
        super().__init__()
        cfg = config if isinstance(config, CatSegConfig) else CatSegConfig.from_dict(config)
        self.config, self.backbone = cfg, backbone
        self.templates = cfg.template_list()
        self.dense_mode = backbone.check_dense_mode(cfg.dense_mode)
        ps = int(backbone.patch_size)
        device = next(backbone.parameters()).device
        with torch.no_grad():  # probe the backbone's sizes on a 2x2-patch image
            dense, inter = backbone.dense_features_with_intermediates(
                torch.zeros(1, 3, 2 * ps, 2 * ps, device=device), self.dense_mode, None)
            text_dim = backbone.encode_text(backbone.tokenize(["a"]).to(device)).shape[-1]
        self.depth, width, embed_dim = len(inter), inter[0].shape[-1], dense.shape[-1]
        stages = len(cfg.decoder_dims)
        given = cfg.guidance_blocks or auto_guidance_blocks(self.depth, stages)
        self.guidance_blocks = [int(b) + self.depth if int(b) < 0 else int(b) for b in given]
        if not all(0 <= b < self.depth for b in self.guidance_blocks):
            raise ValueError(f"guidance_blocks {list(given)} are out of range for a {self.depth}-block image tower")
        self.decoder_scales = list(cfg.decoder_scales or auto_scales(ps, stages))
        self.window = int(cfg.window_size or max(1, cfg.crop_size // ps // 2))
        self.head = CatSegHead(cfg, embed_dim, text_dim, width, self.window, self.decoder_scales,
                               len(self.templates)).to(device)
        towers = ("image",) if cfg.text_encoder == "frozen" else ("image", "text")
        chosen = backbone.qv_parameters(towers, cfg.finetune)
        backbone.requires_grad_(False)
        for _, p in chosen:
            p.requires_grad_(True)
        self.backbone_trainable = ["backbone." + n for n, _ in chosen]
        backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # no dropout / patch dropout in the frozen parts either way
        return self

    @property
    def text_trainable(self) -> bool:
        return self.config.text_encoder != "frozen"

    def encode_classes(self, classnames) -> torch.Tensor:
        """Class names (str, or synonym lists: the first is used) -> [K, T, D] unit text embeddings."""
        names = [c if isinstance(c, str) else c[0] for c in classnames]
        prompts = [t.format(n) for n in names for t in self.templates]
        device = next(self.head.parameters()).device
        chunks = [self.backbone.encode_text(self.backbone.tokenize(prompts[i:i + 1024]).to(device))
                  for i in range(0, len(prompts), 1024)]
        emb = F.normalize(torch.cat(chunks).float(), dim=-1)
        return emb.view(len(names), len(self.templates), -1)

    def forward(self, pixels: torch.Tensor, classes) -> torch.Tensor:
        """pixels: [B, 3, H, W] normalised as `backbone.preprocess` says; classes: names (see
        `encode_classes`) or their unit embeddings [K, T, D] (T templates) or [K, D] -> logits
        [B, K, H/4, W/4] (stride patch/4). Pass embeddings computed once when the text tower is not
        being trained (inference); names re-encode every call (training, with text q/v tuned)."""
        text = classes if isinstance(classes, torch.Tensor) else self.encode_classes(classes)
        text = text[:, None] if text.ndim == 2 else text
        dense, inter = self.backbone.dense_features_with_intermediates(pixels, self.dense_mode, self.guidance_blocks)
        return self.head(dense, [inter[i] for i in self.guidance_blocks], text)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source=None) -> None:
        """Load exactly the trainable tensors (every key and shape checked)."""
        from silc_bench.errors import UserError

        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        bad = [n for n in params if n in state and tuple(state[n].shape) != tuple(params[n].shape)]
        if missing or extra or bad:
            raise UserError(f"CAT-Seg weights do not fit this model: missing {missing[:5]}, unexpected "
                            f"{extra[:5]}, mis-shaped {bad[:5]}", path=source,
                            fix="load them with the backbone and config they were trained with")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.dtype))

    def head_parameter_count(self) -> int:
        return sum(p.numel() for p in self.head.parameters())

    def describe(self) -> dict:
        """Which CAT-Seg this is (version switches, resolved sizes) and what was trained."""
        names = set(self.backbone_trainable)
        n_backbone = sum(p.numel() for n, p in self.named_parameters() if n in names)
        return {
            "method": "cat-seg", "version": self.config.version, "config": asdict(self.config),
            "templates": self.templates, "synonyms": "first", "dense_mode": self.dense_mode,
            "guidance_blocks": self.guidance_blocks, "decoder_scales": self.decoder_scales,
            "output_stride": self.backbone.patch_size / math.prod(self.decoder_scales),
            "window_size": self.window, "backbone_depth": self.depth,
            "backbone": {k: self.backbone.provenance.get(k) for k in ("spec", "format", "sha256")},
            "trainable": {"head": self.head_parameter_count(), "backbone": n_backbone,
                          "backbone_scope": self.config.finetune,
                          "text_encoder": self.config.text_encoder},
            "not_implemented": ["early version's extra ImageNet ResNet-101 guidance backbone"]
            if self.config.version == "early" else [],
        }
