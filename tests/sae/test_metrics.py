"""SAE metrics against slow references computed on the whole set at once (float64), and known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from interlayer.sae.architectures import build_sae
from interlayer.sae.evaluate import reconstruction_sweep
from interlayer.sae.features import TopContexts
from interlayer.sae.metrics import (
    ReconstructionMetrics,
    cosine_sum,
    kl_sum,
    next_token_ce_sum,
    pooled_embedding,
)
from interlayer.sae.topk import TopKConfig

SIZES = (7, 23, 11, 19)  # uneven batches, 60 tokens in all
N, D, LAT = sum(SIZES), 8, 10


def make_set(seed: int = 0, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (float32, with a non-zero mean), a noisy reconstruction, and codes with planned firing counts.

    Firing counts per latent over the 60 tokens: 0 (dead), 0 (dead), 6 (= 10%: not dense), 7 (dense),
    60 (dense), and the rest random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g) * torch.linspace(0.5, 3.0, D) + offset + torch.arange(D).float()
    x_hat = x + 0.3 * torch.randn(N, D, generator=g)
    z = torch.zeros(N, LAT)
    rows = torch.randperm(N, generator=g)
    z[rows[:6], 2] = 1.5
    z[rows[10:17], 3] = 0.25
    z[:, 4] = torch.rand(N, generator=g) + 0.1
    for f in range(5, LAT):
        fire = torch.rand(N, generator=g) < 0.05 * f
        z[fire, f] = torch.rand(int(fire.sum()), generator=g) + 0.5
    return x, x_hat, z


def accumulate(x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> ReconstructionMetrics:
    metrics = ReconstructionMetrics(LAT)
    start = 0
    for size in SIZES:
        metrics.update(x[start : start + size], x_hat[start : start + size], z[start : start + size])
        start += size
    return metrics


def reference(x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> dict[str, float]:
    x, x_hat = x.double(), x_hat.double()
    err = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    ev = float(1 - err / total)
    legacy, start = [], 0
    for size in SIZES:
        xb, xhb = x[start : start + size], x_hat[start : start + size]
        mean_b = xb.mean(0)
        for t in range(size):
            legacy.append(1 - float(((xb[t] - xhb[t]) ** 2).sum()) / float(((xb[t] - mean_b) ** 2).sum()))
        start += size
    fires = (z != 0).sum(0)
    return {
        "tokens": N,
        "explained_variance": ev,
        "fvu": 1 - ev,
        "ev_legacy_per_token": sum(legacy) / len(legacy),
        "mse": float(err) / N,
        "l0": float((z != 0).sum()) / N,
        "dead_latents": int((fires == 0).sum()),
        "dead_fraction": float((fires == 0).sum()) / LAT,
        "dense_latents": int((fires.double() / N > 0.1).sum()),
    }


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_reconstruction_metrics_match_reference(offset: float) -> None:
    x, x_hat, z = make_set(offset=offset)
    got = accumulate(x, x_hat, z).result()
    want = reference(x, x_hat, z)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # the planted firing counts: latents 0, 1 dead; latent 2 at exactly 10% is not dense; 3, 4 are dense
    assert got["dead_latents"] == 2
    fires = (z != 0).sum(0)
    assert fires[2] == 6 and fires[3] == 7
    assert got["dense_latents"] == int((fires > 6).sum())
    # pooled EV differs from the per-token legacy ratio (the test would not tell them apart otherwise)
    assert abs(got["explained_variance"] - got["ev_legacy_per_token"]) > 1e-3
    torch.testing.assert_close(accumulate(x, x_hat, z).frequencies_F, fires.double() / N, rtol=0, atol=1e-15)


def test_ev_uses_global_mean_not_batch_means() -> None:
    """Batches with very different means: the pooled EV must use the mean of the whole set."""
    x, x_hat, z = make_set(1)
    start = 0
    for i, size in enumerate(SIZES):  # shift each batch by its own constant
        x[start : start + size] += 20.0 * i
        x_hat[start : start + size] += 20.0 * i
        start += size
    got = accumulate(x, x_hat, z).result()
    want = reference(x, x_hat, z)
    assert got["explained_variance"] == pytest.approx(want["explained_variance"], rel=1e-10)
    # with per-batch means the denominator would be much smaller, giving a much lower EV
    per_batch_total, start = 0.0, 0
    for size in SIZES:
        xb = x[start : start + size].double()
        per_batch_total += float(((xb - xb.mean(0)) ** 2).sum())
        start += size
    err = float(((x.double() - x_hat.double()) ** 2).sum())
    assert got["explained_variance"] - (1 - err / per_batch_total) > 0.01


def test_ev_known_answers() -> None:
    x, _, z = make_set(2)
    perfect = accumulate(x, x.clone(), z).result()
    assert perfect["explained_variance"] == 1.0
    assert perfect["fvu"] == 0.0 and perfect["mse"] == 0.0
    assert perfect["ev_legacy_per_token"] == pytest.approx(1.0, abs=1e-12)
    mean_hat = x.double().mean(0).expand(N, D).float()
    at_mean = accumulate(x, mean_hat, z).result()
    assert at_mean["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert at_mean["fvu"] == pytest.approx(1.0, abs=1e-6)


def test_next_token_ce_sum_matches_cross_entropy() -> None:
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 9, 17
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    keep = torch.rand(B, T, generator=g) > 0.3
    keep[0, 0] = True  # position 0 is never a target even when kept
    total, count = next_token_ce_sum(logits, ids, keep)
    mask = keep[:, 1:]
    want = F.cross_entropy(logits[:, :-1][mask], ids[:, 1:][mask], reduction="sum")
    assert count == int(mask.sum()) and 0 < count < B * (T - 1)
    assert total == pytest.approx(float(want), rel=1e-5)
    # slow loop: −log softmax(logits[b, t])[ids[b, t+1]] over kept targets
    slow = 0.0
    for b in range(B):
        for t in range(T - 1):
            if keep[b, t + 1]:
                p = torch.softmax(logits[b, t].double(), -1)
                slow -= math.log(float(p[ids[b, t + 1]]))
    assert total == pytest.approx(slow, rel=1e-5)


def test_kl_sum() -> None:
    g = torch.Generator().manual_seed(4)
    B, T, V = 2, 7, 11
    clean = torch.randn(B, T, V, generator=g)
    other = clean + 0.7 * torch.randn(B, T, V, generator=g)
    keep = torch.rand(B, T, generator=g) > 0.25
    assert kl_sum(clean, clean.clone(), keep) == 0.0
    # invariant to a per-position constant added to the logits
    assert kl_sum(clean, clean + torch.randn(B, T, 1, generator=g), keep) == pytest.approx(0.0, abs=1e-5)
    slow = 0.0
    for b in range(B):
        for t in range(T - 1):
            if keep[b, t + 1]:
                p = torch.softmax(clean[b, t].double(), -1)
                q = torch.softmax(other[b, t].double(), -1)
                slow += float((p * (p / q).log()).sum())
    got = kl_sum(clean, other, keep)
    assert slow > 0.1
    assert got == pytest.approx(slow, rel=1e-5)
    # and it is KL(clean ‖ other), not the reverse
    assert kl_sum(other, clean, keep) != pytest.approx(slow, rel=1e-3)


def test_pooled_embedding_masked_mean() -> None:
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 6, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    got = pooled_embedding(hidden, mask)
    torch.testing.assert_close(got[0], hidden[0].mean(0))
    torch.testing.assert_close(got[1], hidden[1, :3].mean(0))
    torch.testing.assert_close(got[2], torch.zeros(4))  # no tokens: zero, not NaN
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    slow = sum(float(a[i] @ b[i]) / (float(a[i].norm()) * float(b[i].norm())) for i in range(5))
    assert cosine_sum(a, b) == pytest.approx(slow, rel=1e-5)
    assert cosine_sum(a, 3 * a) == pytest.approx(5.0, rel=1e-6)


def test_top_contexts_keeps_true_top_n() -> None:
    g = torch.Generator().manual_seed(6)
    latents, n = 12, 5
    tops = TopContexts(latents, n)
    all_z, all_where = [], []
    context = 0
    for size in (9, 2, 30, 4, 17):  # a batch smaller than n included
        z = torch.rand(size, latents, generator=g) * (torch.rand(size, latents, generator=g) < 0.4)
        z[:, 0] = 0  # a latent that never fires
        where = torch.stack(
            [torch.arange(context, context + size), torch.randint(0, 50, (size,), generator=g)], 1
        )
        context += size
        tops.update(z, where)
        all_z.append(z)
        all_where.append(where)
    z_all, where_all = torch.cat(all_z), torch.cat(all_where)
    for f in range(latents):
        order = sorted(range(len(z_all)), key=lambda t: float(z_all[t, f]), reverse=True)[:n]
        want = [
            (float(z_all[t, f]), int(where_all[t, 0]), int(where_all[t, 1])) for t in order if z_all[t, f] > 0
        ]
        assert tops.examples(f) == want, f
        torch.testing.assert_close(tops.values_FN[f], z_all[:, f].sort(descending=True).values[:n])
    assert tops.examples(0) == []
    assert sum(len(tops.examples(f)) == n for f in range(latents)) >= latents - 2


def test_reconstruction_sweep_matches_manual_ev() -> None:
    sae = build_sae(TopKConfig(d_in=D, latents=32, k=4))
    sae.initialise_(torch.Generator().manual_seed(7))
    sae.requires_grad_(False)  # as load_sae returns it
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(8))
    points = reconstruction_sweep(sae, x, [1, 4, 8])
    for (l0, ev), k in zip(points, [1, 4, 8], strict=True):
        with torch.no_grad():
            z = sae.encode(x, k=k)
            x_hat = sae.decode(z)
        want_ev = 1 - float(((x - x_hat).double() ** 2).sum() / ((x - x.mean(0)).double() ** 2).sum())
        assert l0 == pytest.approx(float((z != 0).sum()) / 50)
        assert ev == pytest.approx(want_ev, rel=1e-6, abs=1e-9)
    assert points[0][0] < points[1][0] < points[2][0]
