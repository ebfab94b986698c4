"""OWL-ViT's set-prediction training objective: Hungarian matching, focal class loss, L1 + GIoU box loss.

Reference: scenic owl_vit (read for facts; docs/PROTOCOLS_T1_T4_T5.md A.2): matcher cost (losses.py
`compute_cost`, Deformable-DETR style) = focal class cost summed over a target's labels + L1 on
cx cy w h + (-GIoU), each with weight 1; losses (matching_base_models.py) = sigmoid focal loss
(alpha 0.3, gamma 2) over every (prediction, query) pair, L1 on x1 y1 x2 y2 and 1 - GIoU over the
matched pairs, weights 1 / 1 / 1, normalised per image (class loss by its positive labels, box
losses by its boxes) and then averaged over the batch. Unmatched predictions learn "no object"
(all-zero class targets), as scenic's appended padding instance does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss


@dataclass(frozen=True)
class LossWeights:
    focal_alpha: float = 0.3
    focal_gamma: float = 2.0
    class_weight: float = 1.0
    bbox_weight: float = 1.0
    giou_weight: float = 1.0


def match_costs(logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor, target_boxes: torch.Tensor,
                w: LossWeights = LossWeights()) -> torch.Tensor:
    """One image: logits [P, Q], boxes [P, 4] cxcywh, target_labels [N, Q] multi-hot, target_boxes
    [N, 4] cxcywh -> cost [P, N]."""
    prob = torch.sigmoid(logits.float())
    pos = -torch.nn.functional.logsigmoid(logits.float()) * w.focal_alpha * (1 - prob) ** w.focal_gamma
    neg = -torch.nn.functional.logsigmoid(-logits.float()) * (1 - w.focal_alpha) * prob ** w.focal_gamma
    cost_class = (pos - neg) @ target_labels.float().T
    cost_bbox = torch.cdist(boxes.float(), target_boxes.float(), p=1)
    cost_giou = -generalized_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"),
                                     box_convert(target_boxes.float(), "cxcywh", "xyxy"))
    cost = w.class_weight * cost_class + w.bbox_weight * cost_bbox + w.giou_weight * cost_giou
    return torch.nan_to_num(cost, nan=1e6, posinf=1e6, neginf=-1e6)


def hungarian_match(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Cost [P, N] -> (prediction indices, target indices) of the minimum-cost assignment (scipy)."""
    from scipy.optimize import linear_sum_assignment

    if cost.shape[1] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return rows.astype(np.int64), cols.astype(np.int64)


def detection_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict],
                   w: LossWeights = LossWeights()) -> dict:
    """logits [B, P, Q], boxes [B, P, 4] cxcywh; targets per image {"labels": [N, Q] multi-hot,
    "boxes": [N, 4] cxcywh} -> {"loss", "class", "bbox", "giou"} (batch means of per-image losses)."""
    parts = {"class": [], "bbox": [], "giou": []}
    for b, t in enumerate(targets):
        labels, tboxes = t["labels"].to(logits.device).float(), t["boxes"].to(boxes.device).float()
        with torch.no_grad():
            rows, cols = hungarian_match(match_costs(logits[b], boxes[b], labels, tboxes, w))
        rows_t, cols_t = torch.as_tensor(rows, device=logits.device), torch.as_tensor(cols, device=logits.device)
        cls_target = torch.zeros_like(logits[b], dtype=torch.float32)
        cls_target[rows_t] = labels[cols_t]
        n_pos = max(float(labels.sum()), 1.0)
        parts["class"].append(sigmoid_focal_loss(logits[b].float(), cls_target, alpha=w.focal_alpha,
                                                 gamma=w.focal_gamma, reduction="sum") / n_pos)
        n_box = max(len(cols), 1)
        src = box_convert(boxes[b][rows_t].float(), "cxcywh", "xyxy")
        tgt = box_convert(tboxes[cols_t], "cxcywh", "xyxy")
        parts["bbox"].append((src - tgt).abs().sum() / n_box)
        giou = torch.diag(generalized_box_iou(src, tgt)) if len(cols) else src.new_zeros(0)
        parts["giou"].append((1 - giou).sum() / n_box)
    out = {k: torch.stack(v).mean() for k, v in parts.items()}
    out["loss"] = w.class_weight * out["class"] + w.bbox_weight * out["bbox"] + w.giou_weight * out["giou"]
    return out
