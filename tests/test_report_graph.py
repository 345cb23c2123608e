import re

import pytest

from interlayer.report import (
    ContextExample,
    FeatureCard,
    GraphEdge,
    GraphNode,
    Section,
    flow_graph_html,
    render_page,
)

SCRIPT = "<script>alert(1)</script>"
EVIL_SITE = f"layers.2&{SCRIPT}"


def _card(site: str, feature: int) -> FeatureCard:
    return FeatureCard(
        site=site,
        feature=feature,
        frequency=0.01,
        mean_activation=2.0,
        examples=(ContextExample(tokens=("x&y", SCRIPT, " b"), highlight=1, value=4.5),),
    )


def _graph() -> tuple[list[GraphNode], list[GraphEdge]]:
    """Root ``layers.2:7`` with its residual chain from embed to layer 3 and the modules of layer 2."""
    nodes = [
        GraphNode("embed:1", "embed", 1, -1, "residual"),
        GraphNode("layers.0:2", "layers.0", 2, 0, "residual"),
        GraphNode("layers.1:3", "layers.1", 3, 1, "residual"),
        GraphNode("evil:7", EVIL_SITE, 7, 2, "residual", _card(EVIL_SITE, 7), highlight=True),
        GraphNode("layers.2.attn:40", "layers.2.attn", 40, 2, "attn", _card("layers.2.attn", 40)),
        GraphNode("layers.2.mlp:50", "layers.2.mlp", 50, 2, "mlp"),
        GraphNode("layers.2.mlp:51", "layers.2.mlp", 51, 2, "mlp"),
        GraphNode("layers.3:9", "layers.3", 9, 3, "residual"),
    ]
    edges = [
        GraphEdge("embed:1", "layers.0:2", 0.9),
        GraphEdge("layers.0:2", "layers.1:3", 0.8),
        GraphEdge("layers.1:3", "evil:7", 0.7),
        GraphEdge("layers.2.attn:40", "evil:7", 0.5),
        GraphEdge("layers.2.mlp:50", "evil:7", 0.4),
        GraphEdge("layers.2.mlp:51", "evil:7", -0.3),
        GraphEdge("evil:7", "layers.3:9", 0.6),
    ]
    return nodes, edges


def _html() -> str:
    nodes, edges = _graph()
    return flow_graph_html(nodes, edges, caption=f"graph of {SCRIPT} & co")


def _nodes_by_id(html: str) -> dict[str, dict[str, str]]:
    """Each ``data-node`` element's data attributes, by node id (attribute values still escaped)."""
    elements = re.findall(r"<(?:g|a) ([^>]*data-node=[^>]*)>", html)
    attributes = [dict(re.findall(r'data-([a-z]+)="([^"]*)"', e)) for e in elements]
    return {a["node"]: a for a in attributes}


def test_one_svg_element_per_node_and_per_edge() -> None:
    html = _html()
    nodes, edges = _graph()
    assert html.count("data-node=") == len(nodes)
    assert html.count('class="edge"') == len(edges)
    assert html.count("<path ") == len(edges)
    assert html.count("<svg") == 1 and html.count("</svg>") == 1
    shown = re.findall(r'data-source="([^"]*)" data-target="([^"]*)" data-similarity="([^"]*)"', html)
    assert shown[-2:] == [("layers.2.mlp:51", "evil:7", "-0.3000"), ("evil:7", "layers.3:9", "0.6000")]
    assert html.count("stroke-dasharray") == 1  # only the negative cosine is dashed


def test_data_strings_appear_only_escaped() -> None:
    html = _html()
    assert SCRIPT not in html
    assert "<script" not in html
    assert "x&y" not in html and "x&amp;y" in html  # the token from the cards
    assert "layers.2&amp;&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the site in attributes and text
    assert "<figcaption>graph of &lt;script&gt;alert(1)&lt;/script&gt; &amp; co</figcaption>" in html
    # every "&" in the output starts an entity
    assert not re.search(r"&(?![a-z]+;|#\d+;)", html)


def test_root_is_highlighted() -> None:
    nodes = _nodes_by_id(_html())
    assert nodes["evil:7"]["root"] == "true"
    assert [node for node, attributes in nodes.items() if "root" in attributes] == ["evil:7"]
    assert len(re.findall(r'class="node root"', _html())) == 1


def test_lanes_stack_attn_over_residual_over_mlp_and_layers_go_right() -> None:
    nodes = _nodes_by_id(_html())
    x = {node: float(a["x"]) for node, a in nodes.items()}
    y = {node: float(a["y"]) for node, a in nodes.items()}
    assert y["layers.2.attn:40"] < y["evil:7"] < y["layers.2.mlp:50"] < y["layers.2.mlp:51"]
    assert x["layers.2.mlp:50"] == x["layers.2.mlp:51"]  # stacked in one cell
    residual = ["embed:1", "layers.0:2", "layers.1:3", "evil:7", "layers.3:9"]
    assert [x[n] for n in residual] == sorted({x[n] for n in residual})
    assert {y[n] for n in residual} == {y["evil:7"]}
    # a module node of layer 2 sits left of layer 2's residual node, right of layer 1's
    assert x["layers.1:3"] < x["layers.2.attn:40"] == x["layers.2.mlp:50"] < x["evil:7"]
    axis = re.findall(r'<text class="axis"[^>]*>([^<]*)</text>', _html())
    assert axis == ["embed", "layer 0", "layer 1", "layer 2", "layer 3"]


def test_hover_titles_and_hidden_cards() -> None:
    html = _html()
    titles = re.findall(r'<(?:g|a) [^>]*data-node="([^"]*)"[^>]*><title>([^<]*)</title>', html)
    by_node = dict(titles)
    assert by_node["layers.0:2"] == "layers.0:2 (residual stream, layer 0)"
    assert (
        by_node["layers.2.attn:40"].splitlines()[2] == "4.5  x&amp;y[&lt;script&gt;alert(1)&lt;/script&gt;] b"
    )
    # the two nodes with cards link to them; the cards are hidden until targeted
    links = re.findall(r'<a href="#([^"]+)" [^>]*data-node="([^"]*)"', html)
    assert [node for _, node in links] == ["evil:7", "layers.2.attn:40"]
    for card_id, _ in links:
        assert f'<div class="flow-card" id="{card_id}">' in html
    assert ".flow-card { display: none;" in html and ".flow-card:target { display: block; }" in html
    assert html.count('<div class="card">') == 2  # feature_cards_html markup, its own id dropped


def test_two_graphs_on_one_page_have_unique_ids_and_no_network() -> None:
    nodes, edges = _graph()
    sections = [
        Section("Graph", flow_graph_html(nodes, edges)),
        Section("Graph", flow_graph_html(nodes, edges)),  # the same graph twice
        Section("Other", flow_graph_html(nodes[:2], edges[:1], caption="small")),
    ]
    page = render_page("Flow", sections)
    ids = re.findall(r'\sid="([^"]*)"', page)
    assert len(ids) == len(set(ids))
    assert sum(i.startswith("flowgraph-") and "-card-" in i for i in ids) == 4
    # every in-page link points at an element of the page
    assert set(re.findall(r'href="#([^"]*)"', page)) <= set(ids)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page)
    assert "http://" not in page and "https://" not in page


def test_invalid_graphs_raise() -> None:
    nodes, edges = _graph()
    with pytest.raises(ValueError, match="unknown node 'layers.9:1'"):
        flow_graph_html(nodes, [*edges, GraphEdge("evil:7", "layers.9:1", 0.5)])
    with pytest.raises(ValueError, match="duplicate node ids: embed:1"):
        flow_graph_html([*nodes, nodes[0]], edges)
    with pytest.raises(ValueError, match="kind"):
        GraphNode("x", "layers.0.mlp", 0, 0, "MLP")
    with pytest.raises(ValueError, match="finite"):
        GraphEdge("a", "b", float("nan"))


def test_empty_graph_renders_legend_only() -> None:
    html = flow_graph_html([], [], caption="nothing")
    assert "data-node=" not in html and 'class="edge"' not in html
    assert 'class="legend"' in html and "<figcaption>nothing</figcaption>" in html
