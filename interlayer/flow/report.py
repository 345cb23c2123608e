"""Report sections for features across layers: flow graphs, where residual features come from, persistence
over depth, and SAE Match scores; and the files ``flow graph`` writes (graph.json, flow.json, report.html)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from interlayer.atomic import write_json
from interlayer.flow.contexts import feature_cards
from interlayer.flow.graph import FlowGraph
from interlayer.flow.similarity import CLASSES, FlowThresholds
from interlayer.flow.summary import flow_table, persistence_curves
from interlayer.models import LoadedModel
from interlayer.report import (
    FeatureCard,
    GraphEdge,
    GraphNode,
    Section,
    flow_graph_html,
    line_plot_svg,
    metrics_table,
    write_report,
)
from interlayer.sae import SparseAutoencoder


def graph_sections(
    graphs: Sequence[FlowGraph], cards: Mapping[tuple[str, int], FeatureCard], thresholds: FlowThresholds
) -> Section:
    """One section drawing every graph (nodes show their cards where given)."""
    parts = [
        f"<p>Nodes are SAE features (residual stream in the middle lane, attention above, MLP below); an edge "
        f"is the cosine of two decoder rows. Residual links need cosine ≥ {thresholds.residual}, module links "
        f"≥ {thresholds.module}. Hover a node for its top contexts; click it for its card.</p>"
    ]
    for flow in graphs:
        nodes = [
            GraphNode(
                n.id,
                n.site,
                n.feature,
                n.layer,
                n.kind,
                cards.get((n.site, n.feature)),
                highlight=n.id == flow.root,
            )
            for n in flow.nodes.values()
        ]
        edges = [GraphEdge(e.source, e.target, e.similarity) for e in flow.edges]
        parts.append(flow_graph_html(nodes, edges, caption=f"flow graph of {flow.root}"))
    return Section("Feature flow graphs", "".join(parts))


def flow_sections(
    saes: Mapping[str, SparseAutoencoder],
    graphs: Sequence[FlowGraph],
    thresholds: FlowThresholds,
    cards: Mapping[tuple[str, int], FeatureCard],
) -> tuple[list[Section], dict[str, Any]]:
    """The graph, class and persistence sections, and what they show as JSON."""
    table = flow_table(saes, thresholds)
    curves = persistence_curves(saes, thresholds)
    sections = [graph_sections(graphs, cards, thresholds)]
    if table:
        intro = (
            "<p>For each feature of the residual SAE at layer L, s(P) is its best decoder cosine in the residual "
            f"SAE at L−1, the MLP-output and the attention-output SAEs at L. Classes: translated (s(R) ≥ "
            f"{thresholds.residual}, modules below {thresholds.module}), processed (both), born in a module (low "
            "s(R), a module high), unexplained (all low). The chance columns give the top-1 cosine that random "
            "directions reach in each dictionary (99th percentile).</p>"
        )
        seen = dict.fromkeys(c for row in table for c in row)  # every layer's sources, in order
        columns = ["site", *CLASSES] + [c for c in seen if c.startswith(("mean", "chance"))]
        sections.append(Section("Where residual features come from", intro + metrics_table(table, columns)))
    if curves:
        series = {
            f"from {site}": [(float(d), v) for d, v in enumerate(curve)] for site, curve in curves.items()
        }
        plot = line_plot_svg(
            series, "layers ahead", f"fraction still matched (cosine ≥ {thresholds.residual})"
        )
        text = (
            "<p>Persistence: the fraction of a layer's residual features whose chain of top-1 decoder matches "
            "forward stays above the residual threshold for that many layers.</p>"
        )
        sections.append(Section("Persistence over depth", text + plot))
    return sections, {"classes": table, "persistence": curves}


def match_section(summary: Mapping[str, Any]) -> Section:
    """SAE Match scores of consecutive pairs and of compositions along the residual stream."""
    rows = []
    for row in summary["pairs"]:
        shown = {k: v for k, v in row.items() if k != "layer_skipping"}
        for variant, values in row.get("layer_skipping", {}).items():
            shown |= {f"{key} ({variant})": value for key, value in values.items()}
        rows.append(shown)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    body = (
        "<p>Each pair of consecutive SAEs is matched by a permutation of features after folding (SAE Match). "
        "Matching score: how often the matched feature fires when the feature fires, against a random "
        "permutation. Layer skipping replaces the hidden state after block t+1 by the SAE of layer t's codes, "
        "permuted and decoded with layer t+1's decoder (permuted), by the state after block t (drop_layer), or "
        "by layer t's own reconstruction (sae_at_t).</p>" + metrics_table(rows, columns)
    )
    compositions = [c for c in summary.get("compositions", []) if "matching_score" in c]
    if compositions:
        by_distance: dict[int, list[tuple[float, float]]] = {}
        for c in compositions:
            by_distance.setdefault(c["distance"], []).append((c["matching_score"], c["random_score"]))
        mean = {
            d: [sum(v) / len(v) for v in zip(*pairs, strict=True)] for d, pairs in sorted(by_distance.items())
        }
        series = {
            "composed permutation": [(float(d), m[0]) for d, m in mean.items()],
            "random permutation": [(float(d), m[1]) for d, m in mean.items()],
        }
        body += (
            "<p>Matching score of permutations composed over several layers, averaged over start layers.</p>"
        )
        body += line_plot_svg(series, "layers apart", "matching score")
    return Section("SAE Match between layers", body)


def write_graph_report(
    out: str | Path,
    saes: Mapping[str, SparseAutoencoder],
    graphs: Sequence[FlowGraph],
    thresholds: FlowThresholds,
    lm: LoadedModel | None = None,
    data: str = "",
    tokens: int = 8_000,
) -> dict[str, Any]:
    """Write graph.json, flow.json and report.html into ``out``; return the summary."""
    out = Path(out)
    cards = {}
    if lm is not None and data:
        nodes = [(n.site, n.feature) for g in graphs for n in g.nodes.values()]
        cards = feature_cards(lm, saes, nodes, data, tokens)
    sections, shown = flow_sections(saes, graphs, thresholds, cards)
    write_json(out / "graph.json", {"graphs": [g.to_json() for g in graphs]})
    write_json(
        out / "flow.json",
        shown | {"thresholds": {"residual": thresholds.residual, "module": thresholds.module}},
    )
    report = write_report(
        out / "report.html", "feature flow", sections, subtitle=", ".join(g.root for g in graphs)
    )
    return {"out": str(out), "report": str(report), "graphs": [g.to_json() for g in graphs]} | shown
