"""VARAN's aggregation math against hand computations: priors (the official code's values), the loss in both KL
directions, the one-layer case, the weighted sum, masked pooling, the posterior's shape and CTC normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from interlayer.speech.aggregation import (
    LayerPosterior,
    WeightedLayerSum,
    ctc_layer_losses,
    last_layer,
    layer_prior,
    masked_time_mean,
    varan_class_log_probs,
    varan_loss,
)


def test_priors_sum_to_one_with_the_official_values() -> None:
    for name in ("uniform", "geometric", "geometric_reversed", "chi2", "chi2_reversed"):
        prior = layer_prior(name, 12)
        assert (
            prior.shape == (12,)
            and prior.sum().item() == pytest.approx(1.0, abs=1e-12)
            and (prior >= 0).all()
        )
    assert torch.allclose(layer_prior("uniform", 4), torch.full((4,), 0.25, dtype=torch.float64))
    geometric = layer_prior("geometric", 12, p=0.45)
    assert geometric[:3].tolist() == pytest.approx([0.45, 0.2475, 0.136125])
    assert geometric[-1].item() == pytest.approx(1 - sum(0.45 * 0.55**i for i in range(11)))
    assert torch.equal(layer_prior("geometric_reversed", 12), geometric.flip(0))
    # the official code's chi2_reversed prior for 12 layers, df = 35, nc = 10 (evaluated from deepvk/varan's formula)
    official = [
        0.0083,
        0.0171,
        0.0328,
        0.0576,
        0.0918,
        0.1303,
        0.1619,
        0.1713,
        0.1491,
        0.1020,
        0.0511,
        0.0268,
    ]
    assert layer_prior("chi2_reversed", 12, df=35, nc=10).tolist() == pytest.approx(official, abs=1e-4)
    assert int(layer_prior("chi2_reversed", 12).argmax()) >= 8  # the default (df 2) favours the top layers
    with pytest.raises(ValueError, match="unknown prior"):
        layer_prior("poisson", 12)


@pytest.mark.parametrize("direction", ["prior_q", "q_prior"])
def test_varan_loss_equals_a_hand_computation(direction: str) -> None:
    torch.manual_seed(0)
    losses = torch.rand(3, 4) * 3
    logits = torch.randn(3, 4)
    prior = layer_prior("chi2_reversed", 4)
    total = 0.0
    for b in range(3):
        z = sum(math.exp(v) for v in logits[b].tolist())
        q = [math.exp(v) / z for v in logits[b].tolist()]
        p = prior.tolist()
        expected = sum(q[i] * losses[b, i].item() for i in range(4))
        if direction == "prior_q":
            kl = sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in range(4))
        else:
            kl = sum(q[i] * (math.log(q[i]) - math.log(p[i])) for i in range(4))
        total += expected + 0.05 * kl
    assert varan_loss(losses, logits, prior, 0.05, direction).item() == pytest.approx(total / 3, rel=1e-6)
    if direction == "prior_q":  # the official code's F.kl_div(log q, prior, reduction="batchmean")
        official = F.kl_div(logits.log_softmax(-1), prior.float().expand(3, 4), reduction="batchmean")
        ours = varan_loss(torch.zeros(3, 4), logits, prior, 1.0, direction)
        assert ours.item() == pytest.approx(official.item(), rel=1e-6)


def test_one_layer_reduces_to_the_last_layer_head() -> None:
    torch.manual_seed(0)
    logits_BNC = torch.randn(5, 1, 7)
    labels = torch.randint(0, 7, (5,))
    posterior = torch.randn(5, 1)
    per_sample = F.cross_entropy(logits_BNC[:, 0], labels, reduction="none")[:, None]
    for direction in ("prior_q", "q_prior"):
        loss = varan_loss(per_sample, posterior, layer_prior("chi2_reversed", 1), 0.05, direction)
        assert loss.item() == pytest.approx(F.cross_entropy(logits_BNC[:, 0], labels).item(), rel=1e-6)
    assert torch.allclose(varan_class_log_probs(posterior, logits_BNC), logits_BNC[:, 0].log_softmax(-1))
    h = torch.randn(2, 1, 3, 4)
    assert torch.equal(last_layer(h), h[:, 0])


def test_weighted_sum_and_prediction_rule_by_hand() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 3, 4, 5)
    summed = WeightedLayerSum(3)
    assert torch.allclose(summed(h), h.mean(dim=1), atol=1e-6)  # equal weights: the mean of the layers
    with torch.no_grad():
        summed.weights.copy_(torch.tensor([0.0, math.log(2.0), math.log(5.0)]))  # softmax = (1, 2, 5) / 8
    assert torch.allclose(summed(h), (h[:, 0] + 2 * h[:, 1] + 5 * h[:, 2]) / 8, atol=1e-6)
    posterior, logits = torch.randn(2, 3), torch.randn(2, 3, 4)
    q = posterior.softmax(-1)
    by_hand = sum(q[:, i, None] * logits[:, i].log_softmax(-1) for i in range(3))
    assert torch.allclose(varan_class_log_probs(posterior, logits), by_hand, atol=1e-6)


def test_pooling_ignores_padded_frames_and_the_posterior_has_one_logit_per_layer() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 3, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    pooled = masked_time_mean(h, mask)
    assert torch.allclose(pooled[0], h[0, :, :4].mean(dim=1), atol=1e-6)
    noisy = h.clone()
    noisy[0, :, 4:] = 1e3
    assert torch.allclose(masked_time_mean(noisy, mask), pooled)
    posterior = LayerPosterior(32, heads=16)
    assert posterior(pooled).shape == (2, 3)
    with pytest.raises(ValueError, match="must divide"):
        LayerPosterior(30, heads=16)


def test_ctc_layer_losses_are_divided_by_the_number_of_frames() -> None:
    torch.manual_seed(0)
    log_probs = torch.randn(2, 3, 10, 6).log_softmax(-1)  # [layers, batch, frames, vocab]
    targets = torch.tensor([1, 2, 3, 4, 5, 1, 2])
    input_lengths, target_lengths = torch.tensor([10, 8, 9]), torch.tensor([3, 2, 2])
    losses = ctc_layer_losses(log_probs, targets, input_lengths, target_lengths)
    assert losses.shape == (3, 2)
    starts = [0, 3, 5]
    for layer in range(2):
        for b in range(3):
            one = F.ctc_loss(
                log_probs[layer, b : b + 1, : input_lengths[b]].transpose(0, 1),
                targets[starts[b] : starts[b] + target_lengths[b]][None],
                input_lengths[b : b + 1],
                target_lengths[b : b + 1],
                reduction="sum",
            )
            assert losses[b, layer].item() == pytest.approx(one.item() / input_lengths[b].item(), rel=1e-5)
