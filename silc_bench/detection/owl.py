"""OWL-ViT / OWLv2 open-vocabulary detection heads on any `VisionLanguageModel` backbone.

Reference: scenic's `projects/owl_vit` (layers.py, models.py, utils.py; read for facts, see
docs/PROTOCOLS_T1_T4_T5.md section A); transformers' `Owlv2ForObjectDetection` is its PyTorch port,
and module names here follow the port so its checkpoints load one-to-one
(`silc_bench/checkpoints/owlv2.py`) and tests can compare outputs value for value.

Per patch token the detector predicts a box (cx, cy, w, h in [0, 1] of the padded square input)
and a logit per text (or image-exemplar) query; objectness is an extra head on detached features
that scoring does not use (as in scenic's evaluator).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from silc_bench.models.base import VisionLanguageModel, image_token_width

# How the image's global token enters the patch tokens (scenic `merge_class_token`):
# "mul-ln": tokens * global token, then a new LayerNorm (OWLv2 B/16); "drop-ln": patch tokens only,
# then the LayerNorm; "drop": patch tokens as they are. For MAP towers (SigLIP, SILC: no class token)
# "mul-ln" uses the MAP head's pooled output as the global token; every record names the kind used.
MERGES = ("mul-ln", "drop-ln", "drop")
LOGIT_EPS = 1e-4  # scenic utils.logit / transformers compute_box_bias
PRIOR_PROB = 0.01  # scenic configs' prior_prob: fresh heads start at sigmoid(logit) ~ 0.01


def _logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x + LOGIT_EPS) - torch.log1p(-x + LOGIT_EPS)


def box_bias(grid_h: int, grid_w: int) -> torch.Tensor:
    """[h*w, 4] logit-space bias: each patch's box starts at its grid cell's bottom-right corner
    (x = i/W, y = j/H for i, j from 1, as scenic's comment says: corners, not centres) with the
    size of one cell; rows in row-major patch order."""
    ys = torch.arange(1, grid_h + 1, dtype=torch.float32) / grid_h
    xs = torch.arange(1, grid_w + 1, dtype=torch.float32) / grid_w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    xy = torch.stack([xx, yy], dim=-1).reshape(-1, 2).clamp(0.0, 1.0)
    wh = torch.tensor([1.0 / grid_w, 1.0 / grid_h]).expand_as(xy)
    return torch.cat([_logit(xy), _logit(wh)], dim=-1)


class PredictorMLP(nn.Module):
    """Three Dense layers with GELU between (scenic PredictorMLP; the port's box / objectness head)."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.dense0 = nn.Linear(width, width)
        self.dense1 = nn.Linear(width, width)
        self.dense2 = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.dense1(F.gelu(self.dense0(x)))))


class ClassHead(nn.Module):
    """Patch token -> class embedding in the text space; logits = (cos + shift) * (elu(scale) + 1)."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.dense0 = nn.Linear(width, embed_dim)
        self.logit_shift = nn.Linear(width, 1)
        self.logit_scale = nn.Linear(width, 1)

    def class_embeddings(self, feats: torch.Tensor) -> torch.Tensor:
        """Un-normalised class embeddings (what image-exemplar queries are made of)."""
        return self.dense0(feats)

    def _patch_terms(self, feats: torch.Tensor):
        """What the logits of every query set share: raw and normalised class embeddings, shift, scale."""
        raw = self.class_embeddings(feats)
        emb = raw / (torch.linalg.vector_norm(raw, dim=-1, keepdim=True) + 1e-6)
        return raw, emb, self.logit_shift(feats), F.elu(self.logit_scale(feats)) + 1

    @staticmethod
    def _logits(emb, shift, scale, queries: torch.Tensor) -> torch.Tensor:
        q = queries / (torch.linalg.vector_norm(queries, dim=-1, keepdim=True) + 1e-6)
        q = q.to(emb.dtype)
        return (emb @ (q.transpose(-1, -2) if q.ndim == 3 else q.T) + shift) * scale

    def forward(self, feats: torch.Tensor, queries: torch.Tensor, query_mask: torch.Tensor | None = None):
        """feats [B, P, W]; queries [Q, D] or [B, Q, D] (un-normalised); query_mask [Q] or [B, Q]
        (False: padding, its logit is the dtype's minimum) -> (logits [B, P, Q], class embeddings)."""
        raw, emb, shift, scale = self._patch_terms(feats)
        logits = self._logits(emb, shift, scale, queries)
        if query_mask is not None:
            mask = query_mask.to(logits.device).bool()
            mask = mask.unsqueeze(-2) if mask.ndim > 1 else mask
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        return logits, raw

    def ensemble(self, feats: torch.Tensor, query_sets: torch.Tensor):
        """The evaluator's prompt ensemble: query_sets [T, Q, D] (one set per template) -> (the
        mean over templates of each set's float logits [B, P, Q], class embeddings). The patch
        terms are computed once for all T sets."""
        raw, emb, shift, scale = self._patch_terms(feats)
        logits = None
        for q in query_sets:
            lt = self._logits(emb, shift, scale, q).float()
            logits = lt if logits is None else logits.add_(lt)
        return logits.div_(len(query_sets)), raw


class OwlDetector(nn.Module):
    """An OWL-ViT detector: a backbone's image tokens -> per-patch boxes and query logits.

    The backbone is any `VisionLanguageModel` offering `detection_tokens`; text queries are its
    `encode_text` outputs. Heads are created fresh (scenic's initialisation: zero last box layer,
    class projection ~ N(0, 1e-6)) unless weights are loaded into them.
    """

    def __init__(self, backbone: VisionLanguageModel, *, width: int, embed_dim: int, merge: str = "mul-ln",
                 layer_norm_eps: float = 1e-6, objectness: bool = True):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"unknown class-token merge {merge!r}; choose one of {MERGES}")
        self.backbone = backbone
        self.merge = merge
        self.width, self.embed_dim = int(width), int(embed_dim)
        self.layer_norm = nn.LayerNorm(width, eps=layer_norm_eps) if merge.endswith("-ln") else None
        self.class_head = ClassHead(width, embed_dim)
        self.box_head = PredictorMLP(width, 4)
        self.objectness_head = PredictorMLP(width, 1) if objectness else None
        self.global_token_kind: str | None = None  # set on the first forward ("cls" / "map" / "none")
        self.provenance: dict = {}  # filled by the loader (silc_bench/checkpoints/owl.py)
        self._bias_cache: dict = {}

    def init_heads_(self, seed: int = 0) -> None:
        """Fresh heads, reproducible from `seed`: box and objectness MLPs with a zero last layer
        (boxes start at the bias: one patch-sized box per cell), class projection ~ N(0, 1e-6)
        (scenic), and the logit shift's bias at the prior logit, so every score starts near
        PRIOR_PROB (our reading of scenic's `prior_prob`)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mlp in (self.box_head, self.objectness_head):
                if mlp is None:
                    continue
                for layer in (mlp.dense0, mlp.dense1):
                    nn.init.xavier_uniform_(layer.weight, generator=g)
                    layer.bias.zero_()
                mlp.dense2.weight.zero_()
                mlp.dense2.bias.zero_()
            self.class_head.dense0.weight.normal_(0.0, 1e-6, generator=g)
            self.class_head.dense0.bias.zero_()
            for layer in (self.class_head.logit_shift, self.class_head.logit_scale):
                nn.init.xavier_uniform_(layer.weight, generator=g)
                layer.bias.zero_()
            self.class_head.logit_shift.bias.fill_(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
            if self.layer_norm is not None:
                self.layer_norm.reset_parameters()

    @classmethod
    def for_backbone(cls, backbone: VisionLanguageModel, merge: str = "mul-ln", seed: int = 0, **kw) -> "OwlDetector":
        """Fresh heads sized by one probe forward of the backbone (a one-patch image, one text)."""
        dev = next(backbone.parameters()).device
        with torch.inference_mode():
            text = backbone.encode_text(backbone.tokenize(["a"]).to(dev))
        det = cls(backbone, width=image_token_width(backbone), embed_dim=text.shape[-1], merge=merge, **kw).to(dev)
        det.init_heads_(seed)
        return det

    def box_bias(self, grid_h: int, grid_w: int, device, dtype) -> torch.Tensor:
        key = (grid_h, grid_w, device, dtype)
        if key not in self._bias_cache:
            self._bias_cache[key] = box_bias(grid_h, grid_w).to(device=device, dtype=dtype)
        return self._bias_cache[key]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> merged patch features [B, h, w, W]."""
        tokens, glob, kind = self.backbone.detection_tokens(pixels)
        self.global_token_kind = kind
        if self.merge == "mul-ln":
            if glob is None:
                raise ValueError("merge 'mul-ln' needs a global token, and this backbone has neither a class "
                                 "token nor a MAP head: use merge 'drop-ln'")
            tokens = tokens * glob[:, None, None, :].to(tokens.dtype)
        if self.layer_norm is not None:
            tokens = self.layer_norm(tokens)
        return tokens

    def boxes(self, feats: torch.Tensor) -> torch.Tensor:
        """Features [B, h, w, W] -> boxes [B, h*w, 4], cx cy w h in [0, 1] of the input square."""
        b, h, w, _ = feats.shape
        x = self.box_head(feats.reshape(b, h * w, -1))
        return torch.sigmoid(x + self.box_bias(h, w, x.device, x.dtype))

    def objectness(self, feats: torch.Tensor) -> torch.Tensor | None:
        if self.objectness_head is None:
            return None
        b, h, w, _ = feats.shape
        return self.objectness_head(feats.detach().reshape(b, h * w, -1))[..., 0]

    def forward(self, pixels: torch.Tensor, queries: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None, *, query_sets: torch.Tensor | None = None,
                objectness: bool = True) -> dict:
        """-> {"features" [B, h, w, W], "boxes" [B, P, 4], "class_embeds" [B, P, D], "objectness"
        [B, P] (None when not asked for), and with queries "logits" [B, P, Q]}. `query_sets`
        [T, Q, D] instead of `queries`: logits averaged over the T sets (`ClassHead.ensemble`)."""
        feats = self.image_features(pixels)
        b, h, w, _ = feats.shape
        flat = feats.reshape(b, h * w, -1)
        out = {"features": feats, "boxes": self.boxes(feats),
               "objectness": self.objectness(feats) if objectness else None}
        if query_sets is not None:
            out["logits"], out["class_embeds"] = self.class_head.ensemble(flat, query_sets)
        elif queries is None:
            out["class_embeds"] = self.class_head.class_embeddings(flat)
        else:
            out["logits"], out["class_embeds"] = self.class_head(flat, queries, query_mask)
        return out

    def text_queries(self, texts: list[str]) -> torch.Tensor:
        """Texts -> query embeddings [Q, D] (the backbone's text embeddings, un-normalised)."""
        dev = next(self.parameters()).device
        return self.backbone.encode_text(self.backbone.tokenize(texts).to(dev))

    def describe(self) -> dict:
        """The heads' shape and merge rule, and the backbone as `load_model` describes it."""
        if self.global_token_kind is None:  # one one-patch forward tells which global token there is
            p = self.backbone.patch_size
            with torch.inference_mode():
                self.global_token_kind = self.backbone.detection_tokens(
                    torch.zeros(1, 3, p, p, device=next(self.parameters()).device))[2]
        return {"method": "owl-vit", "merge": self.merge, "global_token": self.global_token_kind,
                "width": self.width, "embed_dim": self.embed_dim,
                "objectness_head": self.objectness_head is not None,
                "layer_norm_eps": None if self.layer_norm is None else self.layer_norm.eps,
                "backbone": self.backbone.describe(), **self.provenance}


def image_exemplar_query(detector: OwlDetector, pixels: torch.Tensor,
                         box_xyxy: torch.Tensor | None = None) -> torch.Tensor:
    """One query image (and optionally an exemplar box, xyxy in [0, 1] of the input square) ->
    a query embedding [D] in the class-embedding space.

    With a box, OWL-ViT's rule (transformers' OWL-ViT `embed_image_query`): among patches whose
    predicted box overlaps the exemplar with IoU >= 0.8 x the best IoU, the class embedding least
    similar to the image's mean class embedding. Without one, OWLv2's: the patch of highest
    objectness.
    """
    from torchvision.ops import box_convert, box_iou

    out = detector(pixels[:1])
    if box_xyxy is None:
        if out["objectness"] is None:
            raise ValueError("an exemplar without a box needs the objectness head; pass the exemplar box")
        return out["class_embeds"][0, int(out["objectness"][0].argmax())]
    boxes = box_convert(out["boxes"][0], "cxcywh", "xyxy")
    ious = box_iou(box_xyxy.reshape(1, 4).to(boxes), boxes)[0]
    if float(ious.max()) <= 0:
        raise ValueError("the exemplar box overlaps no predicted box")
    selected = torch.nonzero(ious >= ious.max() * 0.8).flatten()
    emb = out["class_embeds"][0]
    sim = emb[selected] @ emb.mean(dim=0)
    return emb[selected[int(torch.argmin(sim))]]


def top_k_detections(logits: torch.Tensor, boxes: torch.Tensor, k: int = 300):
    """One image's logits [P, C] and boxes [P, 4] -> the k best (patch, class) pairs over all of them
    (scenic's evaluator: `exclusive_classes=False`, no score threshold, no NMS), best first.
    -> (scores [k], labels [k], boxes [k, 4]); fewer when P*C < k."""
    scores = torch.sigmoid(logits.float()).flatten()
    k = min(int(k), scores.numel())
    top, idx = torch.topk(scores, k)
    c = logits.shape[-1]
    return top, idx % c, boxes[idx // c]


def exclusive_detections(logits: torch.Tensor, boxes: torch.Tensor, threshold: float = 0.1):
    """One label per box (the best query), score above `threshold`: transformers'
    `post_process_object_detection` rule, for comparison and interactive use."""
    best, labels = logits.max(dim=-1)
    scores = torch.sigmoid(best)
    keep = scores > threshold
    return scores[keep], labels[keep], boxes[keep]


def boxes_to_image_xywh(boxes_cxcywh: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes in [0, 1] of the padded square (image at the top-left, padded bottom / right) ->
    [x, y, w, h] in the original image's pixels, clipped to the image (scenic `unpad_box`)."""
    from torchvision.ops import box_convert

    side = float(max(height, width))
    xyxy = box_convert(boxes_cxcywh.float(), "cxcywh", "xyxy") * side
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0.0, float(width))
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0.0, float(height))
    return box_convert(xyxy, "xyxy", "xywh")


def resize_with_pad(image: torch.Tensor, size: int, pad_value: float = 0.0) -> torch.Tensor:
    """uint8 or [0, 1] float image [3, H, W] -> float [3, size, size] in [0, 1]: aspect-preserving
    bilinear resize (half-pixel centres, no antialias) so the long side is `size`, then padding at
    the bottom / right with `pad_value` (scenic's evaluator `ResizeWithPad(size, pad_value=0.0)`)."""
    x = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    h, w = x.shape[-2:]
    long = max(h, w)
    nh, nw = (size, w * size // h) if h >= w else (h * size // w, size)
    nh, nw = max(nh, 1), max(nw, 1)
    if (nh, nw) != (h, w) or long != size:
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=False)[0]
    out = x.new_full((3, size, size), float(pad_value))
    out[:, :nh, :nw] = x
    return out
