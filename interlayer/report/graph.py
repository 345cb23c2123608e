"""Feature-flow graphs (arXiv:2502.03032) as inline SVG: SAE features at sites across layers, linked by the
cosine similarity of their decoder rows.

Layout. Each layer present in the graph gets a column, left to right by block index (``embed`` is layer −1
and comes first; the axis under the lanes names each column). Three horizontal lanes split the height:
attention-output features on top, residual-stream features in the middle, MLP-output features at the bottom.
A module node of layer L sits in layer L's column but slightly to the left of the residual node of layer L,
since the module's output feeds that residual stream. Several nodes in one (layer, lane) cell are stacked
vertically, centred on the lane, in the order given; a lane is as tall as its fullest cell.

Nodes are rounded rectangles coloured by lane and labelled with the feature index; the root has a thick
outline. Hovering a node shows its SVG ``<title>``: ``site:feature`` and the top contexts of its card as
plain text. A node with a card is a link to that card (rendered with :func:`feature_cards_html` below the
graph, hidden until it is the URL's ``:target``), so clicking a node shows its card without any script.
Edges are quadratic paths, drawn under the nodes, whose stroke width and opacity grow with ``|similarity|``
(negative cosines are dashed); each has the cosine as a ``<title>`` tooltip and as a small label. Edges
that span several columns bow upwards so they do not run through the nodes between their ends.

Element ids are unique per call (a hash of the content and a call counter), so several graphs can share
one page; every string from the data is escaped.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from interlayer.report.html import FeatureCard, _token_text, feature_cards_html

LANES = ("attn", "residual", "mlp")
"""Node kinds, in lane order from top to bottom."""

_LANE_NAMES = {"attn": "attention output", "residual": "residual stream", "mlp": "MLP output"}
_COLORS = {"attn": "#8250df", "residual": "#0969da", "mlp": "#1a7f37"}
_ROOT_COLOR = "#ffb000"
_EDGE_COLOR = "#57606a"

_COLUMN = 130.0
"""Horizontal distance between two layers' columns."""
_MODULE_SHIFT = 46.0
"""How far left of its layer's residual node a module node sits."""
_ROW = 30.0
"""Vertical distance between two nodes stacked in one cell."""
_LANE_PAD = 10.0
_LEFT, _RIGHT, _TOP, _BOTTOM = 90.0, 50.0, 40.0, 34.0
_MIN_WIDTH = 600.0
_NODE_HEIGHT = 20.0
_TOOLTIP_EXAMPLES = 5
"""How many of a card's contexts a node's hover tooltip lists (the card shows them all)."""

_calls = itertools.count(1)

_STYLE = """<style>
.flowgraph { margin: 1rem 0; }
.flowgraph figcaption { color: var(--muted, #656d76); font-size: .9rem; }
.flowgraph a.node { cursor: pointer; }
.flowgraph .node:hover rect { stroke: #1f2328; stroke-width: 2.5; }
.flowgraph .node.root rect, .flowgraph .node.root:hover rect { stroke: #ffb000; stroke-width: 3.5; }
.flowgraph .edge:hover path { stroke: #1f2328; }
.flowgraph .flow-card { display: none; margin-top: .5rem; }
.flowgraph .flow-card:target { display: block; }
.flowgraph .flow-card .close { font-size: .85rem; }
</style>"""


@dataclass(frozen=True)
class GraphNode:
    """One SAE feature at one site, placed by its layer and kind."""

    id: str
    """Unique node id that edges refer to, e.g. ``layers.3:123``."""
    site: str
    """The SAE's site: ``embed``, ``layers.3``, ``layers.3.mlp`` or ``layers.3.attn``."""
    feature: int
    """Index of the feature in that SAE; the node's label."""
    layer: int
    """Block index, which picks the column (−1 for ``embed``)."""
    kind: str
    """Which lane: ``residual``, ``mlp`` or ``attn``."""
    card: FeatureCard | None = None
    """Top contexts, shown in the hover tooltip and, on click, as a full card; ``None``: no contexts."""
    highlight: bool = False
    """Whether this is the graph's root feature (drawn with a thick outline)."""

    def __post_init__(self) -> None:
        if self.kind not in LANES:
            raise ValueError(f"kind must be one of {', '.join(LANES)}, got {self.kind!r}")


@dataclass(frozen=True)
class GraphEdge:
    """Feature ``source`` flows into feature ``target``."""

    source: str
    """Id of the node the edge starts at."""
    target: str
    """Id of the node the edge ends at."""
    similarity: float
    """Cosine similarity of the two features' decoder rows, in [−1, 1]."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.similarity):
            raise ValueError(f"similarity must be finite, got {self.similarity}")


@dataclass(frozen=True)
class _Layout:
    """Where everything goes in the SVG."""

    centres: dict[str, tuple[float, float]]
    """Node id → centre of its node."""
    columns: dict[int, float]
    """Layer → x of its residual column."""
    lanes: dict[str, tuple[float, float]]
    """Kind → (top, height) of its lane."""
    width: float
    """Width of the SVG."""
    height: float
    """Height of the SVG."""


def _layout(nodes: Sequence[GraphNode]) -> _Layout:
    layers = sorted({node.layer for node in nodes})
    columns = {layer: _LEFT + i * _COLUMN for i, layer in enumerate(layers)}
    cells = Counter((node.layer, node.kind) for node in nodes)
    lanes: dict[str, tuple[float, float]] = {}
    top = _TOP
    for kind in LANES:
        rows = max((n for (_, k), n in cells.items() if k == kind), default=1)
        lanes[kind] = (top, rows * _ROW + 2 * _LANE_PAD)
        top += lanes[kind][1]
    centres: dict[str, tuple[float, float]] = {}
    placed: Counter[tuple[int, str]] = Counter()
    for node in nodes:
        cell = (node.layer, node.kind)
        lane_top, lane_height = lanes[node.kind]
        offset = placed[cell] - (cells[cell] - 1) / 2
        placed[cell] += 1
        x = columns[node.layer] - (0.0 if node.kind == "residual" else _MODULE_SHIFT)
        centres[node.id] = (x, lane_top + lane_height / 2 + offset * _ROW)
    width = max(_MIN_WIDTH, _LEFT + (len(layers) - 1) * _COLUMN + _RIGHT)
    return _Layout(centres, columns, lanes, width, top + _BOTTOM)


def _validate(nodes: Sequence[GraphNode], edges: Sequence[GraphEdge]) -> None:
    ids = Counter(node.id for node in nodes)
    duplicated = sorted(i for i, n in ids.items() if n > 1)
    if duplicated:
        raise ValueError(f"duplicate node ids: {', '.join(duplicated)}")
    for edge in edges:
        for end in (edge.source, edge.target):
            if end not in ids:
                raise ValueError(f"edge {edge.source} → {edge.target} names unknown node {end!r}")


def _graph_id(nodes: Sequence[GraphNode], edges: Sequence[GraphEdge], caption: str) -> str:
    """An element id unique to this call: a hash of the content and the call counter."""
    digest = hashlib.sha1(repr((nodes, edges, caption)).encode()).hexdigest()[:8]
    return f"flowgraph-{digest}-{next(_calls)}"


def _context_text(tokens: Sequence[str], highlight: int) -> str:
    """A context as one line, the activating token in brackets."""
    return "".join(f"[{_token_text(t)}]" if i == highlight else _token_text(t) for i, t in enumerate(tokens))


def _tooltip(node: GraphNode) -> str:
    """Plain text (not yet escaped) for a node's ``<title>``: its name and its top contexts."""
    layer = "embed" if node.layer < 0 else f"layer {node.layer}"
    lines = [f"{node.site}:{node.feature} ({_LANE_NAMES[node.kind]}, {layer})"]
    if node.card is not None:
        card = node.card
        lines.append(
            f"fires on {card.frequency * 100:.3g}% of tokens · mean activation {card.mean_activation:.4g}"
        )
        lines += [
            f"{e.value:.4g}  {_context_text(e.tokens, e.highlight)}"
            for e in card.examples[:_TOOLTIP_EXAMPLES]
        ]
        lines.append("click for the full card")
    return "\n".join(lines)


def _node_svg(node: GraphNode, centre: tuple[float, float], card_id: str | None) -> str:
    x, y = centre
    label = str(node.feature)
    width = max(28.0, 10.0 + 7.0 * len(label))
    classes = "node root" if node.highlight else "node"
    attributes = (
        f'class="{classes}" data-node="{escape(node.id)}" data-site="{escape(node.site)}" '
        f'data-feature="{node.feature}" data-layer="{node.layer}" data-kind="{node.kind}" '
        f'data-x="{x:.1f}" data-y="{y:.1f}"' + (' data-root="true"' if node.highlight else "")
    )
    body = (
        f"<title>{escape(_tooltip(node))}</title>"
        f'<rect x="{x - width / 2:.1f}" y="{y - _NODE_HEIGHT / 2:.1f}" width="{width:.1f}" '
        f'height="{_NODE_HEIGHT:.1f}" rx="{_NODE_HEIGHT / 2:.1f}" fill="{_COLORS[node.kind]}" '
        f'stroke="{_ROOT_COLOR if node.highlight else "#ffffff"}" stroke-width="{3.5 if node.highlight else 1}"/>'
        f'<text x="{x:.1f}" y="{y:.1f}" dy="0.35em" text-anchor="middle" font-size="11" fill="#ffffff">'
        f"{label}</text>"
    )
    if card_id is None:
        return f"<g {attributes}>{body}</g>"
    return f'<a href="#{card_id}" {attributes}>{body}</a>'


def _edge_svg(edge: GraphEdge, start: tuple[float, float], end: tuple[float, float]) -> str:
    (x0, y0), (x1, y1) = start, end
    bow = 0.2 * abs(x1 - x0) if abs(x1 - x0) > 1.5 * _COLUMN else 0.0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - bow
    strength = min(abs(edge.similarity), 1.0)
    dash = ' stroke-dasharray="5 3"' if edge.similarity < 0 else ""
    label_x, label_y = (x0 + 2 * cx + x1) / 4, (y0 + 2 * cy + y1) / 4 - 3
    tooltip = f"{edge.source} → {edge.target}: cosine {edge.similarity:.3f}"
    return (
        f'<g class="edge" data-source="{escape(edge.source)}" data-target="{escape(edge.target)}" '
        f'data-similarity="{edge.similarity:.4f}"><title>{escape(tooltip)}</title>'
        f'<path d="M{x0:.1f},{y0:.1f} Q{cx:.1f},{cy:.1f} {x1:.1f},{y1:.1f}" fill="none" '
        f'stroke="{_EDGE_COLOR}" stroke-width="{0.8 + 3.2 * strength:.2f}" '
        f'stroke-opacity="{0.3 + 0.65 * strength:.2f}"{dash}/>'
        f'<text x="{label_x:.1f}" y="{label_y:.1f}" text-anchor="middle" font-size="9" fill="#656d76" '
        f'stroke="#ffffff" stroke-width="3" paint-order="stroke">{edge.similarity:.2f}</text></g>'
    )


def _lanes_svg(layout: _Layout) -> str:
    """A faint band per lane, so that the lanes read as rows."""
    return "".join(
        f'<rect class="lane" data-lane="{kind}" x="0" y="{top:.1f}" width="{layout.width:.1f}" '
        f'height="{height:.1f}" fill="{_COLORS[kind]}" fill-opacity="{0.06 if i % 2 == 0 else 0.03}"/>'
        for i, (kind, (top, height)) in enumerate(layout.lanes.items())
    )


def _axis_svg(layout: _Layout) -> str:
    """Layer names under the columns."""
    y = layout.height - _BOTTOM + 20
    return "".join(
        f'<text class="axis" x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="11" fill="#656d76">'
        f"{'embed' if layer < 0 else f'layer {layer}'}</text>"
        for layer, x in layout.columns.items()
    )


def _legend_svg() -> str:
    """The lanes' colours, the root's outline, and what edges encode, in one row above the lanes."""
    parts, x = [], 10.0
    for kind in LANES:
        parts.append(
            f'<rect x="{x:.1f}" y="10" width="14" height="14" rx="4" fill="{_COLORS[kind]}"/>'
            f'<text x="{x + 20:.1f}" y="21" font-size="11">{_LANE_NAMES[kind]}</text>'
        )
        x += 34 + 6.2 * len(_LANE_NAMES[kind])
    parts.append(
        f'<rect x="{x:.1f}" y="10" width="14" height="14" rx="4" fill="#ffffff" stroke="{_ROOT_COLOR}" '
        f'stroke-width="3"/><text x="{x + 20:.1f}" y="21" font-size="11">root</text>'
        f'<text x="{x + 64:.1f}" y="21" font-size="11" fill="#656d76">edge width ∝ decoder cosine</text>'
    )
    return '<g class="legend">' + "".join(parts) + "</g>"


def _card_html(card: FeatureCard, card_id: str, graph_id: str) -> str:
    """The node's full card, hidden until targeted; the card's own id is dropped (a page may repeat it)."""
    cards = re.sub(r' id="feature-[^"]*"', "", feature_cards_html([card]), count=1)
    return (
        f'<div class="flow-card" id="{card_id}">{cards}'
        f'<a class="close" href="#{graph_id}">hide card</a></div>'
    )


def flow_graph_html(nodes: Sequence[GraphNode], edges: Sequence[GraphEdge], caption: str = "") -> str:
    """A ``<figure>`` with the flow graph as inline SVG, its caption, and the nodes' hidden feature cards.

    Raises :class:`ValueError` if two nodes share an id or an edge names an unknown node. See the module
    docstring for the layout.
    """
    _validate(nodes, edges)
    graph_id = _graph_id(nodes, edges, caption)
    layout = _layout(nodes)
    card_ids = {node.id: f"{graph_id}-card-{i}" for i, node in enumerate(nodes) if node.card is not None}
    svg = (
        f'<svg class="flow" viewBox="0 0 {layout.width:.0f} {layout.height:.0f}" width="{layout.width:.0f}" '
        f'height="{layout.height:.0f}" role="img" aria-label="{escape(caption or "feature flow graph")}" '
        f'font-family="system-ui, sans-serif">'
        + _legend_svg()
        + _lanes_svg(layout)
        + _axis_svg(layout)
        + "".join(_edge_svg(e, layout.centres[e.source], layout.centres[e.target]) for e in edges)
        + "".join(_node_svg(n, layout.centres[n.id], card_ids.get(n.id)) for n in nodes)
        + "</svg>"
    )
    cards = "".join(
        _card_html(node.card, card_ids[node.id], graph_id) for node in nodes if node.card is not None
    )
    figcaption = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure class="flowgraph" id="{graph_id}">{_STYLE}{svg}{figcaption}{cards}</figure>'
