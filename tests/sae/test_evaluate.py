"""Downstream metrics agree with a manual splice: the CE that ``evaluate_saes`` reports is the CE of the model
run with the SAE's reconstruction written into the site at kept positions."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from interlayer.data import Document, token_batches
from interlayer.models import load_model
from interlayer.sae import TopKConfig, TopKSAE
from interlayer.sae.evaluate import evaluate_saes
from interlayer.sites import capture, resolve_sites, splice

TEXT = "Return the list of items sorted by key, breaking ties by their original order in the input. " * 40


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT.upper())
    return tmp_path


def random_sae(width: int, site: str) -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=width, latents=48, k=6, site=site))
    sae.initialise_(torch.Generator().manual_seed(1))
    return sae.eval().requires_grad_(False)


def manual_ce(logits_BTV, input_ids_BT, keep_BT):
    targets = input_ids_BT[:, 1:][keep_BT[:, 1:]]
    return float(F.cross_entropy(logits_BTV[:, :-1][keep_BT[:, 1:]].float(), targets))


@torch.no_grad()
def test_spliced_ce_matches_manual_splice(tiny_models, corpus):
    lm = load_model(str(tiny_models["llama"]))
    site = resolve_sites(lm.model, "layers.1")[0]
    sae = random_sae(site.width, site.name)
    evaluation = evaluate_saes(
        lm, {"layers.1": sae}, str(corpus), tokens=10**9, context_len=32, batch_size=1000, split="all"
    )
    metrics = evaluation.metrics("layers.1")

    docs = [Document("a.txt", TEXT), Document("b.txt", TEXT.upper())]
    batch = next(token_batches(lm.tokenizer, docs, 32, 1000))
    assert torch.equal(batch.input_ids_BT, evaluation.input_ids_CT)
    inputs = {"input_ids": batch.input_ids_BT, "attention_mask": batch.attention_mask_BT}
    keep = batch.keep_BT

    def write(fn):
        def replace(t):
            out = t.clone()
            out[keep] = fn(t[keep])
            return out

        return replace

    clean = lm.model(**inputs).logits
    with splice(lm.model, {site: write(sae)}):
        spliced = lm.model(**inputs).logits
    with splice(lm.model, {site: write(torch.zeros_like)}):
        zeroed = lm.model(**inputs).logits
    ce_clean, ce_sae, ce_zero = (manual_ce(x, batch.input_ids_BT, keep) for x in (clean, spliced, zeroed))
    assert metrics["ce_clean"] == pytest.approx(ce_clean, abs=1e-5)
    assert metrics["ce_sae"] == pytest.approx(ce_sae, abs=1e-5)
    assert metrics["ce_zero"] == pytest.approx(ce_zero, abs=1e-5)
    assert metrics["delta_ce"] == pytest.approx(ce_sae - ce_clean, abs=1e-5)
    assert metrics["delta_ce"] != 0
    # CE_zero − CE_clean is small for a random model, so the ratio amplifies float32 rounding in the CEs.
    assert metrics["frac_recovered"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), abs=5e-3)
    p, q = clean[:, :-1].log_softmax(-1), spliced[:, :-1].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)[keep[:, 1:]].mean()
    assert metrics["kl_clean_sae"] == pytest.approx(float(kl), abs=1e-6)
    with capture(lm.model, [site]) as acts:
        lm.model(**inputs)
    x_kept = acts["layers.1"][keep]
    fvu = float((sae(x_kept) - x_kept).pow(2).sum() / (x_kept - x_kept.mean(0)).pow(2).sum())
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-5)


@torch.no_grad()
def test_identity_sae_recovers_everything_on_an_encoder(tiny_models, corpus):
    """An SAE with dictionary [I; −I], k = 2d and no biases reconstructs every input exactly (ReLU(x) − ReLU(−x)
    = x): EV is 1 and the spliced pooled output is the clean one; zeroing the site is checked against a
    manual zero splice of the same batch."""
    lm = load_model(str(tiny_models["bert"]))
    width = lm.d_model
    sae = TopKSAE(TopKConfig(d_in=width, latents=2 * width, k=2 * width))
    eye = torch.eye(width)
    sae.W_enc_FD.copy_(torch.cat([eye, -eye]))
    sae.W_dec_FD.copy_(torch.cat([eye, -eye]))
    sae.b_enc_F.zero_()
    sae.b_dec_D.zero_()
    evaluation = evaluate_saes(
        lm, {"layers.0": sae}, str(corpus), tokens=1, context_len=32, split="all"
    )  # one batch
    metrics = evaluation.metrics("layers.0")
    assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["pooled_cosine_sae"] == pytest.approx(1.0, abs=1e-5)
    assert list(itertools.islice(evaluation.sites, 1)) == ["layers.0"]
    docs = [Document("a.txt", TEXT), Document("b.txt", TEXT.upper())]
    batch = next(token_batches(lm.tokenizer, docs, 32, 16))
    inputs = {"input_ids": batch.input_ids_BT, "attention_mask": batch.attention_mask_BT}
    site = resolve_sites(lm.model, "layers.0")[0]
    clean = lm.model(**inputs).last_hidden_state
    with splice(lm.model, {site: torch.zeros_like}, keep=batch.keep_BT):
        zeroed = lm.model(**inputs).last_hidden_state
    mask = batch.attention_mask_BT[..., None].float()
    u, v = (clean * mask).sum(1) / mask.sum(1), (zeroed * mask).sum(1) / mask.sum(1)
    cos = F.cosine_similarity(u, v, dim=-1)
    assert metrics["pooled_cosine_zero"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert metrics["pooled_cosine_zero"] < 0.999


ARCHS = {
    "topk": {"k": 6},
    "batchtopk": {"k": 6},
    "hierarchical": {"k": 6},
    "matryoshka": {"k": 6, "prefixes": (12, 48)},
    "kron": {"k": 6, "heads": 6, "m": 2, "n": 4},
    "jumprelu": {},
}


@torch.no_grad()
@pytest.mark.parametrize("architecture", list(ARCHS))
def test_every_architecture_is_evaluated_through_its_own_forward(architecture, tiny_models, corpus):
    """EV, L0 and the spliced CE of each architecture against a manual computation with its forward."""
    from interlayer.sae import build_sae, make_config

    lm = load_model(str(tiny_models["llama"]))
    site = resolve_sites(lm.model, "layers.1")[0]
    sae = build_sae(
        make_config(architecture, d_in=site.width, latents=48, site="layers.1", **ARCHS[architecture])
    )
    sae.initialise_(torch.Generator().manual_seed(3))
    if architecture in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.05)  # cuts some positive pre-activations (asserted below)
    sae.eval()
    # TopK-family SAEs at another budget; BatchTopK and Matryoshka by their own threshold (their usual path)
    k = 3 if architecture in ("topk", "hierarchical", "kron") else None
    evaluation = evaluate_saes(
        lm, {"layers.1": sae}, str(corpus), tokens=10**9, context_len=32, batch_size=1000, split="all", k=k
    )
    metrics = evaluation.metrics("layers.1")
    batch = next(
        token_batches(lm.tokenizer, [Document("a.txt", TEXT), Document("b.txt", TEXT.upper())], 32, 1000)
    )
    inputs = {"input_ids": batch.input_ids_BT, "attention_mask": batch.attention_mask_BT}
    with capture(lm.model, [site]) as acts:
        lm.model(**inputs)
    x = acts["layers.1"][batch.keep_BT]
    x_hat, z = sae(x, k=k), sae.encode(x, k=k)
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert metrics["explained_variance"] == pytest.approx(ev, rel=1e-4, abs=1e-5)
    assert metrics["l0"] == pytest.approx(float((z != 0).sum(1).float().mean()), rel=1e-6)
    if k is not None:
        assert metrics["l0"] <= k
    if architecture in ("batchtopk", "matryoshka"):
        pre = sae.pre_activations(x)
        assert 0 < metrics["l0"] < float((pre > 0).sum(1).float().mean())
    with splice(lm.model, {site: lambda t: sae(t, k=k)}, keep=batch.keep_BT):
        spliced = lm.model(**inputs).logits
    assert metrics["ce_sae"] == pytest.approx(manual_ce(spliced, batch.input_ids_BT, batch.keep_BT), abs=1e-5)


@torch.no_grad()
def test_budgets_evaluated_together_match_separate_evaluations(tiny_models, corpus):
    from interlayer.sae.evaluate import evaluate_at_budgets

    lm = load_model(str(tiny_models["llama"]))
    sae = random_sae(32, "layers.1")
    together = evaluate_at_budgets(lm, {"layers.1": sae}, str(corpus), 300, [2, None], 32, 8, "all")
    for k in (2, None):
        alone = evaluate_saes(lm, {"layers.1": sae}, str(corpus), 300, 32, 8, "all", k=k).metrics("layers.1")
        got = together[k].metrics("layers.1")
        assert got.keys() == alone.keys()
        for key, value in alone.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (k, key)
    assert together[2].metrics("layers.1")["l0"] <= 2 < together[None].metrics("layers.1")["l0"]
