"""mt.losses.dpo_loss: hand-worked values of every variant, the policy = reference case, the sigmoid gradient."""

from __future__ import annotations

import math

import pytest
import torch

from minitune.losses import dpo_loss

# policy chosen, policy rejected, reference chosen, reference rejected (log-probabilities of whole answers)
PC, PR, RC, RR = torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -8.0]), torch.tensor([-6.0, -8.5]), \
    torch.tensor([-6.5, -8.0])
# h = (PC - RC) - (PR - RR) = [1 - (-0.5), -0.5 - 0] = [1.5, -0.5]
H = [1.5, -0.5]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


@pytest.mark.parametrize("loss_type,beta,eps,expected", [
    ("sigmoid", 0.1, 0.0, [softplus(-0.15), softplus(0.05)]),
    ("sigmoid", 0.5, 0.2, [0.8 * softplus(-0.75) + 0.2 * softplus(0.75), 0.8 * softplus(0.25) + 0.2 * softplus(-0.25)]),
    ("robust", 0.5, 0.2, [(0.8 * softplus(-0.75) - 0.2 * softplus(0.75)) / 0.6,
                          (0.8 * softplus(0.25) - 0.2 * softplus(-0.25)) / 0.6]),
    ("hinge", 0.5, 0.0, [max(0.0, 1 - 0.75), max(0.0, 1 + 0.25)]),
    ("hinge", 1.0, 0.0, [0.0, 1.5]),
    ("ipo", 0.5, 0.0, [(1.5 - 1.0) ** 2, (-0.5 - 1.0) ** 2]),
])
def test_hand_worked_values(loss_type, beta, eps, expected):
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([beta * 1.0, beta * -0.5])
    assert rejected.tolist() == pytest.approx([beta * -0.5, beta * 0.0])
    assert not chosen.requires_grad and not rejected.requires_grad


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps = torch.tensor([-3.0, -11.0, -0.5])
    losses, chosen, rejected = dpo_loss(logps, logps - 2, logps, logps - 2, beta=0.3)
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert torch.all(chosen == 0) and torch.all(rejected == 0)


def test_sigmoid_gradient_matches_the_closed_form():
    """d/d(log πθ(y_w)) of −log σ(β h) is −β σ(−β h); of log πθ(y_l), +β σ(−β h)."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    beta = 0.7
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=beta)
    losses.sum().backward()
    weight = torch.sigmoid(-beta * torch.tensor(H))
    torch.testing.assert_close(pc.grad, -beta * weight)
    torch.testing.assert_close(pr.grad, beta * weight)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_robust_loss_is_unbiased_under_flipped_labels(eps):
    """Chowdhury et al.'s defining property: if each label is flipped with probability ε, the expected robust
    loss, (1 − ε) L(h) + ε L(−h), is the clean DPO loss of h. The flipped pair swaps the two answers."""
    beta = 0.4
    clean, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta)
    kept, _, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="robust", label_smoothing=eps)
    flipped, _, _ = dpo_loss(PR, PC, RR, RC, beta=beta, loss_type="robust", label_smoothing=eps)
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_smoothed_gradients_match_the_closed_form(loss_type):
    """Conservative DPO: d/dh of −(1−ε) log σ(βh) − ε log σ(−βh) is −β((1−ε) σ(−βh) − ε σ(βh)); the robust
    loss's is −β((1−ε) σ(−βh) + ε σ(βh)) / (1 − 2ε). The chosen log-prob gets it, the rejected its negative."""
    beta, eps = 0.7, 0.2
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=beta, loss_type=loss_type, label_smoothing=eps)
    losses.sum().backward()
    h = torch.tensor(H)
    if loss_type == "sigmoid":
        dh = -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h))
    else:
        dh = -beta * ((1 - eps) * torch.sigmoid(-beta * h) + eps * torch.sigmoid(beta * h)) / (1 - 2 * eps)
    torch.testing.assert_close(pc.grad, dh)
    torch.testing.assert_close(pr.grad, -dh)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "kto"}, "loss_type='kto': expected one of sigmoid, ipo, hinge, robust"),
    ({"beta": 0.0}, "beta must be positive, got 0.0"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\), got 0.5"),
    ({"label_smoothing": 0.1, "loss_type": "ipo"}, "label_smoothing applies to the sigmoid and robust losses"),
    ({"label_smoothing": 0.1, "loss_type": "hinge"}, "not to 'hinge'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(PC, PR, RC, RR, **kwargs)


def test_shapes_must_agree():
    with pytest.raises(ValueError, match=r"one shape \[B\]"):
        dpo_loss(PC, PR, RC, RR[:1])
