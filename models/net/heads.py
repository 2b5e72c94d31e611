"""Margin heads: scaled cosine logits with a margin on the target class, for cross-entropy training.

One head covers the family through insightface's combined margin: for the target class the logit is
``s * (cos(m1 * theta + m2) - m3)``, for every other class ``s * cos(theta)``, where ``theta`` is the
angle between the L2-normalised embedding and the L2-normalised class weight.

==============  ====  ====  ====  ====  ============================================
preset          m1    m2    m3    s     source
==============  ====  ====  ====  ====  ============================================
``arcface``     1     0.5   0     64    Deng et al. CVPR 2019 (additive angular)
``cosface``     1     0     0.35  64    Wang et al. CVPR 2018 (additive cosine)
``sphereface``  4     0     0     64    Liu et al. CVPR 2017 (multiplicative angular),
                                        annealed with lambda as in the paper
``combined``    1     0.3   0.2   64    insightface combined margin
==============  ====  ====  ====  ====  ============================================

s = 64 suits large identity sets; use s = 30 for small data (pass ``s=30``). ``sub_centers=K``
gives Sub-center ArcFace (Deng et al. ECCV 2020): K weight vectors per class and the class cosine is
the max over them, so noisy or atypical images (a rotated film, a child's CXR filed under an
adult) can gather on a secondary centre instead of pulling the dominant one.

Written here rather than taken from pytorch-metric-learning: its ArcFace/CosFace/SphereFace classes
are losses (they return the loss, not margin logits), take margins in degrees one class per
formulation, and offer neither one m1/m2/m3 head nor sub-centres together with the theta + m > pi
fallback and SphereFace's lambda annealing; we need the logits themselves for cross-entropy, for a
partial-FC style split of classes, and for analysis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

HEAD_PRESETS: dict[str, dict[str, float]] = {
    "arcface": {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0},
    "cosface": {"s": 64.0, "m1": 1.0, "m2": 0.0, "m3": 0.35},
    "sphereface": {"s": 64.0, "m1": 4.0, "m2": 0.0, "m3": 0.0},
    "combined": {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
}


#: The one margin each preset is known by, as (m1, m2, m3) position; ``combined`` takes all three.
MARGIN_PARAMETER: dict[str, str] = {"arcface": "m2", "cosface": "m3", "sphereface": "m1"}


def head_margins(name: str, margin: float | Sequence[float] | None) -> dict[str, float]:
    """m1, m2, m3 of a head: its preset, with its own margin replaced when one is given.

    ``margin`` is the head's one margin (ArcFace's additive angle m2, CosFace's cosine m3,
    SphereFace's multiplier m1), or ``[m1, m2, m3]`` for ``combined``. Raises ValueError otherwise.
    """
    preset = HEAD_PRESETS.get(name.lower())
    if preset is None:
        raise ValueError(f"unknown head {name!r}; choose from {sorted(HEAD_PRESETS)}")
    margins = {k: preset[k] for k in ("m1", "m2", "m3")}
    if margin is None:
        return margins
    parameter = MARGIN_PARAMETER.get(name.lower())
    if parameter is None:
        if isinstance(margin, int | float) or len(margin) != 3:
            raise ValueError(f"{name} takes its margins as [m1, m2, m3], got {margin!r}")
        return dict(zip(("m1", "m2", "m3"), (float(m) for m in margin), strict=True))
    if not isinstance(margin, int | float) or isinstance(margin, bool):
        raise ValueError(f"{name} takes one margin ({parameter}), got {margin!r}")
    margins[parameter] = float(margin)
    return margins


class CombinedMarginHead(nn.Module):
    """Class weights plus the combined margin: ``forward(embeddings, labels) -> logits (N, num_classes)``.

    Rows whose label is negative (e.g. -1 for "not in this shard of classes") get plain logits.
    With ``labels=None`` the output is ``s * cos(theta)`` for every class (evaluation, analysis).

    SphereFace (``m1 != 1``): the target uses the paper's monotone extension
    ``psi(theta) = (-1)^k cos(m1 * theta + m2) - 2k`` with ``k = floor((m1 * theta + m2) / pi)``, and is
    blended with the plain cosine as ``(lambda * cos + psi) / (1 + lambda)``, where
    ``lambda = max(lambda_min, lambda_base * (1 + lambda_gamma * it) ** -lambda_power)`` decays from
    1000 to 5 over training iterations ``it`` (SphereFace's Caffe defaults). Without the annealing
    a multiplicative margin does not converge. ``it`` counts training-mode forwards with labels and
    is a buffer, so it is saved and restored with the head's state dict.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        sub_centers: int = 1,
        eps: float = 1e-6,
        lambda_base: float = 1000.0,
        lambda_min: float = 5.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
    ) -> None:
        super().__init__()
        if embedding_dim < 1 or num_classes < 1 or sub_centers < 1:
            raise ValueError("embedding_dim, num_classes and sub_centers must be positive")
        if s <= 0:
            raise ValueError(f"scale s must be positive, got {s}")
        if m1 < 1 or m2 < 0 or m3 < 0 or m2 >= math.pi:
            raise ValueError(f"need m1 >= 1, 0 <= m2 < pi, m3 >= 0; got m1={m1}, m2={m2}, m3={m3}")
        if not 0 < eps < 0.1:
            raise ValueError(f"eps must be small and positive, got {eps}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.sub_centers = sub_centers
        self.s, self.m1, self.m2, self.m3, self.eps = float(s), float(m1), float(m2), float(m3), float(eps)
        self.lambda_base, self.lambda_min = float(lambda_base), float(lambda_min)
        self.lambda_gamma, self.lambda_power = float(lambda_gamma), float(lambda_power)
        # Row c * sub_centers + k is sub-centre k of class c.
        self.weight = nn.Parameter(torch.empty(num_classes * sub_centers, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @property
    def annealed(self) -> bool:
        """Whether the SphereFace lambda blend is in use (multiplicative margin only)."""
        return self.m1 != 1.0 and self.lambda_base > 0

    @property
    def current_lambda(self) -> float:
        """SphereFace's lambda at the current iteration; 0 when no annealing applies."""
        if not self.annealed:
            return 0.0
        decayed = self.lambda_base * (1.0 + self.lambda_gamma * int(self.iteration)) ** (-self.lambda_power)
        return max(self.lambda_min, decayed)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine between each embedding and each class (max over its sub-centres), (N, num_classes).

        Computed in float32 whatever the autocast dtype: margins on half-precision cosines near 1
        lose the angle entirely.
        """
        embeddings = F.normalize(embeddings.float(), dim=1)
        weight = F.normalize(self.weight.float(), dim=1)
        cos = F.linear(embeddings, weight)
        if self.sub_centers > 1:
            cos = cos.view(-1, self.num_classes, self.sub_centers).amax(dim=2)
        return cos

    def target_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        """The margin-penalised target "cosine" (before the scale s) for target cosines ``cos``."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            # CosFace needs no angle: stay on the cosine and keep its gradient exact up to +-1.
            return cos - self.m3
        # Clamp away from +-1: d(acos)/dx = -1/sqrt(1 - x^2) is infinite there. At the clamp the
        # gradient is 0 instead of inf/NaN; cosines exactly +-1 only occur for degenerate inputs.
        theta = torch.acos(cos.clamp(-1.0 + self.eps, 1.0 - self.eps))
        phi = self.m1 * theta + self.m2
        if self.m1 == 1.0:
            # ArcFace: cos(theta + m2) stops decreasing once theta + m2 > pi, so a target pushed past
            # pi - m2 would be *rewarded* for moving further away. insightface switches there to
            # cos(theta) - m2 * sin(m2) (its `th = cos(pi - m2)` test and `mm = sin(pi - m2) * m2`
            # penalty): a CosFace-style margin equal to ArcFace's first-order penalty m2 * sin(theta)
            # at the switch point, and still decreasing in theta.
            # The switch steps down by ~m2^2/2 at theta = pi - m2; insightface accepts it and so do we.
            target = torch.where(phi <= math.pi, torch.cos(phi), cos - self.m2 * math.sin(self.m2))
        else:
            # SphereFace's psi: continuous and decreasing on [0, pi] for any m1 >= 1.
            k = torch.floor(phi / math.pi)
            sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
            target = sign * torch.cos(phi) - 2.0 * k
        target = target - self.m3
        if self.annealed:
            lam = self.current_lambda
            target = (lam * cos + target) / (1.0 + lam)
        return target

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        # fp32 even under bf16 autocast: the margin works on angles near 0, where bf16's 8-bit
        # mantissa cannot resolve a cosine (and its scatter would mix dtypes).
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._logits(embeddings.float(), labels)

    def _logits(self, embeddings: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        cos = self.cosine(embeddings)
        if labels is None:
            return self.s * cos
        if labels.shape != (cos.shape[0],):
            raise ValueError(f"labels must have shape ({cos.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.long()
        index = labels.clamp(min=0).unsqueeze(1)
        target = cos.gather(1, index).squeeze(1)
        new_target = torch.where(labels >= 0, self.target_cosine(target), target)
        logits = cos.scatter(1, index, new_target.unsqueeze(1))
        if self.training:
            self.iteration += 1
        return self.s * logits

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, s={self.s}, "
            f"m1={self.m1}, m2={self.m2}, m3={self.m3}, sub_centers={self.sub_centers}"
        )


def build_head(name: str, embedding_dim: int, num_classes: int, **kwargs: float) -> CombinedMarginHead:
    """A margin head from a preset name (arcface | cosface | sphereface | combined).

    ``kwargs`` override the preset: s, m1, m2, m3, sub_centers, eps and the SphereFace lambda_*
    schedule, e.g. ``build_head("arcface", 512, n, s=30, sub_centers=3)``.
    """
    preset = HEAD_PRESETS.get(name.lower())
    if preset is None:
        raise ValueError(f"unknown head {name!r}; choose from {sorted(HEAD_PRESETS)}")
    head = CombinedMarginHead(embedding_dim, num_classes, **{**preset, **kwargs})
    logger.debug("built %s head: %s", name, head.extra_repr())
    return head
