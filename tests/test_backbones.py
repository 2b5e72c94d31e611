"""Backbone family: shapes at any input size, config round trips, variant table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from models.net.backbones import (
    VARIANTS,
    BackboneConfig,
    build_backbone,
    count_parameters,
    describe_variants,
    format_variants_table,
    variant_depths,
)

ALL_DEPTHS = [(variant, depth) for variant, depths in variant_depths().items() for depth in depths]
EMBEDDING_DIM = 16


def tiny(variant: str, depth: int, **overrides) -> BackboneConfig:
    """Small width keeps even depth 100/101 fast on CPU."""
    return BackboneConfig(variant=variant, depth=depth, width=8, embedding_dim=EMBEDDING_DIM, **overrides)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("variant", "depth"), ALL_DEPTHS)
def test_every_variant_embeds_any_input_size(variant: str, depth: int) -> None:
    model = build_backbone(tiny(variant, depth))
    for size in (64, 96):
        out = model(torch.randn(2, 1, size, size))  # train mode: batch statistics
        assert out.shape == (2, EMBEDDING_DIM)
        assert torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 80, 72)).shape == (1, EMBEDDING_DIM)


@pytest.mark.parametrize("variant", ["ir", "ir_se", "resnet", "sphere"])
def test_face_stem_and_improved_shortcut(variant: str) -> None:
    depth = min(VARIANTS[variant].depths)
    configs = [tiny(variant, depth, stem="face")]
    if VARIANTS[variant].has_projection_shortcuts:
        configs += [
            tiny(variant, depth, improved_shortcut=True),
            tiny(variant, depth, stem="face", improved_shortcut=True),
        ]
    for config in configs:
        out = build_backbone(config)(torch.randn(2, 1, 64, 64))
        assert out.shape == (2, EMBEDDING_DIM)


def test_improved_shortcut_pools_before_projection() -> None:
    model = build_backbone(tiny("resnet", 50, improved_shortcut=True))
    shortcut = model.body[1][0].shortcut
    assert isinstance(shortcut[0], nn.MaxPool2d) and shortcut[0].kernel_size == 3
    assert isinstance(shortcut[1], nn.Conv2d) and shortcut[1].stride == (1, 1)
    plain = build_backbone(tiny("resnet", 50)).body[1][0].shortcut
    assert isinstance(plain[0], nn.Conv2d) and plain[0].stride == (2, 2)


def test_final_map_geometry() -> None:
    """ArcFace geometry: face stem at 112 px gives 7x7; the cxr stem divides by 32."""
    face = build_backbone(tiny("ir", 18, stem="face")).eval()
    cxr = build_backbone(tiny("ir", 18)).eval()
    with torch.no_grad():
        assert face.features(torch.zeros(1, 1, 112, 112)).shape[-2:] == (7, 7)
        assert cxr.features(torch.zeros(1, 1, 128, 128)).shape[-2:] == (4, 4)
        assert cxr.features(torch.zeros(1, 1, 256, 192)).shape[-2:] == (8, 6)


def test_sphere_body_has_no_batch_norm() -> None:
    for stem in ("cxr", "face"):
        model = build_backbone(tiny("sphere", 20, stem=stem))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in [*model.stem.modules(), *model.body.modules()])
        assert isinstance(model.output.bn1d, nn.BatchNorm1d)


def test_ir_block_keeps_arcface_order() -> None:
    block = build_backbone(tiny("ir", 18)).body[0][0]
    kinds = [type(m) for m in block.residual]
    assert kinds == [nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d, nn.PReLU, nn.Conv2d, nn.BatchNorm2d]
    se_block = build_backbone(tiny("ir_se", 18)).body[0][0]
    assert type(se_block.residual[-1]).__name__ == "SEModule"


def test_zero_init_residual_starts_blocks_as_shortcuts() -> None:
    model = build_backbone(tiny("ir", 18, zero_init_residual=True)).eval()
    block = model.body[0][1]  # shape-preserving block: identity shortcut
    assert torch.count_nonzero(block.last_bn.weight) == 0
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_config_round_trip_and_validation() -> None:
    config = BackboneConfig(
        variant="ir_se", depth=50, width=32, stem="face", improved_shortcut=True, dropout=0.2
    )
    restored = BackboneConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert BackboneConfig.from_dict({"depth": 34}) == BackboneConfig(depth=34)
    with pytest.raises(ValueError, match="unknown BackboneConfig keys"):
        BackboneConfig.from_dict({"variant": "ir", "dept": 50})
    with pytest.raises(ValueError, match="no depth"):
        BackboneConfig(variant="sphere", depth=50)
    with pytest.raises(ValueError, match="no depth"):
        BackboneConfig(variant="resnet", depth=100)
    with pytest.raises(ValueError, match="unknown backbone variant"):
        BackboneConfig(variant="vit")
    with pytest.raises(ValueError, match="projection shortcuts"):
        BackboneConfig(variant="sphere", depth=20, improved_shortcut=True)
    with pytest.raises(ValueError, match="stem"):
        BackboneConfig(stem="huge")


def test_parameter_counts_follow_the_config() -> None:
    a, b = build_backbone(tiny("ir", 34)), build_backbone(tiny("ir", 34))
    assert count_parameters(a) == count_parameters(b)
    assert count_parameters(build_backbone(tiny("ir", 50))) > count_parameters(a)
    # Equal configs build identical architectures: a state dict loads across them.
    b.load_state_dict(a.state_dict())
    # The FC depends on pool_size, never on the input size.
    assert count_parameters(build_backbone(tiny("ir", 34, pool_size=2))) < count_parameters(a)


def test_state_dict_has_no_duplicate_entries() -> None:
    model = build_backbone(tiny("resnet", 18))
    assert len(model.state_dict()) == len(list(model.named_parameters())) + len(list(model.named_buffers()))


@pytest.fixture(scope="module")
def small_table() -> list[dict]:
    return describe_variants(input_size=64, embedding_dim=EMBEDDING_DIM, width=8)


def test_describe_variants_covers_every_variant(small_table: list[dict]) -> None:
    assert [(row["variant"], row["depth"]) for row in small_table] == ALL_DEPTHS
    for row in small_table:
        assert row["params"] > 0 and row["flops"] > 0
    ir18 = next(row for row in small_table if (row["variant"], row["depth"]) == ("ir", 18))
    assert ir18["params"] == count_parameters(build_backbone(tiny("ir", 18)))
    assert ir18["final_map"] == "2x2"
    table = format_variants_table(small_table)
    for name in VARIANTS:
        assert name in table
    assert "multiply-accumulates" in table


def test_flops_are_twice_the_multiply_accumulates() -> None:
    """Hand count for the smallest net: every conv/linear MAC counted twice, nothing else."""
    config = tiny("ir", 18)
    model = build_backbone(config).eval()
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal macs
        weight = module.weight
        macs += weight.numel() * (output[0, 0].numel() if isinstance(module, nn.Conv2d) else 1)

    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 1, 64, 64))
    (row,) = [r for r in describe_variants(64, EMBEDDING_DIM, 8, variants=["ir"]) if r["depth"] == 18]
    assert row["flops"] == 2 * macs


def test_flops_grow_with_input_size(small_table: list[dict]) -> None:
    large = describe_variants(input_size=128, embedding_dim=EMBEDDING_DIM, width=8, variants=["ir", "sphere"])
    small = [row for row in small_table if row["variant"] in ("ir", "sphere")]
    for a, b in zip(small, large, strict=True):
        assert b["flops"] > a["flops"]
        assert b["params"] == a["params"]
    with pytest.raises(ValueError, match="unknown backbone variants"):
        describe_variants(variants=["vit"])


def test_face_stem_downsampling_shortcut_is_mxnets_conv_by_default() -> None:
    """The first unit after the face stem strides without changing channels: conv1x1+BN in the MXNet
    original (the default), TreB1eN's MaxPool2d(1, 2) as the named option."""
    original = build_backbone(tiny("ir", 18, stem="face")).body[0][0].shortcut
    assert isinstance(original[0], nn.Conv2d) and original[0].stride == (2, 2)
    assert isinstance(original[1], nn.BatchNorm2d)
    port = build_backbone(tiny("ir", 18, stem="face", downsample_shortcut="subsample")).body[0][0].shortcut
    assert isinstance(port, nn.MaxPool2d) and port.kernel_size == 1 and port.stride == 2
    # later stages change channels: both project
    assert isinstance(
        build_backbone(tiny("ir", 18, downsample_shortcut="subsample")).body[1][0].shortcut[0], nn.Conv2d
    )
    with pytest.raises(ValueError, match="downsample_shortcut"):
        tiny("ir", 18, downsample_shortcut="pool")


def test_sphereface_four_layer_net_and_bn_free_output() -> None:
    """SphereFace Table 2's 4-layer net: four strided conv+PReLU stages, no residual unit; with the
    face stem and output="fc" there is no BatchNorm anywhere, as in the paper."""
    model = build_backbone(tiny("sphere", 4, stem="face", output="fc"))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.stride == (2, 2) for c in convs)
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 1, 112, 112)).shape == (2, EMBEDDING_DIM)
    with torch.no_grad():
        assert model.eval().features(torch.zeros(1, 1, 112, 112)).shape[-2:] == (7, 7)
    bn_output = build_backbone(tiny("sphere", 20))
    assert isinstance(bn_output.output.bn1d, nn.BatchNorm1d)
