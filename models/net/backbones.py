"""The ResNet family that turns a radiograph into an identity embedding.

One readable implementation of the residual networks used for face and CXR identity work, written
from the papers and the original code rather than copied from a port (the seed notes found pSp's
ResNet copied from TreB1eN's ArcFace port, which departs from ArcFace without saying why). Layout
follows torchvision's ``resnet.py``: block classes, ``_make_layer``, and a depth table per variant.

=========  ====================================================  ==================  ======================
variant    residual unit                                          depths (units)      source
=========  ====================================================  ==================  ======================
``ir``     BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, no act after   18 [2,2,2,2]        ArcFace, Deng et al.
           the sum; stride on the 2nd conv                        34 [3,4,6,3]        CVPR 2019, MXNet
                                                                  50 [3,4,14,3]       ``residual_unit_v3``
                                                                  100 [3,13,30,3]
``ir_se``  ``ir`` + squeeze-excitation (r=16) after the last BN   as ``ir``           pSp (Richardson et al.
                                                                                      2021) / TreB1eN IR-SE
``sphere`` stage = conv3x3(stride)+PReLU, then units of           4 [0,0,0,0]         SphereFace, Liu et al.
           2 x (conv3x3+PReLU); no BatchNorm anywhere in the body 20 [1,2,4,1]        CVPR 2017, Table 2
           (``output="fc"``: none in the output layer either)     36 [2,4,8,2]
                                                                  64 [3,8,16,3]
``resnet`` conv-BN-ReLU post-activation; basic block (2 x 3x3)    18 [2,2,2,2] basic  He et al. CVPR 2016,
           for 18/34, bottleneck (1x1-3x3-1x1, x4) for 50/101,    34 [3,4,6,3] basic  torchvision "v1.5"
           stride on the 3x3                                      50 [3,4,6,3] bneck
                                                                  101 [3,4,23,3] bneck
=========  ====================================================  ==================  ======================

Shared by all variants:

- Shortcuts: identity when shape is kept; conv1x1(stride)+BN when the unit strides or changes
  channels (ArcFace's MXNet original and torchvision). ``downsample_shortcut="subsample"`` gives
  TreB1eN's ``MaxPool2d(1, stride)`` where only the resolution changes (the first unit after the
  ``face`` stem). ``improved_shortcut=True`` (Duta et al. 2020, arXiv 2004.04989) replaces the
  strided 1x1 conv by MaxPool3x3(stride) -> conv1x1 -> BN and the 1x1 subsampling by
  MaxPool3x3(stride), so a downsampling shortcut looks at every activation instead of one in four.
  ``sphere`` has no projection shortcuts, so the option is refused there.
- Stems: ``face`` is ArcFace's stride-1 conv3x3-BN-PReLU for 112 px crops, followed by four strided
  stages (112 px -> 7x7). ``cxr`` is a stride-4 stem (two conv3x3 stride 2, each BN + activation)
  followed by an unstrided first stage, as in torchvision (128 px -> 4x4, 512 px -> 16x16).
- Output layer (ArcFace's "E" block): adaptive average pooling to ``pool_size`` x ``pool_size``, then
  BN2d -> Dropout -> flatten -> FC -> BN1d to the embedding. The embedding is *not* L2-normalised
  here; the margin heads and the Embedder normalise it.
- Width: stages have ``width`` x [1, 2, 4, 8] channels (bottleneck outputs x 4 more).

Why one module of this size: the whole family written out in one readable file, as torchvision's
``resnet.py`` does, so that the variants can be compared line by line.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

STEMS = ("cxr", "face")
DOWNSAMPLE_SHORTCUTS = ("conv", "subsample")
OUTPUTS = ("bn", "fc")


@dataclass
class BackboneConfig:
    """Architecture of an embedding backbone; stored in checkpoints via ``to_dict``.

    variant: ``ir`` | ``ir_se`` | ``sphere`` | ``resnet`` (see the module docstring).
    depth: ir / ir_se: 18 | 34 | 50 | 100; resnet: 18 | 34 | 50 | 101; sphere: 20 | 36 | 64.
    width: channels of the first stage; stages are width x [1, 2, 4, 8].
    embedding_dim: size of the output embedding.
    stem: ``cxr`` (stride 4, for 128-512 px) or ``face`` (stride 1, ArcFace's for 112 px).
    improved_shortcut: Duta et al. 2020 max-pool projection shortcuts (not for ``sphere``).
    dropout: dropout probability before the FC of the output layer.
    in_channels: image channels (1 for radiographs).
    pool_size: side of the grid the final feature map is average-pooled to before the FC, so any
        input size works; 7 with the face stem at 112 px reproduces ArcFace's 7x7 map exactly.
    zero_init_residual: start the last BN of every residual branch at gamma 0, so each block begins
        as its shortcut (Goyal et al. 2017); no effect on ``sphere``, which has no BN.
    downsample_shortcut: the shortcut of a unit that strides without changing channels (the first
        unit after the ``face`` stem): ``conv`` = conv1x1(stride)+BN, ArcFace's MXNet original (and
        torchvision's); ``subsample`` = MaxPool2d(1, stride), TreB1eN's port (its issue #37).
    output: ``bn`` = ArcFace's BN2d-Dropout-FC-BN1d; ``fc`` = SphereFace's plain FC (no BN), for
        the BN-free ``sphere`` nets.
    """

    variant: str = "ir"
    depth: int = 18
    width: int = 64
    embedding_dim: int = 512
    stem: str = "cxr"
    improved_shortcut: bool = False
    dropout: float = 0.0
    in_channels: int = 1
    pool_size: int = 4
    zero_init_residual: bool = False
    downsample_shortcut: str = "conv"
    output: str = "bn"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown backbone variant {self.variant!r}; choose from {sorted(VARIANTS)}")
        depths = VARIANTS[self.variant].depths
        if self.depth not in depths:
            raise ValueError(
                f"variant {self.variant!r} has no depth {self.depth}; choose from {sorted(depths)}"
            )
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; choose from {list(STEMS)}")
        if self.downsample_shortcut not in DOWNSAMPLE_SHORTCUTS:
            raise ValueError(
                f"unknown downsample_shortcut {self.downsample_shortcut!r}; "
                f"choose from {list(DOWNSAMPLE_SHORTCUTS)}"
            )
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown output {self.output!r}; choose from {list(OUTPUTS)}")
        if self.improved_shortcut and not VARIANTS[self.variant].has_projection_shortcuts:
            raise ValueError(f"variant {self.variant!r} has no projection shortcuts to improve")
        for name in ("width", "embedding_dim", "in_channels", "pool_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneConfig:
        """Rebuild a config; missing keys take defaults, unknown keys are an error (likely a typo)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BackboneConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(d))


# --------------------------------------------------------------------------------------------------
# Building blocks


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def make_shortcut(
    in_channels: int, out_channels: int, stride: int, improved: bool, downsample: str = "conv"
) -> nn.Module:
    """The shortcut branch of a residual block.

    Identity when the shape is kept; conv1x1(stride)+BN when channels change. A unit that strides
    without changing channels (the first after the ``face`` stem) gets conv1x1(stride)+BN by
    default, as ArcFace's MXNet ``residual_unit_v3`` (``dim_match=False`` on every stage's first
    unit) and torchvision do; ``downsample="subsample"`` gives TreB1eN's ``MaxPool2d(1, stride)``
    instead, the departure the seed notes trace to its issue #37 (kept as a named option to
    measure). With ``improved`` (Duta et al. 2020) downsampling goes through MaxPool3x3 first, so
    no activation is skipped.
    """
    if in_channels == out_channels and stride == 1:
        return nn.Identity()
    if improved:
        if in_channels == out_channels:
            return nn.MaxPool2d(3, stride, padding=1)
        pool: list[nn.Module] = [nn.MaxPool2d(3, stride, padding=1)] if stride > 1 else []
        return nn.Sequential(*pool, conv1x1(in_channels, out_channels), nn.BatchNorm2d(out_channels))
    if in_channels == out_channels and downsample == "subsample":
        return nn.MaxPool2d(1, stride)
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class SEModule(nn.Module):
    """Squeeze-excitation (Hu et al. 2018) as in pSp/TreB1eN: global pool -> 1x1 -> ReLU -> 1x1 -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class IRBlock(nn.Module):
    """ArcFace's improved residual unit: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, no activation after the sum.

    This is the order of the original MXNet ``residual_unit_v3``. TreB1eN's port (and pSp, which
    copied it) drops the BN between the first conv and the PReLU; we keep the original.
    """

    expansion = 1
    se_reduction: int | None = None

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        improved_shortcut: bool = False,
        downsample: str = "conv",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_channels),
            conv3x3(in_channels, planes),
            nn.BatchNorm2d(planes),
            nn.PReLU(planes),
            conv3x3(planes, planes, stride),
            nn.BatchNorm2d(planes),
        ]
        if self.se_reduction is not None:
            layers.append(SEModule(planes, self.se_reduction))
        self.residual = nn.Sequential(*layers)
        self.shortcut = make_shortcut(in_channels, planes, stride, improved_shortcut, downsample)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.residual[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class IRSEBlock(IRBlock):
    """IR unit with squeeze-excitation after the last BN of the residual branch (pSp's IR-SE)."""

    se_reduction = 16


class SphereBlock(nn.Module):
    """SphereFace residual unit, optionally preceded by its stage's strided conv (Table 2, 1704.08063).

    A stage opens with conv3x3(stride)+PReLU that changes channels/resolution; here the first block
    of a stage carries it (``transition``), so stages are built like any other variant's. The
    residual is x + PReLU(conv(PReLU(conv(x)))), with conv biases and no BatchNorm at all.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        improved_shortcut: bool = False,
        downsample: str = "conv",
    ) -> None:
        super().__init__()
        if improved_shortcut:
            raise ValueError("SphereFace units have identity shortcuts only")
        self.transition: nn.Module = (
            SphereTransition(in_channels, planes, stride)
            if stride != 1 or in_channels != planes
            else nn.Identity()
        )
        self.residual = nn.Sequential(
            conv3x3(planes, planes, bias=True),
            nn.PReLU(planes),
            conv3x3(planes, planes, bias=True),
            nn.PReLU(planes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transition(x)
        return x + self.residual(x)


class SphereTransition(nn.Sequential):
    """A SphereFace stage's opening conv3x3(stride)+PReLU on its own: the 4-layer net of Table 2 is
    four of these and nothing else."""

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__(conv3x3(in_channels, planes, stride, bias=True), nn.PReLU(planes))


class _PostActivationBlock(nn.Module):
    """The classic ResNet wiring shared by BasicBlock and Bottleneck: ReLU(residual(x) + shortcut(x)).

    Subclasses build the residual branch (ending in its last BN) and the shortcut and pass them in,
    residual first, so modules are created, initialised and named as before.
    """

    def __init__(self, residual: nn.Sequential, shortcut: nn.Module) -> None:
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut
        self.act = nn.ReLU(inplace=True)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.residual[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.residual(x) + self.shortcut(x))


class BasicBlock(_PostActivationBlock):
    """Classic ResNet basic block (torchvision): conv3x3(stride)-BN-ReLU-conv3x3-BN, sum, ReLU."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        improved_shortcut: bool = False,
        downsample: str = "conv",
    ) -> None:
        super().__init__(
            nn.Sequential(
                conv3x3(in_channels, planes, stride),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                conv3x3(planes, planes),
                nn.BatchNorm2d(planes),
            ),
            make_shortcut(in_channels, planes, stride, improved_shortcut, downsample),
        )


class Bottleneck(_PostActivationBlock):
    """Classic ResNet bottleneck, stride on the 3x3 (torchvision "v1.5"): 1x1-3x3(stride)-1x1(x4), ReLU."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        improved_shortcut: bool = False,
        downsample: str = "conv",
    ) -> None:
        out_channels = planes * self.expansion
        super().__init__(
            nn.Sequential(
                conv1x1(in_channels, planes),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                conv3x3(planes, planes, stride),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                conv1x1(planes, out_channels),
                nn.BatchNorm2d(out_channels),
            ),
            make_shortcut(in_channels, out_channels, stride, improved_shortcut, downsample),
        )


Block = type[IRBlock] | type[SphereBlock] | type[BasicBlock] | type[Bottleneck]


# --------------------------------------------------------------------------------------------------
# Variant registry: the depth tables


@dataclass(frozen=True)
class Variant:
    """One row of the family: which block at which depth, and how the stem/output are normalised."""

    name: str
    depths: dict[int, tuple[Block, tuple[int, int, int, int]]]
    activation: Callable[[int], nn.Module]
    batch_norm: bool
    has_projection_shortcuts: bool
    source: str


def _prelu(channels: int) -> nn.Module:
    return nn.PReLU(channels)


def _relu(channels: int) -> nn.Module:
    return nn.ReLU(inplace=True)


_IR_UNITS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}

VARIANTS: dict[str, Variant] = {
    "ir": Variant(
        "ir",
        {depth: (IRBlock, units) for depth, units in _IR_UNITS.items()},
        _prelu,
        batch_norm=True,
        has_projection_shortcuts=True,
        source="ArcFace IR (Deng et al. 2019)",
    ),
    "ir_se": Variant(
        "ir_se",
        {depth: (IRSEBlock, units) for depth, units in _IR_UNITS.items()},
        _prelu,
        batch_norm=True,
        has_projection_shortcuts=True,
        source="pSp / TreB1eN IR-SE",
    ),
    "sphere": Variant(
        "sphere",
        {
            4: (SphereBlock, (0, 0, 0, 0)),
            20: (SphereBlock, (1, 2, 4, 1)),
            36: (SphereBlock, (2, 4, 8, 2)),
            64: (SphereBlock, (3, 8, 16, 3)),
        },
        _prelu,
        batch_norm=False,
        has_projection_shortcuts=False,
        source="SphereFace Table 2 (Liu et al. 2017)",
    ),
    "resnet": Variant(
        "resnet",
        {
            18: (BasicBlock, (2, 2, 2, 2)),
            34: (BasicBlock, (3, 4, 6, 3)),
            50: (Bottleneck, (3, 4, 6, 3)),
            101: (Bottleneck, (3, 4, 23, 3)),
        },
        _relu,
        batch_norm=True,
        has_projection_shortcuts=True,
        source="ResNet (He et al. 2016)",
    ),
}


def variant_depths() -> dict[str, list[int]]:
    """Every variant and its accepted depths, in registry order."""
    return {name: list(variant.depths) for name, variant in VARIANTS.items()}


# --------------------------------------------------------------------------------------------------
# The network


def _make_stem(config: BackboneConfig, variant: Variant) -> tuple[nn.Module, int]:
    """Return the stem and its output channels.

    ``cxr``: two learned stride-2 conv3x3 (BN, activation) instead of torchvision's conv7x7 +
    max-pool: the same 7x7 receptive field and stride 4, fewer weights, and the second downsampling
    is learned rather than a max over fine rib/clavicle edges (cf. the "ResNet-C" stem of He et al.
    2019). ``face``: ArcFace's stride-1 conv3x3-BN-PReLU. ``sphere`` has no stem in the paper: with
    the face stem its first stage's strided conv reads the image directly.
    """

    def conv_unit(in_channels: int, stride: int) -> list[nn.Module]:
        norm = [nn.BatchNorm2d(config.width)] if variant.batch_norm else []
        conv = conv3x3(in_channels, config.width, stride, bias=not variant.batch_norm)
        return [conv, *norm, variant.activation(config.width)]

    if config.stem == "cxr":
        return nn.Sequential(*conv_unit(config.in_channels, 2), *conv_unit(config.width, 2)), config.width
    if not variant.batch_norm:
        return nn.Identity(), config.in_channels
    return nn.Sequential(*conv_unit(config.in_channels, 1)), config.width


class GridAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(size)`` written as slices and means, so that ONNX export and
    TorchScript tracing can express it at any input size.

    The exporter and oneDNN's traced graph accept adaptive pooling only when the map divides evenly
    into the grid; 224 px gives a 7x7 map, whose 4 bins per side (2, 3, 3 and 2 cells) overlap.
    The bins here are PyTorch's (start ``floor(i*n/k)``, end ``ceil((i+1)*n/k)``), each averaged
    on its own, so the result is the same pooling; it holds no weights, so checkpoints load
    unchanged, and like any pooling it counts no FLOPs.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    @staticmethod
    def bins(n: int, k: int) -> list[tuple[int, int]]:
        """PyTorch's k adaptive bins over n cells, as (start, end)."""
        return [((i * n) // k, -((-(i + 1) * n) // k)) for i in range(k)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])  # fixed per input size: a constant in traces
        if h % self.size == 0 and w % self.size == 0:
            return F.avg_pool2d(x, (h // self.size, w // self.size))
        rows = torch.stack([x[..., s:e, :].mean(-2) for s, e in self.bins(h, self.size)], dim=-2)
        return torch.stack([rows[..., s:e].mean(-1) for s, e in self.bins(w, self.size)], dim=-1)


class OutputLayer(nn.Module):
    """Final feature map -> embedding: AdaptiveAvgPool -> BN2d -> Dropout -> flatten -> FC -> BN1d.

    ArcFace flattens its 7x7 map straight into the FC, which hard-codes 112 px inputs. CXRs come at
    128-512 px and any aspect, so the map is first average-pooled to a fixed ``pool_size`` grid:
    the FC keeps a coarse layout (apex vs base, left vs right) and its size no longer depends on
    the input. A map smaller than the grid (cxr stem below 128 px) is repeated into it, which is
    harmless. The BN1d gamma is frozen at 1, as ArcFace's ``fix_gamma=True`` and arcface_torch do.
    """

    def __init__(self, channels: int, embedding_dim: int, pool_size: int, dropout: float) -> None:
        super().__init__()
        self.pool = GridAvgPool2d(pool_size)
        self.bn2d = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        # No bias: the BN1d right after would cancel it.
        self.fc = nn.Linear(channels * pool_size * pool_size, embedding_dim, bias=False)
        self.bn1d = nn.BatchNorm1d(embedding_dim)
        self.bn1d.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn2d(self.pool(x)))
        return self.bn1d(self.fc(torch.flatten(x, 1)))


class PlainOutputLayer(nn.Module):
    """SphereFace's output: the pooled feature map flattened into one FC with a bias, no BatchNorm
    (its fc5); with ``sphere`` it keeps the whole network BN-free, as the paper's."""

    def __init__(self, channels: int, embedding_dim: int, pool_size: int, dropout: float) -> None:
        super().__init__()
        self.pool = GridAvgPool2d(pool_size)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * pool_size * pool_size, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.dropout(self.pool(x)), 1))


class Backbone(nn.Module):
    """(N, in_channels, H, W) -> (N, embedding_dim) for any H, W; see the module docstring."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding_dim = config.embedding_dim
        variant = VARIANTS[config.variant]
        block, units = variant.depths[config.depth]

        self.stem, channels = _make_stem(config, variant)
        # The face stem keeps full resolution, so the first stage downsamples (ArcFace: 112 -> 7x7);
        # the cxr stem has already divided by 4, so the first stage does not (torchvision).
        first_stride = 2 if config.stem == "face" else 1
        stages = []
        for index, num_units in enumerate(units):
            planes = config.width * 2**index
            stride = first_stride if index == 0 else 2
            stages.append(self._make_layer(block, channels, planes, num_units, stride, config))
            channels = planes * block.expansion
        self.body = nn.Sequential(*stages)
        self.feature_channels = channels
        output = OutputLayer if config.output == "bn" else PlainOutputLayer
        self.output = output(channels, config.embedding_dim, config.pool_size, config.dropout)
        self._init_weights(config.zero_init_residual)

    @staticmethod
    def _make_layer(
        block: Block, in_channels: int, planes: int, units: int, stride: int, config: BackboneConfig
    ) -> nn.Sequential:
        options = {"improved_shortcut": config.improved_shortcut, "downsample": config.downsample_shortcut}
        if units == 0:  # SphereFace's 4-layer net: the stage is its strided conv alone
            return nn.Sequential(SphereTransition(in_channels, planes, stride))
        layers = [block(in_channels, planes, stride, **options)]
        layers += [block(planes * block.expansion, planes, 1, **options) for _ in range(units - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, SphereBlock):
                # SphereFace initialises residual-unit convs with N(0, 0.01) (its prototxt's gaussian
                # filler), so every unit starts near identity: with no BN in the body, that is what
                # keeps the 36/64-layer nets trainable. Stage convs keep He init.
                for conv in module.residual:
                    if isinstance(conv, nn.Conv2d):
                        nn.init.normal_(conv.weight, std=0.01)
            elif zero_init_residual and hasattr(module, "last_bn"):
                nn.init.zeros_(module.last_bn.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map (N, feature_channels, h, w), before pooling; for saliency maps."""
        return self.body(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


def build_backbone(config: BackboneConfig) -> Backbone:
    """Build the network a config describes: (N, in_channels, H, W) -> (N, embedding_dim), any H, W."""
    model = Backbone(config)
    logger.debug(
        "built %s-%d (%s stem): %.2fM parameters",
        config.variant,
        config.depth,
        config.stem,
        count_parameters(model) / 1e6,
    )
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the frozen BN1d gamma included): the size on disk."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Size and cost table for `cxr-reid models`


def describe_variants(
    input_size: int = 224,
    embedding_dim: int = 512,
    width: int = 64,
    stem: str = "cxr",
    variants: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Every variant (or those named) and depth with parameters and FLOPs for one square image.

    Rows hold exact ``params`` and ``flops`` and, for display, ``params_m`` (millions) and
    ``gflops`` (unrounded; ``format_variants_table`` rounds).

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for conv and linear layers,
    as 2 x multiply-accumulates (so 1 GMAC = 2 GFLOPs); BN, activations and pooling are not
    counted. Models are built on the meta device, so no weights are allocated and no arithmetic
    runs: the whole table takes about two seconds on a laptop CPU (meta-device BatchNorm is most
    of it).
    """
    names = list(VARIANTS) if variants is None else list(variants)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown backbone variants {unknown}; choose from {sorted(VARIANTS)}")
    rows = []
    for name in names:
        variant = VARIANTS[name]
        for depth, (block, units) in variant.depths.items():
            config = BackboneConfig(
                variant=name, depth=depth, width=width, embedding_dim=embedding_dim, stem=stem
            )
            with torch.device("meta"):
                model = Backbone(config).eval()
                image = torch.empty(1, config.in_channels, input_size, input_size)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                final_map = model.features(image)
                model.output(final_map)
            params, flops = count_parameters(model), counter.get_total_flops()
            rows.append(
                {
                    "variant": name,
                    "depth": depth,
                    "block": block.__name__,
                    "units": list(units),
                    "stem": stem,
                    "input_size": input_size,
                    "final_map": f"{final_map.shape[-2]}x{final_map.shape[-1]}",
                    "embedding_dim": embedding_dim,
                    "width": width,
                    "params": params,
                    "flops": flops,
                    "params_m": params / 1e6,
                    "gflops": flops / 1e9,
                    "source": variant.source,
                }
            )
    return rows


def format_variants_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of ``describe_variants`` rows, with the FLOP convention as a footnote."""
    columns = [
        ("variant", "variant"),
        ("depth", "depth"),
        ("block", "block"),
        ("params_m", "params (M)"),
        ("gflops", "GFLOPs"),
        ("final_map", "final map"),
        ("source", "source"),
    ]
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append(
            [f"{row[key]:.2f}" if isinstance(row[key], float) else str(row[key]) for key, _ in columns]
        )
    numeric = {"depth", "params_m", "gflops"}
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for line in cells:
        padded = [
            cell.rjust(w) if key in numeric else cell.ljust(w)
            for (key, _), cell, w in zip(columns, line, widths, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    if rows:
        first = rows[0]
        lines.append(
            f"\n{first['input_size']} px {first['stem']} stem, width {first['width']}, embedding "
            f"{first['embedding_dim']}, one image. GFLOPs = 2 x multiply-accumulates of conv and "
            "linear layers (torch.utils.flop_counter); BN, activations and pooling not counted."
        )
    return "\n".join(lines)
