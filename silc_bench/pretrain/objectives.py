"""Pretraining objectives: CLIP softmax, SigLIP sigmoid, SILC self-distillation, centring, EMA.

The losses are plain functions of tensors, so tests can compare them with open_clip and with
formulas written out by hand.

Distributed convention. A process passes its *local* embeddings plus the *gathered* global batch
(all_gather with gradients). It returns its share of the loss, and the mean of the shares over the
processes is the global-batch loss. Why this gives the global-batch gradient: the backward of
all_gather sums the gradients that every process sends to a shard, and DDP averages the parameter
gradients over processes. With one process every function is the plain global-batch loss.

Self-distillation (SILC section 3, after DINO): the teacher sees the global views and the student
sees the local views. We average the cross-entropy over every (teacher global view, student local
view) pair, 2 x 8 = 16 pairs in the paper setting, with equal weight, and over the samples. The
student's own global views are not distilled (the paper distils local to global only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from silc_bench.pretrain.settings import DistillSettings, PretrainSettings

# The paper's values, as the pretraining defaults state them (settings.py).
TEACHER_TEMP = DistillSettings.teacher_temp
STUDENT_TEMP = DistillSettings.student_temp
CENTER_MOMENTUM = DistillSettings.center_momentum
EMA_MOMENTUM = PretrainSettings.ema_momentum


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """big_vision's normalisation, x / (|x| + 1e-8), so training matches the exported model's logits."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-8)


def clip_loss(img, txt, t, *, all_img=None, all_txt=None, offset: int = 0) -> torch.Tensor:
    """Symmetric InfoNCE with logit scale exp(t).

    img, txt: [n, D] L2-normalised local embeddings (pair i is (img[i], txt[i])).
    all_img, all_txt: [N, D] the gathered global batch (default: the local batch).
    offset: position of the local row 0 in the global batch.
    Returns the mean over local rows of (CE(image -> texts) + CE(text -> images)) / 2.
    """
    all_img = img if all_img is None else all_img
    all_txt = txt if all_txt is None else all_txt
    scale = t.exp()
    labels = torch.arange(img.shape[0], device=img.device) + offset
    loss_i2t = F.cross_entropy(scale * img @ all_txt.T, labels)
    loss_t2i = F.cross_entropy(scale * txt @ all_img.T, labels)
    return (loss_i2t + loss_t2i) / 2


def siglip_loss(img, txt, t, b, *, all_txt=None, offset: int = 0) -> torch.Tensor:
    """SigLIP sigmoid loss: -1/n sum_i sum_j log sigmoid(z_ij (exp(t) <img_i, txt_j> + b)).

    z_ij = +1 for the matching pair, -1 otherwise; i runs over the n local images and j over the
    global batch of texts. Normalised by the batch size as in the SigLIP paper (the shares of all
    processes average to 1/N times the sum over all N x N pairs).
    """
    all_txt = txt if all_txt is None else all_txt
    logits = t.exp() * img @ all_txt.T + b
    n = img.shape[0]
    signs = -torch.ones_like(logits)
    rows = torch.arange(n, device=img.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n


def distill_loss(student_out, teacher_out, center, *, student_temp: float = STUDENT_TEMP,
                 teacher_temp: float = TEACHER_TEMP) -> torch.Tensor:
    """Mean over (teacher view, student view) pairs and samples of -sum_k P_t[k] log P_s[k].

    student_out: [Vs, n, K] head outputs of the student on the local views.
    teacher_out: [Vt, n, K] head outputs of the teacher on the global views (no gradient).
    center: [K]. P_t = softmax((p_t - c) / teacher_temp), P_s = softmax(p_s / student_temp).
    The cross-entropy is bilinear in (P_t, log P_s), so the mean over all Vt x Vs pairs equals the
    cross-entropy of the view-averaged P_t with the view-averaged log P_s (one product, not 16).
    """
    p_t = F.softmax((teacher_out.float() - center) / teacher_temp, dim=-1).detach()
    log_p_s = F.log_softmax(student_out.float() / student_temp, dim=-1)
    return -(p_t.mean(0) * log_p_s.mean(0)).sum(-1).mean()


@torch.no_grad()
def updated_center(center, teacher_out, momentum: float = CENTER_MOMENTUM) -> torch.Tensor:
    """c <- m c + (1 - m) mean(teacher outputs), the mean taken over all views, samples and processes."""
    flat = teacher_out.detach().float().reshape(-1, teacher_out.shape[-1])
    total = flat.sum(0)
    count = torch.tensor(float(flat.shape[0]), device=flat.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return center * momentum + (total / count) * (1 - momentum)


@torch.no_grad()
def ema_update(teacher_params, student_params, momentum: float = EMA_MOMENTUM) -> None:
    """teacher <- m teacher + (1 - m) student, in place, with a fixed momentum (SILC: no schedule)."""
    teacher_params, student_params = list(teacher_params), list(student_params)
    if len(teacher_params) != len(student_params):
        raise ValueError(f"EMA: {len(teacher_params)} teacher vs {len(student_params)} student tensors")
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


class DistillHead(nn.Module):
    """DINO-style projection head (as in DINO's `DINOHead` with norm_last_layer=True).

    MLP of `layers` linear layers with GELU (dim -> hidden -> ... -> bottleneck), L2 normalisation,
    then a bias-free linear layer to K outputs whose rows are normalised to unit length (weight
    normalisation with the gain fixed at 1). Paper: K = 65536; DINO: hidden 2048, bottleneck 256.
    Init as DINO: truncated normal (std 0.02) MLP weights, zero biases.
    """

    def __init__(self, dim: int, out_dim: int = DistillSettings.out_dim, hidden: int = DistillSettings.hidden,
                 bottleneck: int = DistillSettings.bottleneck, layers: int = DistillSettings.layers):
        super().__init__()
        sizes = [dim] + [hidden] * (layers - 1) + [bottleneck]
        blocks = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            blocks.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        self.last = nn.Linear(bottleneck, out_dim, bias=False)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x).float(), dim=-1)
        # Outputs in float32 even under autocast: the teacher softmax at T=0.04 magnifies rounding
        # (bf16 cosines are only good to ~4e-3, i.e. 0.1 in logit units).
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, F.normalize(self.last.weight.float(), dim=-1))
