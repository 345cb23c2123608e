"""Whole-run summaries of feature flow: the classes of every residual layer and the persistence curves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from interlayer.flow.graph import persistence, site_layer
from interlayer.flow.similarity import FlowThresholds, chance_cosine, layer_flow, source_sites
from interlayer.sae import SparseAutoencoder


def residual_layers(saes: Mapping[str, SparseAutoencoder]) -> list[int]:
    """The layers ≥ 0 with a residual SAE, in order."""
    return sorted(layer for layer, kind in map(site_layer, saes) if kind == "residual" and layer >= 0)


def flow_table(saes: Mapping[str, SparseAutoencoder], thresholds: FlowThresholds) -> list[dict[str, Any]]:
    """Per residual layer with a residual SAE before it: the fraction of its features in each class, and the
    chance level of the top-1 cosine in each source dictionary."""
    rows = []
    for layer in residual_layers(saes):
        if source_sites(layer)["residual"] not in saes:
            continue
        flow = layer_flow(saes, layer, thresholds)
        row: dict[str, Any] = {"site": f"layers.{layer}"} | flow.fractions()
        for kind, site in source_sites(layer).items():
            if site in saes:
                row[f"mean s({kind})"] = float(flow.scores[kind].mean())
                row[f"chance s({kind})"] = chance_cosine(saes[site].W_dec_FD.detach())
        rows.append(row)
    return rows


def persistence_curves(
    saes: Mapping[str, SparseAutoencoder], thresholds: FlowThresholds
) -> dict[str, list[float]]:
    """Start site → persistence curve (:func:`interlayer.flow.graph.persistence`), for every residual layer
    with a later one."""
    layers = residual_layers(saes)
    return {f"layers.{start}": persistence(saes, start, thresholds) for start in layers[:-1]}
