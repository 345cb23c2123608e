"""Feature interventions: layer schedules, steering (forward and cached generation), rescaling against an
explicit per-token computation, hook cleanup and the user errors."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.flow.interventions import (
    SCHEDULES,
    SteeringTerm,
    feature_direction,
    layer_strengths,
    rescale,
    steer,
    steering_terms,
)
from interlayer.models import LoadedModel, load_model
from interlayer.sae import JumpReLUConfig, JumpReLUSAE, SparseAutoencoder, TopKConfig, TopKSAE
from interlayer.sae.base import DenseEncoderSAE
from interlayer.sites import capture, resolve_sites

D, F = 32, 64
TEXTS = ["The cat sat on the mat and looked at the door.", "Steering vectors move the residual stream."]


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(str(tiny_models["llama"]))


def batch(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return dict(lm.tokenizer(TEXTS, return_tensors="pt", padding=True))


def topk_sae(site: str, seed: int = 0) -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=D, latents=F, k=4, site=site))
    sae.initialise_(torch.Generator().manual_seed(seed))
    return sae


def distorted(sae: DenseEncoderSAE, seed: int) -> DenseEncoderSAE:
    """``sae`` with an encoder unlike its decoder, decoder rows of norm 2 and a bias, so that removing a·v
    leaves a non-trivial activation and the raw (not unit) decoder row matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc_FD.add_(0.7 * torch.randn(F, D, generator=g))
        sae.W_dec_FD.mul_(2.0)
        sae.b_dec_D.copy_(0.01 * torch.randn(D, generator=g))
    return sae


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def site_value(lm: LoadedModel, site: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with capture(lm.model, resolve_sites(lm.model, site)) as acts:
        lm.model(**inputs)
    return acts[site]


@torch.no_grad()
def logits(lm: LoadedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return lm.model(**inputs).logits


# ---- schedules ---------------------------------------------------------------------------------------------


def test_layer_strengths_follow_each_schedule() -> None:
    assert layer_strengths(3.0, [2, 3, 4]) == [3.0, 3.0, 3.0]
    assert layer_strengths(3.0, [2, 3, 4], "linear") == pytest.approx([3.0, 2.0, 1.0])
    assert layer_strengths(5.0, [0, 1, 2, 3, 4], "linear", end_strength=0.0) == pytest.approx(
        [5, 3.75, 2.5, 1.25, 0]
    )
    assert layer_strengths(3.0, [7], "linear") == [3.0]
    assert layer_strengths(2.0, [1, 2, 4], "exponential") == pytest.approx(
        [2.0, 2.0 * math.exp(-0.05), 2.0 * math.exp(-0.15)]
    )
    assert layer_strengths(2.0, [1, 2], "exponential", alpha=0.5) == pytest.approx([2.0, 2.0 * math.exp(0.5)])
    assert layer_strengths(2.0, [3, 3, 4], "linear") == pytest.approx([2.0, 2.0, 1.0])  # repeated layer


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_total_strengths_sum_to_the_strength(schedule: str) -> None:
    spread = layer_strengths(6.0, [0, 1, 2, 3], schedule, total=True)
    assert math.fsum(spread) == pytest.approx(6.0, abs=1e-12)
    raw = layer_strengths(6.0, [0, 1, 2, 3], schedule)
    assert [s / r for s, r in zip(spread, raw, strict=True)] == pytest.approx([spread[0] / raw[0]] * 4)
    assert layer_strengths(6.0, [5], schedule, total=True) == [6.0]
    assert layer_strengths(6.0, [0, 1, 2, 3], "constant", total=True) == [1.5] * 4


def test_layer_strengths_reject_bad_schedules_and_ranges() -> None:
    with pytest.raises(
        UserError, match="unknown schedule 'cosine'; valid schedules: constant, linear, exponential"
    ):
        layer_strengths(1.0, [0, 1], "cosine")
    with pytest.raises(UserError, match=r"must go up from l_start to l_end, got \[3, 1\]"):
        layer_strengths(1.0, [3, 1])
    with pytest.raises(UserError, match="no layers"):
        layer_strengths(1.0, [])
    with pytest.raises(UserError, match="sum to 0"):
        layer_strengths(-1.0, [0, 1, 2], "linear", total=True)  # -1, 0, 1


def test_steering_terms_spread_the_strength_over_the_chain() -> None:
    saes = {f"layers.{n}": topk_sae(f"layers.{n}", seed=n) for n in range(3)}
    with torch.no_grad():
        saes["layers.1"].W_dec_FD.mul_(3.0)  # directions are unit whatever the row norm
    chain = [("layers.0", 5), ("layers.1", 9), ("layers.2", 63)]
    terms = steering_terms(saes, chain, 4.0, "exponential", alpha=-0.5, total=True)
    assert [t.site for t in terms] == ["layers.0", "layers.1", "layers.2"]
    expected = layer_strengths(4.0, [0, 1, 2], "exponential", alpha=-0.5, total=True)
    assert [t.strength for t in terms] == pytest.approx(expected)
    for term, (site, feature) in zip(terms, chain, strict=True):
        row_D = saes[site].W_dec_FD[feature].detach()
        torch.testing.assert_close(term.direction_D, row_D / row_D.norm())
        assert float(term.direction_D.norm()) == pytest.approx(1.0, abs=1e-6)


# ---- steering ----------------------------------------------------------------------------------------------


def test_steer_adds_the_vector_at_every_token_and_cleans_up(llama: LoadedModel) -> None:
    inputs = batch(llama)
    clean_h = site_value(llama, "layers.1", inputs)
    clean_logits = logits(llama, inputs)
    v_D = feature_direction(topk_sae("layers.1"), 7)
    with steer(llama.model, [SteeringTerm("layers.1", v_D, 2.5)]):
        steered_h = site_value(llama, "layers.1", inputs)
        steered_logits = logits(llama, inputs)
    torch.testing.assert_close(steered_h, clean_h + 2.5 * v_D, atol=1e-5, rtol=0)
    assert (steered_logits - clean_logits).abs().amax() > 1e-3
    assert torch.equal(logits(llama, inputs), clean_logits)
    assert no_hooks(llama.model)


def test_steer_removes_its_hooks_when_the_body_raises(llama: LoadedModel) -> None:
    inputs = batch(llama)
    clean_logits = logits(llama, inputs)
    terms = [SteeringTerm("layers.1", feature_direction(topk_sae("layers.1"), 3), 5.0)]
    with pytest.raises(RuntimeError, match="inside"), steer(llama.model, terms):
        logits(llama, inputs)
        raise RuntimeError("inside")
    assert no_hooks(llama.model)
    assert torch.equal(logits(llama, inputs), clean_logits)


def test_terms_sharing_a_site_add_up(llama: LoadedModel) -> None:
    inputs = batch(llama)
    sae = topk_sae("embed")
    v1_D, v2_D = feature_direction(sae, 1), feature_direction(sae, 2)
    clean_h = site_value(llama, "embed", inputs)
    terms = [SteeringTerm("embed", v1_D, 1.5), SteeringTerm("embed", v2_D, -4.0)]
    with steer(llama.model, terms):
        steered_h = site_value(llama, "embed", inputs)
    torch.testing.assert_close(steered_h, clean_h + 1.5 * v1_D - 4.0 * v2_D, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "opt", "bert"])
def test_steer_at_a_module_site(tiny_models: dict[str, Path], family: str) -> None:
    """MLP outputs too, including OPT's flattened fc2 and BERT's post-LN output projection."""
    lm = load_model(str(tiny_models[family]))
    inputs = batch(lm)
    v_D = feature_direction(topk_sae("layers.1.mlp"), 11)
    clean_h = site_value(lm, "layers.1.mlp", inputs)
    with steer(lm.model, [SteeringTerm("layers.1.mlp", v_D, 3.0)]):
        steered_h = site_value(lm, "layers.1.mlp", inputs)
    torch.testing.assert_close(steered_h, clean_h + 3.0 * v_D, atol=1e-5, rtol=0)
    assert no_hooks(lm.model)


def test_steer_moves_the_direction_to_the_site_dtype(tiny_models: dict[str, Path]) -> None:
    lm = load_model(str(tiny_models["llama"]))
    lm.model.double()
    inputs = batch(lm)
    v_D = feature_direction(topk_sae("layers.0"), 4)  # float32
    clean_h = site_value(lm, "layers.0", inputs)
    with steer(lm.model, [SteeringTerm("layers.0", v_D, 2.0)]):
        steered_h = site_value(lm, "layers.0", inputs)
    assert steered_h.dtype == torch.float64
    torch.testing.assert_close(steered_h, clean_h + 2.0 * v_D.double(), atol=1e-12, rtol=0)


# ---- generation --------------------------------------------------------------------------------------------


@torch.no_grad()
def cached_greedy(lm: LoadedModel, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = lm.model.generate(  # type: ignore[operator]  # transformers types generate loosely
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    return out[0, ids.shape[1] :]


@torch.no_grad()
def uncached_greedy(lm: LoadedModel, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """A full forward pass over the whole sequence at every step."""
    for _ in range(new_tokens):
        next_id = lm.model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[0, -new_tokens:]


def test_cached_generation_is_steered_like_full_forward_passes(llama: LoadedModel) -> None:
    ids = llama.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    terms = [SteeringTerm("layers.1", feature_direction(topk_sae("layers.1"), 7), 50.0)]
    plain = cached_greedy(llama, ids, 5)
    with steer(llama.model, terms):
        steered = cached_greedy(llama, ids, 5)
        reference = uncached_greedy(llama, ids, 5)
    assert steered.tolist() == reference.tolist()
    assert steered.tolist() != plain.tolist()
    assert no_hooks(llama.model)


# ---- rescaling ---------------------------------------------------------------------------------------------


def slow_activation(sae: DenseEncoderSAE, x_D: torch.Tensor, feature: int) -> float:
    """Feature ``feature``'s code of one token, latent by latent from the architecture's definition."""
    W_enc_FD, b_enc_F = sae.W_enc_FD.detach(), sae.b_enc_F.detach()
    pre_F = torch.stack([W_enc_FD[i] @ (x_D - sae.b_dec_D.detach()) + b_enc_F[i] for i in range(F)])
    pre = float(pre_F[feature])
    if isinstance(sae, TopKSAE):
        kept = int((pre_F > pre_F[feature]).sum()) < sae.cfg.k
        return max(pre, 0.0) if kept else 0.0
    assert isinstance(sae, JumpReLUSAE)
    return pre if pre > float(sae.threshold_F[feature].detach()) else 0.0


def removed(sae: DenseEncoderSAE, h_BTD: torch.Tensor, feature: int, r: float) -> torch.Tensor:
    """h + (r − 1)·a·v, token by token."""
    out_BTD = h_BTD.clone()
    v_D = sae.W_dec_FD[feature].detach()
    for b in range(h_BTD.shape[0]):
        for t in range(h_BTD.shape[1]):
            out_BTD[b, t] = h_BTD[b, t] + (r - 1) * slow_activation(sae, h_BTD[b, t], feature) * v_D
    return out_BTD


def busiest_feature(sae: SparseAutoencoder, h_BTD: torch.Tensor) -> int:
    with torch.no_grad():
        return int((sae.encode(h_BTD) > 0).sum((0, 1)).argmax())


def jumprelu_sae(site: str) -> JumpReLUSAE:
    sae = JumpReLUSAE(JumpReLUConfig(d_in=D, latents=F, site=site, initial_threshold=0.005))
    sae.initialise_(torch.Generator().manual_seed(0))
    return sae


@pytest.mark.parametrize("make_sae", [topk_sae, jumprelu_sae], ids=["topk", "jumprelu"])
def test_rescale_to_zero_matches_the_explicit_removal(
    llama: LoadedModel, make_sae: Callable[[str], DenseEncoderSAE]
) -> None:
    inputs = batch(llama)
    sae = distorted(make_sae("layers.1"), seed=1)
    h_BTD = site_value(llama, "layers.1", inputs)
    feature = busiest_feature(sae, h_BTD)
    clean_a_BT = sae.encode(h_BTD)[..., feature].detach()
    assert (clean_a_BT > 0).sum() >= 3
    with rescale(llama.model, sae, "layers.1", feature, 0.0):
        h0_BTD = site_value(llama, "layers.1", inputs)
    reference_BTD = removed(sae, h_BTD, feature, 0.0)
    torch.testing.assert_close(h0_BTD, reference_BTD, atol=1e-5, rtol=0)
    a0_BT = sae.encode(h0_BTD)[..., feature].detach()
    slow_a0 = [[slow_activation(sae, x_D, feature) for x_D in row] for row in reference_BTD]
    torch.testing.assert_close(a0_BT, torch.tensor(slow_a0), atol=1e-4, rtol=0)
    assert not torch.allclose(a0_BT, clean_a_BT, atol=1e-3)
    assert no_hooks(llama.model)


def test_rescale_by_one_is_bit_identical(llama: LoadedModel) -> None:
    inputs = batch(llama)
    sae = distorted(topk_sae("layers.1"), seed=2)
    clean = logits(llama, inputs)
    with rescale(llama.model, sae, "layers.1", 0, 1.0):
        assert torch.equal(logits(llama, inputs), clean)


def test_rescale_by_two_adds_the_contribution_once_more(llama: LoadedModel) -> None:
    inputs = batch(llama)
    sae = distorted(topk_sae("layers.1"), seed=3)
    h_BTD = site_value(llama, "layers.1", inputs)
    feature = busiest_feature(sae, h_BTD)
    a_BT = sae.encode(h_BTD)[..., feature].detach()
    clean = logits(llama, inputs)
    with rescale(llama.model, sae, "layers.1", feature, 2.0):
        h2_BTD = site_value(llama, "layers.1", inputs)
        doubled = logits(llama, inputs)
    expected_BTD = h_BTD + a_BT.unsqueeze(-1) * sae.W_dec_FD[feature].detach()
    torch.testing.assert_close(h2_BTD, expected_BTD, atol=1e-6, rtol=0)
    torch.testing.assert_close(h2_BTD, removed(sae, h_BTD, feature, 2.0), atol=1e-5, rtol=0)
    assert (doubled - clean).abs().amax() > 1e-4
    assert torch.equal(logits(llama, inputs), clean)
    assert no_hooks(llama.model)


# ---- user errors -------------------------------------------------------------------------------------------


def test_out_of_range_features_and_unknown_sites_are_user_errors(llama: LoadedModel) -> None:
    sae = topk_sae("layers.1")
    message = "feature 99 is out of range for the SAE at layers.1 (it has 64 features)"
    with pytest.raises(UserError, match=re.escape(message)):
        feature_direction(sae, 99)
    with pytest.raises(UserError, match="feature -1 is out of range"):
        feature_direction(sae, -1)
    with pytest.raises(UserError, match=re.escape(message)):
        steering_terms({"layers.1": sae}, [("layers.1", 99)], 1.0)
    with pytest.raises(UserError, match=re.escape(message)), rescale(llama.model, sae, "layers.1", 99, 0.0):
        pass
    with pytest.raises(UserError, match="no SAE for site layers.2; there are SAEs for: layers.1"):
        steering_terms({"layers.1": sae}, [("layers.2", 0)], 1.0)
    with (
        pytest.raises(UserError, match="unknown site 'layers.9'; valid sites: embed"),
        steer(llama.model, [SteeringTerm("layers.9", feature_direction(sae, 0), 1.0)]),
    ):
        pass
    with (
        pytest.raises(UserError, match="unknown site 'layers.*'"),
        steer(llama.model, [SteeringTerm("layers.*", feature_direction(sae, 0), 1.0)]),
    ):
        pass
    with pytest.raises(UserError, match="unknown site 'resid'"), rescale(llama.model, sae, "resid", 0, 0.0):
        pass
    with (
        pytest.raises(UserError, match=r"has shape \(16,\), but the site has width 32"),
        steer(llama.model, [SteeringTerm("layers.1", torch.ones(16), 1.0)]),
    ):
        pass
    assert no_hooks(llama.model)
