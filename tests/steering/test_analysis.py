"""Tests for interlayer.steering.analysis and its report sections: each number against a slow, obvious reference
computed here with plain loops and hand-written hooks on tiny random models."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import LAYERS

from interlayer.errors import UserError
from interlayer.models import LoadedModel, load_model
from interlayer.report.html import render_page
from interlayer.sites import capture, resolve_sites
from interlayer.steering.analysis import (
    LensResult,
    logit_lens,
    path_patching,
    path_patching_logits,
    persistence,
    token_substitution,
)
from interlayer.steering.analysis_report import analysis_sections
from interlayer.steering.vectors import SteeringVectors

LENGTHS = (10, 7, 5)
"""Real tokens per row of the test batch (right padding)."""
STARTS = [4, 3, 4]
"""Where each row's completion starts (row 2 has one completion token only)."""


@pytest.fixture(scope="module")
def loaded(tiny_models: dict[str, Path]) -> Callable[[str], LoadedModel]:
    cache: dict[str, LoadedModel] = {}

    def get(family: str) -> LoadedModel:
        if family not in cache:
            cache[family] = load_model(str(tiny_models[family]))
        return cache[family]

    return get


def random_vectors(model: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> SteeringVectors:
    vectors = SteeringVectors.zeros(model, "layers.*")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vectors.S.copy_(scale * torch.randn(vectors.S.shape, generator=generator))
    return vectors


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(1000, 2000, (len(LENGTHS), max(LENGTHS)), generator=generator)
    mask_BT = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return ids_BT.masked_fill(mask_BT == 0, 0), mask_BT


def logits(model: torch.nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_lens_matches_a_per_row_loop(loaded: Callable[[str], LoadedModel], family: str) -> None:
    lm = loaded(family)
    vectors = random_vectors(lm.model)
    results = logit_lens(lm.model, lm.tokenizer, vectors, top=5)
    W_U_VD = lm.model.get_output_embeddings().weight.double()
    assert [r.site for r in results] == [f"layers.{n}" for n in range(LAYERS)]
    for result, s_D in zip(results, vectors.S.detach().double(), strict=True):
        full_V = torch.nn.functional.cosine_similarity(W_U_VD, s_D[None, :], dim=1)
        assert result.top_ids[0] == int(full_V.argmax()) and result.bottom_ids[0] == int(full_V.argmin())
        assert result.top_cosines == sorted(result.top_cosines, reverse=True)
        assert result.bottom_cosines == sorted(result.bottom_cosines)
        assert result.top_tokens[0] == lm.tokenizer.decode([result.top_ids[0]])
        assert result.norm == pytest.approx(float(s_D.norm()), rel=1e-6)
        for token, cosine in [
            (result.top_ids[0], result.top_cosines[0]),
            (result.bottom_ids[2], result.bottom_cosines[2]),
            (7, None),
        ]:
            row_D = W_U_VD[token]
            reference = float(row_D @ s_D) / (float(row_D.norm()) * float(s_D.norm()))
            assert float(full_V[token]) == pytest.approx(reference, abs=1e-12)
            if cosine is not None:
                assert cosine == pytest.approx(reference, abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "falcon"])
def test_persistence_is_exact_at_the_insertion_site_and_matches_a_loop(
    loaded: Callable[[str], LoadedModel], family: str
) -> None:
    lm = loaded(family)
    vectors = random_vectors(lm.model)
    ids_BT, mask_BT = batch()
    curves = persistence(lm.model, vectors, ids_BT, mask_BT)
    for layer, (curve, s_D) in enumerate(zip(curves, vectors.S.detach(), strict=True)):
        assert (curve.site, curve.layer, curve.layers) == (
            f"layers.{layer}",
            layer,
            list(range(layer, LAYERS)),
        )
        assert curve.cos_with_vector[0] == pytest.approx(1.0, abs=1e-5)  # Δh_ℓ = s at every token
        assert curve.cos_with_mean[0] == pytest.approx(1.0, abs=1e-5)
        assert curve.delta_norm[0] == pytest.approx(float(s_D.norm()), rel=1e-4)
    # the first vector's effect at the last layer, token by token
    last = resolve_sites(lm.model, f"layers.{LAYERS - 1}")
    with torch.no_grad(), capture(lm.model, last) as vanilla:
        lm.model(input_ids=ids_BT, attention_mask=mask_BT)
    with torch.no_grad(), vectors.only("layers.0").applied(lm.model), capture(lm.model, last) as steered:
        lm.model(input_ids=ids_BT, attention_mask=mask_BT)
    deltas = [
        steered[last[0].name][b, t] - vanilla[last[0].name][b, t]
        for b in range(len(LENGTHS))
        for t in range(LENGTHS[b])
    ]
    mean_D = torch.stack(deltas).mean(dim=0)
    s_D = vectors.S.detach()[0]
    cos = torch.nn.functional.cosine_similarity
    assert curves[0].cos_with_vector[-1] == pytest.approx(
        sum(float(cos(d, s_D, dim=0)) for d in deltas) / len(deltas), abs=1e-5
    )
    assert curves[0].cos_with_mean[-1] == pytest.approx(
        sum(float(cos(d, mean_D, dim=0)) for d in deltas) / len(deltas), abs=1e-5
    )
    assert curves[0].delta_norm[-1] == pytest.approx(
        sum(float(d.norm()) for d in deltas) / len(deltas), rel=1e-5
    )


def test_a_zero_vector_changes_nothing(loaded: Callable[[str], LoadedModel]) -> None:
    lm = loaded("llama")
    vectors = random_vectors(lm.model, scale=0.0)
    ids_BT, mask_BT = batch()
    for curve in persistence(lm.model, vectors, ids_BT, mask_BT):
        assert curve.delta_norm == [0.0] * len(curve.layers) and curve.cos_with_vector == [0.0] * len(
            curve.layers
        )
    result = path_patching(lm.model, vectors, ids_BT, mask_BT)
    assert result.mean_kl == {"none": 0.0, "mlp": 0.0, "residual": 0.0, "both": 0.0}
    assert result.fraction_removed == {"mlp": None, "residual": None, "both": None}
    substitution = token_substitution(lm.model, lm.tokenizer, vectors, ids_BT, mask_BT, STARTS)
    assert substitution.mean_tv_first == 0.0 and substitution.mean_rise_rest == 0.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_token_substitution_matches_explicit_probability_changes(
    loaded: Callable[[str], LoadedModel], family: str
) -> None:
    lm = loaded(family)
    vectors = random_vectors(lm.model, scale=5.0)
    ids_BT, mask_BT = batch()
    result = token_substitution(lm.model, lm.tokenizer, vectors, ids_BT, mask_BT, STARTS, top=3)
    assert result.site == f"layers.{LAYERS - 1}"  # the last layer's vector by default
    vanilla_BTV = logits(lm.model, ids_BT, mask_BT)
    with vectors.only(result.site).applied(lm.model):
        steered_BTV = logits(lm.model, ids_BT, mask_BT)
    expected, first_deltas = [], []
    tv: dict[bool, list[float]] = {True: [], False: []}
    for b, start in enumerate(STARTS):
        for t in range(start, LENGTHS[b]):  # completion token t is predicted by logits row t - 1
            delta_V = steered_BTV[b, t - 1].softmax(-1) - vanilla_BTV[b, t - 1].softmax(-1)
            expected.append((b, t, t == start, int(delta_V.argmax()), float(delta_V.max())))
            tv[t == start].append(0.5 * float(delta_V.abs().sum()))
            if t == start:
                first_deltas.append(delta_V)
    got = [(p.row, p.position, p.first, p.token_id, p.rise) for p in result.per_position]
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    assert [g[4] for g in got] == pytest.approx([e[4] for e in expected], abs=1e-6)
    assert (result.num_first, result.num_rest) == (len(STARTS), sum(LENGTHS) - sum(STARTS) - len(STARTS))
    assert result.mean_tv_first == pytest.approx(sum(tv[True]) / len(tv[True]), abs=1e-6)
    assert result.mean_tv_rest == pytest.approx(sum(tv[False]) / len(tv[False]), abs=1e-6)
    counts = Counter(e[3] for e in expected)
    assert {c.token_id: c.count for c in result.counts_all} == {
        i: counts[i] for i in [c.token_id for c in result.counts_all]
    }
    assert [c.count for c in result.counts_all] == sorted(counts.values(), reverse=True)[:3]
    assert sum(c.count for c in result.counts_first) <= len(STARTS)
    assert result.first_mean_rise[0].token_id == int(torch.stack(first_deltas).mean(dim=0).argmax())


def test_token_substitution_refuses_bad_completion_starts(loaded: Callable[[str], LoadedModel]) -> None:
    lm = loaded("gpt2")
    vectors = random_vectors(lm.model)
    ids_BT, mask_BT = batch()
    for starts in ([0, 3, 4], [4, 3, 5], [4, 3]):  # no prompt token; row 2 has no token 5; one entry short
        with pytest.raises(UserError):
            token_substitution(lm.model, lm.tokenizer, vectors, ids_BT, mask_BT, starts)
    with pytest.raises(UserError, match="no steering vector at site"):
        token_substitution(
            lm.model, lm.tokenizer, vectors.only("layers.0"), ids_BT, mask_BT, STARTS, site="layers.2"
        )


def test_path_patching_routes_match_hand_written_hooks_on_llama(loaded: Callable[[str], LoadedModel]) -> None:
    lm = loaded("llama")
    model, vectors = lm.model, random_vectors(lm.model, scale=3.0)
    ids_BT, mask_BT = batch()
    runs = path_patching_logits(model, vectors, ids_BT, mask_BT)  # vector at layers.1, block 2
    block = model.model.layers[LAYERS - 1]
    steer = vectors.only(f"layers.{LAYERS - 2}")
    kept: dict[str, torch.Tensor] = {}

    def keep_attn(name: str) -> Callable:
        def hook(_m: torch.nn.Module, _args: tuple, output: tuple) -> None:
            kept[name] = output[0].clone()

        return hook

    def keep_input(_m: torch.nn.Module, args: tuple) -> None:
        kept["h_in"] = args[0].clone()  # the block's residual input (steered: includes the vector)

    handle = block.self_attn.register_forward_hook(keep_attn("a_v"))
    assert torch.equal(runs["vanilla"], logits(model, ids_BT, mask_BT))
    handle.remove()
    handles = [
        block.self_attn.register_forward_hook(keep_attn("a_s")),
        block.register_forward_pre_hook(keep_input),
    ]
    with steer.applied(model):
        assert torch.equal(runs["none"], logits(model, ids_BT, mask_BT))  # no patch: the steered run itself
    for h in handles:
        h.remove()

    def run(attn_out: torch.Tensor | None, mlp_in: torch.Tensor | None) -> torch.Tensor:
        handles = []
        if attn_out is not None:
            handles.append(block.self_attn.register_forward_hook(lambda _m, _a, out: (attn_out, *out[1:])))
        if mlp_in is not None:
            handles.append(block.mlp.register_forward_pre_hook(lambda _m, _a: (mlp_in,)))
        try:
            with steer.applied(model):
                return logits(model, ids_BT, mask_BT)
        finally:
            for h in handles:
                h.remove()

    with torch.no_grad():
        mlp_reads_v = block.post_attention_layernorm(kept["h_in"] + kept["a_v"])
        mlp_reads_s = block.post_attention_layernorm(kept["h_in"] + kept["a_s"])
    assert torch.equal(runs["both"], run(kept["a_v"], None))
    torch.testing.assert_close(runs["mlp"], run(None, mlp_reads_v), rtol=0, atol=1e-6)
    torch.testing.assert_close(runs["residual"], run(kept["a_v"], mlp_reads_s), rtol=0, atol=1e-6)
    assert not torch.equal(runs["mlp"], runs["none"]) and not torch.equal(runs["residual"], runs["both"])


def test_path_patching_scores_are_per_token_kl(loaded: Callable[[str], LoadedModel]) -> None:
    lm = loaded("gpt2")
    vectors = random_vectors(lm.model, scale=3.0)
    ids_BT, mask_BT = batch()
    runs = path_patching_logits(lm.model, vectors, ids_BT, mask_BT)
    result = path_patching(lm.model, vectors, ids_BT, mask_BT)
    assert (result.vector_site, result.block, result.variants) == (
        f"layers.{LAYERS - 2}",
        LAYERS - 1,
        ["none", "mlp", "residual", "both"],
    )
    assert result.positions == list(range(max(LENGTHS)))
    p_BTV = runs["vanilla"].double().softmax(-1)
    for variant in result.variants:
        q_BTV = runs[variant].double().softmax(-1)
        kl = {
            (b, t): float((p_BTV[b, t] * (p_BTV[b, t].log() - q_BTV[b, t].log())).sum())
            for b in range(3)
            for t in range(LENGTHS[b])
        }
        assert result.mean_kl[variant] == pytest.approx(sum(kl.values()) / len(kl), rel=1e-4)
        by_position = [
            sum(v for (b, t), v in kl.items() if t == pos) / sum(1 for key in kl if key[1] == pos)
            for pos in result.positions
        ]
        assert result.kl_by_position[variant] == pytest.approx(by_position, rel=1e-4, abs=1e-9)
    for variant in ("mlp", "residual", "both"):
        assert result.fraction_removed[variant] == pytest.approx(
            1 - result.mean_kl[variant] / result.mean_kl["none"]
        )
    assert result.mean_kl["none"] > 0
    json.dumps(asdict(result))


@pytest.mark.parametrize("family", ["gptj", "falcon"])
def test_in_a_parallel_block_the_mlp_never_reads_the_attention(
    loaded: Callable[[str], LoadedModel], family: str
) -> None:
    lm = loaded(family)
    ids_BT, mask_BT = batch()
    runs = path_patching_logits(lm.model, random_vectors(lm.model, scale=3.0), ids_BT, mask_BT)
    assert torch.equal(runs["mlp"], runs["none"]) and torch.equal(runs["residual"], runs["both"])
    assert not torch.equal(runs["both"], runs["none"])


@pytest.mark.parametrize("family", ["gpt_neox", "opt", "bloom", "gemma2"])
def test_path_patching_is_generic(loaded: Callable[[str], LoadedModel], family: str) -> None:
    """Other layouts (flattened fc2, residual added inside, sandwich norms): no patch is the steered run, and a
    zero vector leaves every variant equal to the vanilla run."""
    lm = loaded(family)
    ids_BT, mask_BT = batch()
    vectors = random_vectors(lm.model)
    runs = path_patching_logits(lm.model, vectors, ids_BT, mask_BT)
    with vectors.only(f"layers.{LAYERS - 2}").applied(lm.model):
        assert torch.equal(runs["none"], logits(lm.model, ids_BT, mask_BT))
    zero = path_patching_logits(lm.model, random_vectors(lm.model, scale=0.0), ids_BT, mask_BT)
    for variant in ("none", "mlp", "residual", "both"):
        assert torch.equal(zero[variant], zero["vanilla"])


def test_path_patching_refuses_a_block_before_the_vector(loaded: Callable[[str], LoadedModel]) -> None:
    lm = loaded("llama")
    ids_BT, mask_BT = batch()
    vectors = random_vectors(lm.model)
    with pytest.raises(UserError, match="block must come after"):
        path_patching(lm.model, vectors, ids_BT, mask_BT, vector_site="layers.1", block=1)
    with pytest.raises(UserError, match="no steering vector at site"):
        path_patching(lm.model, vectors.only("layers.0"), ids_BT, mask_BT)


def test_report_sections_escape_tokens_and_draw_the_curves(loaded: Callable[[str], LoadedModel]) -> None:
    lm = loaded("gpt2")
    vectors = random_vectors(lm.model, scale=3.0)
    ids_BT, mask_BT = batch()
    lens = [
        *logit_lens(lm.model, lm.tokenizer, vectors, top=3),
        LensResult("layers.<x>", 1.0, ["<script>"], [5], [0.5], ["a&b"], [6], [-0.5]),
    ]
    curves = persistence(lm.model, vectors, ids_BT, mask_BT)
    substitution = token_substitution(lm.model, lm.tokenizer, vectors, ids_BT, mask_BT, STARTS)
    patching = path_patching(lm.model, vectors, ids_BT, mask_BT)
    sections = analysis_sections(lens, curves, substitution, patching)
    assert [s.title for s in sections] == [
        "Logit lens of the steering vectors",
        "Persistence of each vector",
        "Token substitution",
        "Path patching",
    ]
    assert all(s.body_html.startswith("<p>") for s in sections)
    assert sections[1].body_html.count("<svg") == 2 and sections[3].body_html.count("<svg") == 1
    page = render_page("analysis", sections)
    assert (
        "<script>" not in page
        and "&lt;script&gt;" in page
        and "layers.&lt;x&gt;" in page
        and "a&amp;b" in page
    )
    assert [s.title for s in analysis_sections(None, curves, None, None)] == ["Persistence of each vector"]
    json.dumps([asdict(substitution), *(asdict(r) for r in lens), *(asdict(c) for c in curves)])
