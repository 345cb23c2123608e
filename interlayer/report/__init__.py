"""Self-contained HTML reports (no network needed): tables, inline SVG plots, feature cards, flow graphs.

Build a list of :class:`Section` values with the helpers and render or write them as one page; later stages
append their own sections.
"""

from interlayer.report.graph import GraphEdge, GraphNode, flow_graph_html
from interlayer.report.html import (
    ContextExample,
    FeatureCard,
    Section,
    feature_cards_html,
    line_plot_svg,
    metrics_table,
    render_page,
    write_report,
)

__all__ = [
    "ContextExample",
    "FeatureCard",
    "GraphEdge",
    "GraphNode",
    "Section",
    "feature_cards_html",
    "flow_graph_html",
    "line_plot_svg",
    "metrics_table",
    "render_page",
    "write_report",
]
