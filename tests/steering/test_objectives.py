"""RLOO and GRPO advantages, the k3 estimator and the policy loss against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from interlayer.steering.objectives import advantages, kl_k3, policy_loss


def test_rloo_advantage_by_hand() -> None:
    rewards = torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.0, 1.0, 1.0, -1.0]])
    # A_i = r_i − mean of the other three
    expected = torch.tensor(
        [
            [1 - (-1 - 1 + 1) / 3, -1 - (1 - 1 + 1) / 3, -1 - (1 - 1 + 1) / 3, 1 - (1 - 1 - 1) / 3],
            [1 - (1 + 1 - 1) / 3, 1 - (1 + 1 - 1) / 3, 1 - (1 + 1 - 1) / 3, -1 - 3 / 3],
        ]
    )
    torch.testing.assert_close(advantages(rewards, "rloo"), expected)
    assert advantages(rewards, "rloo")[0, 0].item() == pytest.approx(4 / 3)


def test_grpo_advantage_is_centred_without_std() -> None:
    rewards = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
    torch.testing.assert_close(advantages(rewards, "grpo"), torch.tensor([[1.5, -0.5, -0.5, -0.5]]))
    # all equal rewards give no signal under either
    same = torch.full((1, 4), -1.0)
    assert torch.equal(advantages(same, "grpo"), torch.zeros(1, 4))
    assert torch.equal(advantages(same, "rloo"), torch.zeros(1, 4))


def test_rloo_is_grpo_scaled_by_g_over_g_minus_one() -> None:
    rewards = torch.randn(5, 6)
    torch.testing.assert_close(advantages(rewards, "rloo"), advantages(rewards, "grpo") * 6 / 5)


def test_k3_by_hand() -> None:
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, 0.0])
    delta = [-0.5, 0.0, 0.5]
    expected = torch.tensor([math.exp(d) - d - 1 for d in delta])
    torch.testing.assert_close(kl_k3(logp, ref), expected)
    assert kl_k3(logp, ref)[1].item() == 0.0


def test_policy_loss_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # −(1/5)·(2·(−1 − 2) + (−1)·(−0.5 − 0.5 − 3))
    assert policy_loss(logp, adv, mask).item() == pytest.approx(-(2 * -3 + -1 * -4) / 5)
    ref = torch.tensor([[-1.0, -1.0, 5.0], [-0.5, -1.5, -3.0]])
    kl = (math.exp(1) - 1 - 1) + (math.exp(-1) + 1 - 1)
    assert policy_loss(logp, adv, mask, ref, 0.1).item() == pytest.approx(-(2 * -3 + -1 * -4 - 0.1 * kl) / 5)
    # a micro-batch normalised by the whole batch's tokens
    assert policy_loss(logp[:1], adv[:1], mask[:1], tokens=5).item() == pytest.approx(-(2 * -3) / 5)
    policy_loss(logp, adv, mask).backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.4, -0.4, 0.0], [0.2, 0.2, 0.2]]))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        advantages(torch.zeros(1, 2), "ppo")
    with pytest.raises(ValueError, match="at least 2 samples"):
        advantages(torch.zeros(1, 1), "rloo")
