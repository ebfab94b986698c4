"""OWL-ViT training objective: the matcher equals brute force, costs and losses equal their formulas."""
import itertools
import math

import pytest
import torch

from silc_bench.detection.losses import LossWeights, detection_loss, hungarian_match, match_costs


def _case(seed, p=5, n=3, q=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(p, q, generator=g) * 2
    boxes = torch.cat([torch.rand(p, 2, generator=g) * 0.6 + 0.2, torch.rand(p, 2, generator=g) * 0.3 + 0.05], 1)
    tboxes = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)
    labels = torch.zeros(n, q)
    labels[torch.arange(n), torch.randint(0, q, (n,), generator=g)] = 1
    labels[0, (labels[0].argmax() + 1) % q] = 1  # one multi-label target
    return logits, boxes, labels, tboxes


def _naive_cost(logits, boxes, labels, tboxes, a=0.3, gamma=2.0):
    def xyxy(b):
        cx, cy, w, h = b.tolist()
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    def giou(b1, b2):
        ax1, ay1, ax2, ay2 = xyxy(b1)
        bx1, by1, bx2, by2 = xyxy(b2)
        inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
        union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
        hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
        return inter / union - (hull - union) / hull

    out = torch.zeros(len(logits), len(tboxes), dtype=torch.float64)
    for i in range(len(logits)):
        for j in range(len(tboxes)):
            c = 0.0
            for lab in torch.nonzero(labels[j]).flatten().tolist():
                x = float(logits[i, lab])
                s = 1 / (1 + math.exp(-x))
                c += -math.log(s) * a * (1 - s) ** gamma - (-math.log(1 - s)) * (1 - a) * s ** gamma
            c += float((boxes[i] - tboxes[j]).abs().sum()) - giou(boxes[i], tboxes[j])
            out[i, j] = c
    return out


@pytest.mark.parametrize("seed", range(5))
def test_costs_equal_the_formula(seed):
    logits, boxes, labels, tboxes = _case(seed)
    torch.testing.assert_close(match_costs(logits, boxes, labels, tboxes).double(),
                               _naive_cost(logits, boxes, labels, tboxes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,p,n", [(s, p, n) for s in range(4) for p, n in [(5, 3), (6, 2), (4, 4), (5, 1)]])
def test_matcher_equals_brute_force(seed, p, n):
    cost = match_costs(*_case(seed, p=p, n=n))
    rows, cols = hungarian_match(cost)
    got = float(cost[rows, cols].sum())
    best = min(sum(float(cost[r, c]) for c, r in enumerate(perm)) for perm in itertools.permutations(range(p), n))
    assert got == pytest.approx(best, abs=1e-5)
    assert sorted(cols.tolist()) == list(range(n)) and len(set(rows.tolist())) == n


def test_no_targets_gives_no_matches_and_pure_background_loss():
    logits, boxes, _, _ = _case(0)
    assert hungarian_match(torch.zeros(5, 0))[0].size == 0
    out = detection_loss(logits[None], boxes[None], [{"labels": torch.zeros(0, 4), "boxes": torch.zeros(0, 4)}])
    s = torch.sigmoid(logits)
    want = (-(1 - 0.3) * s ** 2 * torch.log(1 - s)).sum()  # focal loss of all-zero targets, normalised by 1
    assert float(out["class"]) == pytest.approx(float(want), rel=1e-5)
    assert float(out["bbox"]) == 0 and float(out["giou"]) == 0


def test_perfect_boxes_have_zero_box_loss_and_loss_is_the_weighted_sum():
    _, boxes, labels, _ = _case(1)
    logits = torch.zeros(5, 4)  # equal class costs: the boxes alone decide the match
    target = {"labels": labels, "boxes": boxes[[4, 0, 2]].clone()}
    out = detection_loss(logits[None], boxes[None], [target])
    assert float(out["bbox"]) == pytest.approx(0, abs=1e-6) and float(out["giou"]) == pytest.approx(0, abs=1e-6)
    w = LossWeights(class_weight=2.0, bbox_weight=0.5, giou_weight=3.0)
    out2 = detection_loss(logits[None], boxes[None] + 0.01, [target], w)
    assert float(out2["loss"]) == pytest.approx(float(2 * out2["class"] + 0.5 * out2["bbox"] + 3 * out2["giou"]))


def test_losses_train_a_box_towards_its_target():
    torch.manual_seed(0)
    raw = torch.zeros(1, 3, 4, requires_grad=True)
    qlogits = torch.zeros(1, 3, 2, requires_grad=True)
    target = [{"labels": torch.tensor([[0.0, 1.0]]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.1]])}]
    opt = torch.optim.Adam([raw, qlogits], lr=0.1)
    for _ in range(200):
        loss = detection_loss(qlogits, torch.sigmoid(raw), target)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    boxes, probs = torch.sigmoid(raw.detach())[0], torch.sigmoid(qlogits.detach())[0]
    best = int(probs[:, 1].argmax())
    torch.testing.assert_close(boxes[best], target[0]["boxes"][0], atol=0.02, rtol=0)
    assert float(probs[best, 1]) > 0.5 > float(probs[best, 0])
