"""SAE Match evaluations: matching score and layer skipping, against hand computations."""

from __future__ import annotations

import pytest
import torch

from interlayer.errors import UserError
from interlayer.flow.evaluate import (
    co_firing,
    consecutive_pairs,
    layer_skipping,
    matching_score,
    model_batches,
    site_activations,
    transfer_codes,
)
from interlayer.flow.match import FeatureMatch, match_features
from interlayer.models import load_model
from interlayer.sae import TopKConfig, TopKSAE
from interlayer.sae.metrics import cosine_sum, next_token_ce_sum, pooled_embedding
from interlayer.sites import capture, resolve_sites, splice


def topk(d: int, site: str, seed: int, latents: int = 64) -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=d, latents=latents, k=4, site=site, model="m"))
    sae.initialise_(torch.Generator().manual_seed(seed))
    return sae.eval().requires_grad_(False)


def permuted_copy(sae: TopKSAE, perm: torch.Tensor, site: str) -> TopKSAE:
    """Feature i of ``sae`` is feature perm[i] of the copy: the same function at another site."""
    out = topk(sae.cfg.d_in, site, 0, sae.cfg.latents)
    with torch.no_grad():
        for name in ("W_enc_FD", "W_dec_FD", "b_enc_F"):
            getattr(out, name)[perm] = getattr(sae, name)
        out.b_dec_D.copy_(sae.b_dec_D)
    return out


def test_co_firing_by_hand() -> None:
    fires_a = torch.tensor([[1, 0], [1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    fires_b = torch.tensor([[0, 1], [1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    # identity: feature 0 fires on t0-2, B's 0 on t1 → 1/3; feature 1 fires on t1,t3, B's 1 on t1 → 1/2
    assert co_firing(fires_a, fires_b, torch.tensor([0, 1]), 1) == pytest.approx((1 / 3 + 1 / 2) / 2)
    # swapped: 0 → B's 1 (t0, t1 of t0-2) = 2/3; 1 → B's 0 (t1, t3) = 1
    assert co_firing(fires_a, fires_b, torch.tensor([1, 0]), 1) == pytest.approx((2 / 3 + 1) / 2)
    assert co_firing(fires_a, fires_b, torch.tensor([1, 0]), 3) == pytest.approx(
        2 / 3
    )  # only feature 0 scored


def test_transfer_codes_places_scaled_codes_at_the_match() -> None:
    z = torch.tensor([[1.0, 2.0, 0.0]])
    out = transfer_codes(z, torch.tensor([2, 0, 1]), torch.tensor([10.0, 0.5, 1.0]))
    assert out.tolist() == [[1.0, 0.0, 10.0]]


def test_a_permuted_copy_scores_one_and_random_pairs_less() -> None:
    a = topk(16, "layers.0", 1)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    b = permuted_copy(a, perm, "layers.1")
    match = match_features(a, b, fold="none")
    assert torch.equal(match.permutation, perm)
    x_ND = torch.randn(500, 16)
    scores = matching_score(a, b, match, x_ND, x_ND)
    assert scores["matching_score"] == pytest.approx(1.0)
    assert scores["random_score"] < 0.3
    with pytest.raises(UserError, match="different tokens"):
        matching_score(a, b, match, x_ND, x_ND[:10])


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_layer_skipping_against_hand_computations(tiny_models, family: str) -> None:
    lm = load_model(str(tiny_models[family]))
    width = lm.d_model
    a = topk(width, "layers.0", 2)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    b = permuted_copy(a, perm, "layers.1")
    match = FeatureMatch(perm, torch.zeros(64), site_a="layers.0", site_b="layers.1")
    batches = list(model_batches(lm, "stdlib:docs", 300, context_len=32, batch_size=4))
    result = layer_skipping(lm, a, b, match, batches)
    key = "delta_ce" if lm.is_causal_lm else "pooled_cosine"
    # decoding the permuted codes with the permuted copy's decoder is the SAE of layer 0 itself
    assert result["permuted"]["ev"] == pytest.approx(result["sae_at_t"]["ev"], abs=1e-6)
    assert result["permuted"][key] == pytest.approx(result["sae_at_t"][key], abs=1e-5)
    # drop_layer, by hand: EV of h_0 against h_1 over kept tokens, and the forward with layers.1 := layers.0
    sites = resolve_sites(lm.model, ["layers.0", "layers.1"])
    h0, h1, ce_clean, ce_drop, count = [], [], 0.0, 0.0, 0
    for batch in batches:
        with capture(lm.model, sites) as acts, torch.no_grad():
            clean = lm.model(**batch.inputs)
        h0.append(acts["layers.0"][batch.keep_BT])
        h1.append(acts["layers.1"][batch.keep_BT])
        replaced = acts["layers.0"]
        with (
            splice(
                lm.model, {sites[1]: lambda h, r=replaced, k=batch.keep_BT: torch.where(k[..., None], r, h)}
            ),
            torch.no_grad(),
        ):
            dropped = lm.model(**batch.inputs)
        if lm.is_causal_lm:
            ce_clean += next_token_ce_sum(clean.logits, batch.inputs["input_ids"], batch.keep_BT)[0]
            ce, n = next_token_ce_sum(dropped.logits, batch.inputs["input_ids"], batch.keep_BT)
            ce_drop, count = ce_drop + ce, count + n
        else:
            mask = batch.inputs["attention_mask"]
            u_clean = pooled_embedding(clean.last_hidden_state, mask)
            ce_drop += cosine_sum(u_clean, pooled_embedding(dropped.last_hidden_state, mask))
            count += u_clean.shape[0]
    x0, x1 = torch.cat(h0).double(), torch.cat(h1).double()
    ev = 1 - (x1 - x0).pow(2).sum() / (x1 - x1.mean(0)).pow(2).sum()
    assert result["drop_layer"]["ev"] == pytest.approx(float(ev), abs=1e-6)
    if lm.is_causal_lm:
        assert result["drop_layer"]["delta_ce"] == pytest.approx((ce_drop - ce_clean) / count, abs=1e-5)
    else:
        assert result["drop_layer"]["pooled_cosine"] == pytest.approx(ce_drop / count, abs=1e-6)
        assert result["drop_layer"]["pooled_cosine"] < 1 - 1e-6


def test_layer_skipping_needs_consecutive_residual_sites(tiny_models) -> None:
    lm = load_model(str(tiny_models["llama"]))
    a, b = topk(lm.d_model, "layers.0", 0), topk(lm.d_model, "layers.2", 1)
    match = FeatureMatch(torch.arange(64), torch.zeros(64))
    with pytest.raises(UserError, match="consecutive residual sites"):
        layer_skipping(lm, a, b, match, [])


def test_site_activations_align_tokens_and_pairs_are_consecutive(tiny_models) -> None:
    lm = load_model(str(tiny_models["llama"]))
    acts = site_activations(
        lm, ["layers.0", "layers.1.mlp"], "stdlib:docs", 100, context_len=32, batch_size=4
    )
    assert acts["layers.0"].shape[0] == acts["layers.1.mlp"].shape[0] >= 100
    sites = ["layers.2", "layers.0", "layers.1", "layers.1.mlp", "layers.2.mlp", "layers.0.attn", "embed"]
    assert consecutive_pairs(sites) == [
        ("embed", "layers.0"),
        ("layers.0", "layers.1"),
        ("layers.1", "layers.2"),
        ("layers.1.mlp", "layers.2.mlp"),
    ]


def test_layer_skipping_transfers_codes_in_the_folded_scale(tiny_models) -> None:
    """B = A's JumpReLU features permuted and rescaled by c (thresholds too: the same function). Decoding A's
    codes with B's decoder needs z·θ^B/θ^A = z·c at π(i); then it is exactly A's own reconstruction."""
    from interlayer.flow.evaluate import scale_ratio
    from interlayer.flow.fold import fold_features
    from interlayer.sae import JumpReLUConfig, JumpReLUSAE

    lm = load_model(str(tiny_models["llama"]))
    d, f = lm.d_model, 64
    g = torch.Generator().manual_seed(4)
    a = JumpReLUSAE(JumpReLUConfig(d_in=d, latents=f, site="layers.0", model="m"))
    a.initialise_(g)
    b = JumpReLUSAE(JumpReLUConfig(d_in=d, latents=f, site="layers.1", model="m"))
    perm, c_F = torch.randperm(f, generator=g), (3 * torch.rand(f, generator=g) - 1.5).exp()
    with torch.no_grad():
        a.log_threshold_F.fill_(-3.0)
        b.W_enc_FD[perm], b.b_enc_F[perm] = a.W_enc_FD * c_F[:, None], a.b_enc_F * c_F
        b.W_dec_FD[perm], b.log_threshold_F[perm] = a.W_dec_FD / c_F[:, None], a.log_threshold_F + c_F.log()
        b.b_dec_D.copy_(a.b_dec_D)
    a, b = a.eval().requires_grad_(False), b.eval().requires_grad_(False)
    match = match_features(a, b)
    assert torch.equal(match.permutation, perm)
    ratio_F = scale_ratio(fold_features(a).scale_F, fold_features(b).scale_F, match.permutation)
    assert torch.allclose(ratio_F, c_F, rtol=1e-5)
    batches = list(model_batches(lm, "stdlib:docs", 200, context_len=32, batch_size=4))
    folded = layer_skipping(lm, a, b, match, batches, ratio_F)
    assert folded["permuted"]["ev"] == pytest.approx(folded["sae_at_t"]["ev"], abs=1e-5)
    raw = layer_skipping(lm, a, b, match, batches)  # without the ratio the scales are wrong
    assert abs(raw["permuted"]["ev"] - raw["sae_at_t"]["ev"]) > 1e-2
