"""Margin heads: logits checked against hand-computed values on 2-D embeddings with known angles."""

from __future__ import annotations

import math

import pytest
import torch

from models.net.heads import HEAD_PRESETS, CombinedMarginHead, build_head

S = 10.0


def unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def head_2d(name: str, class_angles: list[float], **kwargs) -> CombinedMarginHead:
    """A 2-D head whose class weights point at the given angles (scaled, to check normalisation)."""
    head = build_head(name, 2, len(class_angles), s=S, **kwargs)
    with torch.no_grad():
        head.weight.copy_(3.0 * torch.tensor([unit(a) for a in class_angles]))
    return head


@pytest.mark.parametrize("name", ["arcface", "cosface", "combined"])
def test_logits_match_hand_computation(name: str) -> None:
    head = head_2d(name, [0.0, math.pi / 2])
    m1, m2, m3 = (HEAD_PRESETS[name][k] for k in ("m1", "m2", "m3"))
    theta = 0.3
    embeddings = 5.0 * torch.tensor([unit(theta)])
    logits = head(embeddings, torch.tensor([0]))
    expected_target = S * (math.cos(m1 * theta + m2) - m3)
    expected_other = S * math.cos(math.pi / 2 - theta)
    torch.testing.assert_close(logits, torch.tensor([[expected_target, expected_other]]))


def test_eval_logits_are_scaled_cosines() -> None:
    head = head_2d("arcface", [0.0, math.pi / 2, math.pi]).eval()
    logits = head(torch.tensor([unit(0.3)]), None)
    expected = [S * math.cos(0.3), S * math.cos(math.pi / 2 - 0.3), S * math.cos(math.pi - 0.3)]
    torch.testing.assert_close(logits, torch.tensor([expected]))


def test_negative_labels_get_plain_logits() -> None:
    head = head_2d("arcface", [0.0, math.pi / 2])
    embeddings = torch.tensor([unit(0.3), unit(0.3)])
    logits = head(embeddings, torch.tensor([-1, 0]))
    torch.testing.assert_close(logits[0], head(embeddings[:1], None)[0])
    assert logits[1, 0] < logits[0, 0]


def test_arcface_falls_back_past_pi() -> None:
    """theta + m2 > pi: insightface's cos(theta) - m2 * sin(m2), which keeps decreasing in theta."""
    m2 = 0.5
    head = head_2d("arcface", [0.0, math.pi / 2], m2=m2)
    for theta in (3.0, math.pi - 0.2):
        logits = head(torch.tensor([unit(theta)]), torch.tensor([0]))
        expected = S * (math.cos(theta) - m2 * math.sin(m2))
        torch.testing.assert_close(logits[0, 0], torch.tensor(expected))
    # Just below the switch point the ordinary margin still applies.
    theta = math.pi - m2 - 0.05
    logits = head(torch.tensor([unit(theta)]), torch.tensor([0]))
    torch.testing.assert_close(logits[0, 0], torch.tensor(S * math.cos(theta + m2)))


@pytest.mark.parametrize("name", sorted(HEAD_PRESETS))
def test_target_decreases_with_angle(name: str) -> None:
    head = build_head(name, 2, 1, lambda_base=0.0)  # SphereFace: pure psi, no blend
    thetas = torch.linspace(0.0, math.pi, 2001)
    target = head.target_cosine(torch.cos(thetas))
    assert torch.all(target[1:] <= target[:-1] + 1e-5)
    # ... and never above the plain cosine: the margin only ever penalises the target.
    assert torch.all(target <= torch.cos(thetas) + 1e-5)


@pytest.mark.parametrize("name", sorted(HEAD_PRESETS))
def test_gradients_finite_at_cos_plus_minus_one(name: str) -> None:
    head = head_2d(name, [0.0, math.pi / 2])
    embeddings = torch.tensor([unit(0.0), unit(math.pi), unit(1e-4)], requires_grad=True)
    logits = head(embeddings, torch.tensor([0, 0, 0]))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0])).backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(embeddings.grad).all()
    assert torch.isfinite(head.weight.grad).all()


def test_sub_centres_take_the_max() -> None:
    head = build_head("arcface", 2, 2, s=S, sub_centers=2)
    # class 0: sub-centres at 0 and pi/2; class 1: both at pi.
    with torch.no_grad():
        head.weight.copy_(torch.tensor([unit(0.0), unit(math.pi / 2), unit(math.pi), unit(math.pi)]))
    theta = math.pi / 2 - 0.2  # nearest to class 0's second sub-centre
    embeddings = torch.tensor([unit(theta)])
    plain = head(embeddings, None)
    torch.testing.assert_close(plain, torch.tensor([[S * math.cos(0.2), S * math.cos(math.pi - theta)]]))
    logits = head(embeddings, torch.tensor([0]))
    torch.testing.assert_close(logits[0, 0], torch.tensor(S * math.cos(0.2 + 0.5)))
    assert head.weight.shape == (4, 2)


def test_sphereface_psi_and_lambda_annealing() -> None:
    head = head_2d("sphereface", [0.0, math.pi / 2])
    assert head.m1 == 4.0 and head.annealed
    assert head.current_lambda == pytest.approx(1000.0)
    theta = 1.0  # 4 * theta = 4 rad: k = 1, psi = -cos(4) - 2
    psi = -math.cos(4.0) - 2.0
    for _ in range(3):
        lam = head.current_lambda
        logits = head(torch.tensor([unit(theta)]), torch.tensor([0]))
        expected = S * (lam * math.cos(theta) + psi) / (1.0 + lam)
        torch.testing.assert_close(logits[0, 0], torch.tensor(expected))
    assert int(head.iteration) == 3
    assert head.current_lambda == pytest.approx(1000.0 / (1.0 + 0.12 * 3))
    head.eval()
    head(torch.tensor([unit(theta)]), torch.tensor([0]))
    assert int(head.iteration) == 3  # evaluation does not advance the schedule
    head.iteration.fill_(1_000_000)
    assert head.current_lambda == pytest.approx(5.0)
    # The schedule position is part of the state dict, so a resumed run continues it.
    clone = build_head("sphereface", 2, 2)
    clone.load_state_dict(head.state_dict())
    assert clone.current_lambda == pytest.approx(5.0)


def test_additive_heads_do_not_anneal() -> None:
    head = build_head("arcface", 8, 3)
    assert not head.annealed and head.current_lambda == 0.0


def test_build_head_presets_and_errors() -> None:
    head = build_head("ArcFace", 16, 5, s=30.0, m2=0.4)
    assert (head.s, head.m1, head.m2, head.m3) == (30.0, 1.0, 0.4, 0.0)
    assert build_head("combined", 16, 5).m3 == pytest.approx(0.2)
    assert build_head("cosface", 16, 5)(torch.randn(4, 16), torch.arange(4)).shape == (4, 5)
    with pytest.raises(ValueError, match="unknown head"):
        build_head("adaface", 16, 5)
    with pytest.raises(TypeError):
        build_head("arcface", 16, 5, margin=0.5)
    with pytest.raises(ValueError):
        build_head("arcface", 16, 5, m2=4.0)
    with pytest.raises(ValueError, match="labels"):
        build_head("arcface", 16, 5)(torch.randn(4, 16), torch.arange(3))


def test_half_precision_embeddings_give_float32_logits() -> None:
    head = build_head("arcface", 16, 5)
    logits = head(torch.randn(4, 16).half(), torch.arange(4))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_autocast_leaves_the_margin_in_float32() -> None:
    """Under bf16 autocast (the GPU recipe) the head's cosines and margin stay fp32: bf16 cannot
    resolve the small angles the margin works on. (On a GPU the mixed dtypes once failed outright.)"""
    head = build_head("arcface", 16, 5)
    embeddings = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(torch.nn.functional.linear(embeddings, torch.eye(16)), torch.arange(4))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, head(embeddings, torch.arange(4)), rtol=0, atol=0.2)
