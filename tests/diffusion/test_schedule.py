"""The log-linear schedule and the MDLM objective against hand computations and known answers."""

from __future__ import annotations

import math

import pytest
import torch

from interlayer.diffusion.schedule import (
    TRAIN_EPS,
    LogLinearSchedule,
    low_discrepancy_times,
    mask_at_times,
    mdlm_loss,
)


def test_loss_weight_is_minus_alpha_prime_over_one_minus_alpha() -> None:
    schedule = LogLinearSchedule(TRAIN_EPS)
    for t in (0.01, 0.3, 0.9):
        h = 1e-6
        alpha_prime = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
        assert float(-alpha_prime / (1 - schedule.alpha(t))) == pytest.approx(
            float(schedule.loss_weight(torch.tensor(t))), rel=1e-6
        )
    assert float(schedule.mask_prob(1.0)) == pytest.approx(1 - TRAIN_EPS)
    assert float(LogLinearSchedule().mask_prob(1.0)) == 1.0


def test_low_discrepancy_times_are_stratified() -> None:
    t_B = low_discrepancy_times(8, torch.Generator().manual_seed(0))
    u_B = ((t_B - 1e-3) / (1 - 1e-3)).sort().values
    strata = (u_B * 8).floor().long().tolist()
    assert strata == list(range(8))  # exactly one time in each eighth of [0, 1)


def test_masking_rate_follows_the_schedule() -> None:
    x0 = torch.zeros(4000, 50, dtype=torch.long)
    t = torch.full((4000,), 0.3, dtype=torch.float64)
    x_t = mask_at_times(
        x0,
        t,
        9,
        torch.ones_like(x0, dtype=torch.bool),
        LogLinearSchedule(TRAIN_EPS),
        torch.Generator().manual_seed(1),
    )
    assert float((x_t == 9).float().mean()) == pytest.approx(0.3 * (1 - TRAIN_EPS), abs=3e-3)


def test_mdlm_loss_equals_a_per_position_loop() -> None:
    vocab, mask = 7, 6
    generator_weights = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, vocab, generator=generator_weights)
    seen: list[torch.Tensor] = []

    def logits_fn(x_t: torch.Tensor) -> torch.Tensor:
        seen.append(x_t)
        return table[x_t] + torch.arange(x_t.shape[1]).unsqueeze(-1) * 0.1

    x0 = torch.randint(0, mask, (5, 9), generator=generator_weights)
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, 0] = False
    loss = mdlm_loss(logits_fn, x0, mask, maskable, torch.Generator().manual_seed(3))
    t_B = low_discrepancy_times(5, torch.Generator().manual_seed(3))  # the first draw of the loss
    x_t = seen[0]
    logits = logits_fn(x_t)
    total = 0.0
    for b in range(5):
        for pos in range(9):
            if x_t[b, pos] == mask:
                row = logits[b, pos].clone()
                row[mask] = -math.inf
                total += -float(row.log_softmax(-1)[x0[b, pos]]) / float(t_B[b])
    assert float(loss) == pytest.approx(total / int(maskable.sum()), rel=1e-5)
    assert not bool((x_t[:, 0] == mask).any())


def test_uniform_denoiser_has_the_known_nelbo() -> None:
    """Uniform over the V − 1 real tokens: E[(1/t)·1{masked}] = 1 − ε per position, so the NELBO is (1 − ε) log(V − 1)."""
    vocab, mask = 11, 10
    x0 = torch.randint(0, mask, (4096, 16), generator=torch.Generator().manual_seed(0))
    loss = mdlm_loss(
        lambda x_t: torch.zeros(*x_t.shape, vocab), x0, mask, generator=torch.Generator().manual_seed(2)
    )
    assert float(loss) == pytest.approx((1 - TRAIN_EPS) * math.log(vocab - 1), rel=0.02)
