"""Feature flow: top-1 cosines, classes, flow graphs and persistence on dictionaries with a planted history."""

from __future__ import annotations

import json

import pytest
import torch

from interlayer.errors import UserError
from interlayer.flow.graph import flow_graph, parse_feature, persistence, site_layer
from interlayer.flow.similarity import (
    CLASSES,
    FlowThresholds,
    chance_cosine,
    classify,
    layer_flow,
    top_cosines,
    transitions,
)
from interlayer.sae import SparseAutoencoder, TopKConfig, TopKSAE

D, F = 32, 16


def sae_with(W_dec_FD: torch.Tensor, site: str) -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=W_dec_FD.shape[1], latents=W_dec_FD.shape[0], k=2, site=site, model="m"))
    sae.initialise_(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec_FD.copy_(W_dec_FD * 3.0)  # not unit norm: cosines must normalise
    return sae


def planted() -> tuple[dict[str, SparseAutoencoder], torch.Tensor, torch.Tensor]:
    """Residual SAEs at embed, layers.0..3 and module SAEs at layers.1: every residual dictionary is the
    previous one permuted, except that at layers.1 feature 0 is new (born in the MLP, whose dictionary holds
    it) and feature 1 is new and nowhere else (unexplained); at layers.1 feature 2 is also written by the
    attention (processed). Returns the SAEs, the orthonormal basis and the layers.0→layers.1 permutation."""
    g = torch.Generator().manual_seed(0)
    basis_DD = torch.linalg.qr(torch.randn(D, D, generator=g))[0]  # orthonormal: unrelated cosines are 0
    perms = [torch.randperm(F, generator=g) for _ in range(4)]
    rows = basis_DD[:F]
    saes: dict[str, SparseAutoencoder] = {"embed": sae_with(rows, "embed")}
    previous = rows
    for layer in range(4):
        current = torch.empty_like(previous)
        current[perms[layer]] = previous  # feature i of the layer before is feature perms[i] here
        if layer == 1:
            current[0], current[1] = basis_DD[F], basis_DD[F + 1]
        saes[f"layers.{layer}"] = sae_with(current, f"layers.{layer}")
        previous = current
    mlp = basis_DD[F + 2 : F + 2 + F].clone()
    mlp[7] = basis_DD[F]  # the MLP writes layers.1's feature 0
    attn = basis_DD[F + 2 : F + 2 + F].flip(0).clone()
    attn[3] = saes["layers.1"].W_dec_FD[2].detach() / 3  # the attention touches layers.1's feature 2
    saes["layers.1.mlp"] = sae_with(mlp, "layers.1.mlp")
    saes["layers.1.attn"] = sae_with(attn, "layers.1.attn")
    return saes, basis_DD, perms[1]


def test_top_cosines_and_transitions_against_a_dense_reference() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, D, generator=g), torch.randn(50, D, generator=g)
    cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
    values, indices = top_cosines(a, b, k=3, rows_per_block=7)
    ref = cos.topk(3, dim=1)
    assert torch.allclose(values, ref.values, atol=1e-5) and torch.equal(indices, ref.indices)
    T = transitions(a, b, k=3).to_dense()
    want = torch.zeros_like(cos).scatter(1, ref.indices, ref.values).clamp_min(0)
    assert torch.allclose(T, want, atol=1e-5)


def test_classify_each_class() -> None:
    scores = {
        "residual": torch.tensor([0.9, 0.9, 0.2, 0.2]),
        "mlp": torch.tensor([0.1, 0.6, 0.7, 0.1]),
        "attn": torch.tensor([0.0, 0.0, 0.0, 0.14]),
    }
    assert [CLASSES[c] for c in classify(scores)] == ["translated", "processed", "born", "unexplained"]
    assert classify({"residual": torch.tensor([0.6])}, FlowThresholds(residual=0.7)).tolist() == [3]


def test_layer_flow_recovers_the_planted_history() -> None:
    saes, _, perm = planted()
    flow = layer_flow(saes, 1)
    assert [CLASSES[c] for c in flow.classes[:3]] == ["born", "unexplained", "processed"]
    assert torch.equal(flow.classes[3:], torch.zeros(F - 3, dtype=torch.int64))  # translated
    assert float(flow.scores["mlp"][0]) == pytest.approx(1.0, abs=1e-5) and int(flow.best["mlp"][0]) == 7
    # the best residual match of layers.1's feature perm[i] is layers.0's feature i
    for i in range(F):
        if int(perm[i]) >= 3:
            assert int(flow.best["residual"][perm[i]]) == i
    fractions = flow.fractions()
    assert fractions["translated"] == pytest.approx((F - 3) / F)
    assert layer_flow(saes, 0).scores.keys() == {"residual"}  # embed is layers.0's source
    with pytest.raises(UserError, match="needs an SAE at layers.5"):
        layer_flow(saes, 5)


def test_flow_graph_follows_the_chain_and_cuts() -> None:
    saes, basis_DD, _ = planted()
    # a feature of layers.3 that goes back to the embedding: its direction is one of the first F basis rows
    root_feature = int(top_cosines(basis_DD[5:6], saes["layers.3"].W_dec_FD)[1][0, 0])
    graph = flow_graph(saes, parse_feature(f"layers.3:{root_feature}", saes))
    chain = graph.residual_chain()
    assert [n.site for n in chain] == ["embed", "layers.0", "layers.1", "layers.2", "layers.3"]
    for node in chain:  # every node of the chain is the same direction
        row = saes[node.site].W_dec_FD[node.feature].detach()
        assert float(torch.nn.functional.cosine_similarity(row, basis_DD[5], dim=0)) == pytest.approx(
            1.0, abs=1e-5
        )
    assert len(graph.edges) == 4 and all(e.similarity == pytest.approx(1.0, abs=1e-5) for e in graph.edges)
    # the born feature of layers.1 is cut from layers.0 but gets its MLP node; forward it reaches layers.3
    born = flow_graph(saes, parse_feature("layers.1:0", saes))
    assert {n.site for n in born.nodes.values()} == {"layers.1", "layers.1.mlp", "layers.2", "layers.3"}
    assert any(e.source == "layers.1.mlp:7" and e.target == "layers.1:0" for e in born.edges)
    limited = flow_graph(saes, parse_feature("layers.1:0", saes), layers_forward=1)
    assert {n.site for n in limited.nodes.values()} == {"layers.1", "layers.1.mlp", "layers.2"}
    # a module root continues into its residual layer
    module_root = flow_graph(saes, parse_feature("layers.1.mlp:7", saes), layers_forward=0)
    assert [(e.source, e.target) for e in module_root.edges] == [("layers.1.mlp:7", "layers.1:0")]
    exported = json.loads(json.dumps(graph.to_json()))
    assert exported["root"] == f"layers.3:{root_feature}" and len(exported["nodes"]) == 5


def test_persistence_of_the_planted_chain() -> None:
    saes, _, _ = planted()
    # from layers.0, two of the F features (those replaced at layers.1) stop there; the rest persist
    assert persistence(saes, 0) == pytest.approx([1.0, (F - 2) / F, (F - 2) / F, (F - 2) / F])
    assert persistence(saes, 2) == pytest.approx([1.0, 1.0])


def test_chance_cosine_matches_random_dictionaries() -> None:
    g = torch.Generator().manual_seed(2)
    level = chance_cosine(torch.randn(2048, 384, generator=g))
    assert 0.17 < level < 0.27  # √(2 ln 2048 / 384) ≈ 0.2


def test_bad_features_and_sites() -> None:
    saes, _, _ = planted()
    with pytest.raises(UserError, match="out of range for the SAE at layers.2"):
        parse_feature("layers.2:16", saes)
    with pytest.raises(UserError, match="no SAE for site layers.7"):
        parse_feature("layers.7:1", saes)
    with pytest.raises(UserError, match="SITE:INDEX"):
        parse_feature("layers.2", saes)
    with pytest.raises(UserError, match="not a residual"):
        site_layer("layers.2.ln")
