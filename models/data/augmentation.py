"""Augmentation of training batches on the device: geometry, intensity, blur and noise, plus the
domain-generalisation transforms (lower resolution, another site's contrast, burnt-in marks) and
random erasing. Radiographs are not flipped by default: anatomy is asymmetric.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Radiograph augmentation; no horizontal flip by default (anatomy is asymmetric)."""

    rotation_deg: float = 8.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.06
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random-resized-crop area fraction
    brightness: float = 0.15
    contrast: float = 0.25
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_prob: float = 0.2
    noise_std: float = 0.03
    erase_prob: float = 0.5  # random erasing: defeats burnt-in letters, arrows and borders
    erase_area: tuple[float, float] = (0.02, 0.15)
    hflip_prob: float = 0.0
    # Domain generalisation: what differs between hospitals, simulated so no site's look is learnt.
    lowres_prob: float = 0.0  # down-sample to a random side in [lowres_min, size] px and back up
    lowres_min: int = 64
    equalize_prob: float = 0.0  # histogram equalisation (another site's contrast rendering)
    overlay_prob: float = 0.0  # burnt-in marks: text, an arrow, a border or a ruler

    @classmethod
    def from_dict(cls, values: dict) -> AugmentConfig:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**fields)


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def augment(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment a batch (N, 1, H, W) in [0, 1] with per-image random parameters; returns [0, 1]."""
    n, _, height, width = batch.shape
    device = batch.device
    # Geometry: one affine warp combines rotation, scale, shift and a random-resized crop.
    angle = _uniform(n, -config.rotation_deg, config.rotation_deg, generator, device) * math.pi / 180
    crop = _uniform(n, *config.crop_scale, generator, device).sqrt()
    zoom = _uniform(n, *config.scale, generator, device)
    extent = crop / zoom  # fraction of the image the output window covers
    max_shift = (1 - crop).clamp(min=0) + config.shift
    tx = _uniform(n, -1, 1, generator, device) * max_shift
    ty = _uniform(n, -1, 1, generator, device) * max_shift
    cos, sin = torch.cos(angle) * extent, torch.sin(angle) * extent
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    if config.hflip_prob > 0:
        flip = torch.rand(n, generator=generator, device=device) < config.hflip_prob
        theta[flip, :, 0] *= -1
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Intensity: gamma, contrast around the mean, brightness.
    gamma = torch.exp(_uniform(n, math.log(config.gamma[0]), math.log(config.gamma[1]), generator, device))
    out = out.clamp(0, 1) ** gamma.view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator, device).view(n, 1, 1, 1)
    brightness = _uniform(n, -config.brightness, config.brightness, generator, device).view(n, 1, 1, 1)
    out = (out - mean) * contrast + mean + brightness

    if config.blur_prob > 0:
        blurred = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        pick = (torch.rand(n, generator=generator, device=device) < config.blur_prob).view(n, 1, 1, 1)
        out = torch.where(pick, blurred, out)
    if config.noise_std > 0:
        sigma = _uniform(n, 0, config.noise_std, generator, device).view(n, 1, 1, 1)
        out = out + torch.randn(out.shape, generator=generator, device=device) * sigma
    if config.lowres_prob > 0:
        out = _degrade_resolution(out, config, generator)
    if config.equalize_prob > 0:
        pick = torch.rand(n, generator=generator, device=device) < config.equalize_prob
        out = torch.where(pick.view(n, 1, 1, 1), equalize_batch(out.clamp(0, 1)), out)
    if config.overlay_prob > 0:
        out = _overlay_marks(out, config.overlay_prob, generator)
    if config.erase_prob > 0:
        out = _random_erase(out, config, generator)
    return out.clamp(0, 1)


def _degrade_resolution(
    batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Down-sample picked images to a random side (area) and back up (bilinear): a 64 px archive,
    a thumbnail-sized export or a soft detector look like this at the model's input size."""
    n, _, height, width = batch.shape
    device = batch.device
    low = min(config.lowres_min, height)
    picks = torch.rand(n, generator=generator, device=device) < config.lowres_prob
    sides = torch.randint(low, height + 1, (n,), generator=generator, device=device)
    out = batch.clone()
    side_of = sides.tolist()  # one device sync, not one per picked image
    for i in torch.nonzero(picks).flatten().tolist():
        side = side_of[i]
        if side >= height:
            continue
        small = F.interpolate(batch[i : i + 1], size=(side, max(1, side * width // height)), mode="area")
        out[i : i + 1] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return out


def equalize_batch(batch: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Histogram equalisation of each image of (N, 1, H, W) in [0, 1] over its non-zero pixels: the
    same map as :func:`models.imaging.prepare.equalize_histogram`, batched."""
    n = batch.shape[0]
    flat = batch.reshape(n, -1)
    inside = flat > 0
    position = flat * bins
    index = position.long().clamp(max=bins - 1)
    offsets = torch.arange(n, device=batch.device).unsqueeze(1) * bins
    counts = torch.bincount((offsets + index)[inside], minlength=n * bins).view(n, bins).float()
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)
    below = share.cumsum(1) - share
    mapped = below.gather(1, index) + (position - index) * share.gather(1, index)
    return torch.where(inside, mapped, torch.zeros_like(flat)).view_as(batch)


#: uniform draws one burnt-in mark may use (a border uses the most: 8 with its colour)
_OVERLAY_DRAWS = 10


def _overlay_marks(batch: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Burn one mark into each picked image, white or black: a block of glyph-like text in a corner
    band, an arrow, a border on one to four sides, or a ruler with ticks along an edge. Sites and
    paper figures carry such marks; a model must not learn them as identity."""
    n, _, height, width = batch.shape
    device = batch.device

    ys = torch.linspace(0, 1, height, device=device).view(height, 1)
    xs = torch.linspace(0, 1, width, device=device).view(1, width)
    out = batch.clone()
    picks = torch.nonzero(torch.rand(n, generator=generator, device=device) < prob).flatten().tolist()
    # Every scalar a mark needs is drawn in one call and read on the host: one device sync per batch,
    # not one per draw (on a GPU, per-draw syncs made this loop the slowest part of a training step).
    draws = torch.rand(len(picks), _OVERLAY_DRAWS, generator=generator, device=device).tolist()
    for i, row in zip(picks, draws, strict=True):
        stream = iter(row)

        def uniform(low: float, high: float, stream: Iterator[float] = stream) -> float:
            return next(stream) * (high - low) + low

        kind = min(3, int(uniform(0, 4)))
        if kind == 0:  # text: a random glyph grid in a box near an edge
            rows, chars = 5, int(uniform(2, 9))
            glyphs = (torch.rand(1, 1, rows, 4 * chars, generator=generator, device=device) < 0.45).float()
            glyphs[..., 3::4] = 0  # a blank column between characters
            box_h = max(3, int(height * uniform(0.04, 0.09)))
            box_w = min(width - 1, max(4, int(box_h * chars * 0.8)))
            top = int(uniform(0, height - box_h)) if uniform(0, 1) < 0.3 else int(uniform(0, 0.12) * height)
            left = int(uniform(0, width - box_w))
            mask = torch.zeros(height, width, dtype=torch.bool, device=device)
            patch = F.interpolate(glyphs, size=(box_h, box_w), mode="nearest")[0, 0] > 0.5
            mask[top : top + box_h, left : left + box_w] = patch
        elif kind == 1:  # arrow: a shaft and a head, 10-30% of the image long
            x0, y0 = uniform(0.1, 0.9), uniform(0.1, 0.9)
            angle, length = uniform(0, 2 * math.pi), uniform(0.1, 0.3)
            dx, dy = math.cos(angle) * length, math.sin(angle) * length
            t = (((xs - x0) * dx + (ys - y0) * dy) / (length**2)).clamp(0, 1)
            distance = torch.sqrt((xs - x0 - t * dx) ** 2 + (ys - y0 - t * dy) ** 2)
            head = torch.sqrt((xs - x0 - dx) ** 2 + (ys - y0 - dy) ** 2)
            mask = (distance < uniform(0.004, 0.012)) | (head < length * 0.18) & (t > 0.75)
        elif kind == 2:  # border on 1-4 sides
            band = uniform(0.02, 0.08)
            sides = [uniform(0, 1) < 0.6 for _ in range(4)]
            sides[min(3, int(uniform(0, 4)))] = True
            mask = torch.zeros(height, width, dtype=torch.bool, device=device)
            for side, edge in zip(sides, (ys < band, ys > 1 - band, xs < band, xs > 1 - band), strict=True):
                if side:
                    mask = mask | edge
        else:  # ruler: a line along an edge with ticks every few per cent
            position, spacing = uniform(0.03, 0.12), uniform(0.02, 0.05)
            tick = (torch.remainder(xs, spacing) < spacing * 0.2) & (ys > position) & (ys < position + 0.025)
            line = (ys - position).abs() < 0.004
            mask = tick | line
            if uniform(0, 1) < 0.5:
                mask = mask.flip(0)
        value = 1.0 if uniform(0, 1) < 0.75 else 0.0
        out[i, 0] = torch.where(mask, torch.full_like(out[i, 0], value), out[i, 0])
    return out


def _random_erase(batch: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Blank one random rectangle per picked image (Zhong et al. 2017) with its mean intensity."""
    n, _, height, width = batch.shape
    device = batch.device
    pick = torch.rand(n, generator=generator, device=device) < config.erase_prob
    area = _uniform(n, *config.erase_area, generator, device)
    aspect = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), generator, device))
    h = (area * aspect).sqrt().clamp(max=1.0)
    w = (area / aspect).sqrt().clamp(max=1.0)
    y0 = torch.rand(n, generator=generator, device=device) * (1 - h)
    x0 = torch.rand(n, generator=generator, device=device) * (1 - w)
    ys = torch.linspace(0, 1, height, device=device).view(1, height, 1)
    xs = torch.linspace(0, 1, width, device=device).view(1, 1, width)
    inside = (
        (ys >= y0.view(n, 1, 1))
        & (ys <= (y0 + h).view(n, 1, 1))
        & (xs >= x0.view(n, 1, 1))
        & (xs <= (x0 + w).view(n, 1, 1))
        & pick.view(n, 1, 1)
    ).unsqueeze(1)
    fill = batch.mean(dim=(1, 2, 3), keepdim=True).expand_as(batch)
    return torch.where(inside, fill, batch)
