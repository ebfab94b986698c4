"""Multi-crop views for SILC: 2 global views (0.4-1.0 of the area) and 8 local views (0.05-0.4).

Crop boxes are drawn per sample from a generator seeded with (seed, sample position), where the
position is the sample's place in the stream of training examples (step * global_batch + i). The
views of a sample therefore do not depend on the process that loads it, the batch it sits in, or
whether the run was resumed.

Boxes follow torchvision's RandomResizedCrop: area fraction uniform in `scale`, log aspect ratio
uniform in log(`ratio`), the first of 10 draws that fits the image, else the whole image. Unlike
torchvision, box corners are not rounded to whole pixels. All crops of a batch are cut and resized
in one call to `roi_align` (bilinear sampling averaged over ceil(box / output) points per output
pixel, an area-style anti-aliasing when downscaling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

_TRIES = 10


@dataclass(frozen=True)
class MultiCropConfig:
    global_size: int = 256
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False  # the SILC paper names only crops; DINO also flips

    @classmethod
    def from_dict(cls, d: dict | None) -> "MultiCropConfig":
        d = dict(d or {})
        for k in ("global_scale", "local_scale", "ratio"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


def _draw_boxes(rng: np.random.Generator, n: int, scale, ratio, h: int, w: int) -> np.ndarray:
    """[n, 5] rows (x0, y0, x1, y1, flip) in pixel-edge coordinates."""
    area = h * w * rng.uniform(scale[0], scale[1], size=(n, _TRIES))
    log_r = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, _TRIES))
    bw, bh = np.sqrt(area * np.exp(log_r)), np.sqrt(area / np.exp(log_r))
    fits = (bw <= w) & (bh <= h)
    first = fits.argmax(1)
    rows = np.arange(n)
    bw = np.where(fits.any(1), bw[rows, first], w)
    bh = np.where(fits.any(1), bh[rows, first], h)
    u, v, f = rng.uniform(size=(3, n))
    x0, y0 = u * (w - bw), v * (h - bh)
    return np.stack([x0, y0, x0 + bw, y0 + bh, f < 0.5], 1)


def crop_boxes(seed: int, positions, cfg: MultiCropConfig, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Global boxes [B, n_global, 5] and local boxes [B, n_local, 5] for samples at `positions`."""
    glob, loc = [], []
    for pos in positions:
        rng = np.random.default_rng([int(seed), int(pos)])
        glob.append(_draw_boxes(rng, cfg.n_global, cfg.global_scale, cfg.ratio, h, w))
        loc.append(_draw_boxes(rng, cfg.n_local, cfg.local_scale, cfg.ratio, h, w))
    return np.stack(glob), np.stack(loc)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (big_vision's value_range(-1, 1))."""
    return images.float() / 127.5 - 1.0


def cut(images: torch.Tensor, boxes: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """images [B, 3, H, W] float, boxes [B, V, 5] -> views [V, B, 3, size, size]."""
    b, v = boxes.shape[:2]
    t = torch.as_tensor(boxes, dtype=torch.float32, device=images.device)
    idx = torch.arange(b, device=images.device, dtype=torch.float32).repeat_interleave(v)
    rois = torch.cat([idx[:, None], t[..., :4].reshape(b * v, 4)], 1)
    out = roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if flip:
        do = t[..., 4].reshape(b * v).bool()
        out = torch.where(do[:, None, None, None], out.flip(-1), out)
    return out.reshape(b, v, *out.shape[1:]).transpose(0, 1)


def full_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """The whole image resized to size x size (the CLIP / SigLIP input, no crop)."""
    x = to_model_range(images)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def multicrop(images: torch.Tensor, positions, seed: int, cfg: MultiCropConfig) -> dict[str, torch.Tensor]:
    """uint8 images [B, 3, H, W] -> {"global": [n_global, B, 3, G, G], "local": [n_local, B, 3, L, L]} in [-1, 1]."""
    h, w = images.shape[-2:]
    gb, lb = crop_boxes(seed, positions, cfg, h, w)
    x = to_model_range(images)
    out = {"global": cut(x, gb, cfg.global_size, cfg.flip)}
    out["local"] = cut(x, lb, cfg.local_size, cfg.flip) if cfg.n_local else x.new_zeros(0, *x.shape[:2], cfg.local_size, cfg.local_size)
    return out
