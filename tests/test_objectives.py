"""Pretraining objectives against open_clip and against the formulas written out here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from silc_bench.pretrain import objectives as obj
from silc_bench.pretrain.multicrop import MultiCropConfig, crop_boxes, multicrop
from silc_bench.pretrain.schedule import rsqrt_lr

open_clip_loss = pytest.importorskip("open_clip.loss")


def _embeddings(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_clip_loss_equals_open_clip():
    img, txt = _embeddings()
    t = torch.tensor(math.log(14.0), dtype=torch.float64)
    ours = obj.clip_loss(img, txt, t)
    ref = open_clip_loss.ClipLoss()(img, txt, t.exp())
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_siglip_loss_equals_open_clip():
    img, txt = _embeddings(seed=1)
    t, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ours = obj.siglip_loss(img, txt, t, b)
    ref = open_clip_loss.SigLipLoss()(img, txt, t.exp(), b)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_shards_average_to_global_batch_loss(kind):
    """What each process computes from its rows and the gathered batch averages to the global loss."""
    img, txt = _embeddings(n=12, seed=2)
    t, b = torch.tensor(2.3, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    if kind == "clip":
        whole = obj.clip_loss(img, txt, t)
        shares = [obj.clip_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], t, all_img=img, all_txt=txt,
                                offset=r * 4) for r in range(3)]
    else:
        whole = obj.siglip_loss(img, txt, t, b)
        shares = [obj.siglip_loss(img[r * 4:(r + 1) * 4], txt[r * 4:(r + 1) * 4], t, b, all_txt=txt, offset=r * 4)
                  for r in range(3)]
    torch.testing.assert_close(torch.stack(shares).mean(), whole, rtol=1e-12, atol=1e-12)


def test_distill_loss_equals_pairwise_formula():
    g = torch.Generator().manual_seed(3)
    vt, vs, n, k = 2, 8, 5, 32
    teacher = torch.randn(vt, n, k, generator=g, dtype=torch.float64)
    student = torch.randn(vs, n, k, generator=g, dtype=torch.float64)
    center = torch.randn(k, generator=g, dtype=torch.float64) * 0.1
    ours = obj.distill_loss(student, teacher, center)
    terms = []
    for a in range(vt):
        for s in range(vs):
            for i in range(n):
                zt = (teacher[a, i] - center) / 0.04
                pt = torch.exp(zt - zt.max()) / torch.exp(zt - zt.max()).sum()
                zs = student[s, i] / 0.1
                log_ps = zs - (zs.max() + torch.log(torch.exp(zs - zs.max()).sum()))
                terms.append(-(pt * log_ps).sum())
    torch.testing.assert_close(ours.double(), torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)


def test_distill_loss_has_no_teacher_gradient():
    teacher = torch.randn(2, 3, 8, requires_grad=True)
    student = torch.randn(4, 3, 8, requires_grad=True)
    obj.distill_loss(student, teacher, torch.zeros(8)).backward()
    assert teacher.grad is None and student.grad is not None


def test_center_update_formula():
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(2, 6, 10, generator=g)
    center = torch.randn(10, generator=g)
    expected = 0.9 * center + 0.1 * torch.stack([teacher[v, i] for v in range(2) for i in range(6)]).mean(0)
    torch.testing.assert_close(obj.updated_center(center, teacher), expected, rtol=1e-6, atol=1e-6)


def test_ema_update_formula():
    g = torch.Generator().manual_seed(5)
    teacher = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g)]
    student = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g)]
    expected = [0.966 * a + (1 - 0.966) * b for a, b in zip(teacher, student)]
    obj.ema_update(teacher, student)
    for got, want in zip(teacher, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_distill_head_rows_are_unit_norm():
    head = obj.DistillHead(16, out_dim=64, hidden=32, bottleneck=8)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 64)
    # outputs are cosines between a unit bottleneck vector and unit prototypes
    assert out.abs().max() <= 1 + 1e-5


def test_rsqrt_schedule_matches_big_vision_formula():
    kw = dict(total_steps=100, base=1e-3, warmup_steps=10, cooldown_steps=20)
    assert rsqrt_lr(0, **kw) == 0.0
    assert math.isclose(rsqrt_lr(5, **kw), 1e-3 * 0.5)
    assert math.isclose(rsqrt_lr(10, **kw), 1e-3)
    assert math.isclose(rsqrt_lr(50, **kw), 1e-3 / math.sqrt(1 + 40 / 10))
    assert math.isclose(rsqrt_lr(90, **kw), 1e-3 / math.sqrt(1 + 80 / 10) * 10 / 20)
    assert rsqrt_lr(100, **kw) == 0.0


def test_multicrop_is_per_sample_deterministic():
    cfg = MultiCropConfig(global_size=32, local_size=16)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    whole = multicrop(images, range(100, 106), 7, cfg)
    part = multicrop(images[3:], range(103, 106), 7, cfg)
    assert whole["global"].shape == (2, 6, 3, 32, 32) and whole["local"].shape == (8, 6, 3, 16, 16)
    torch.testing.assert_close(whole["global"][:, 3:], part["global"], rtol=0, atol=0)
    torch.testing.assert_close(whole["local"][:, 3:], part["local"], rtol=0, atol=0)
    gb, lb = crop_boxes(7, range(500), cfg, 40, 40)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) / 1600  # noqa: E731
    assert 0.4 - 1e-9 <= area(gb).min() and area(gb).max() <= 1.0 + 1e-9
    assert 0.05 - 1e-9 <= area(lb).min() and area(lb).max() <= 0.4 + 1e-9
    assert np.all(gb[..., :2] >= 0) and np.all(gb[..., 2] <= 40) and np.all(gb[..., 3] <= 40)


def test_multicrop_full_box_is_identity():
    from silc_bench.pretrain.multicrop import cut, to_model_range

    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    boxes = np.array([[[0, 0, 24, 24, 0]]] * 2, dtype=float)
    torch.testing.assert_close(cut(to_model_range(images), boxes, 24, False)[0], to_model_range(images))
