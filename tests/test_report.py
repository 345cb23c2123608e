import re

import pytest

from interlayer.report import (
    ContextExample,
    FeatureCard,
    Section,
    feature_cards_html,
    line_plot_svg,
    metrics_table,
    render_page,
    write_report,
)

SCRIPT = "<script>alert(1)</script>"


def _card() -> FeatureCard:
    return FeatureCard(
        site="layers.3&mlp",
        feature=17,
        frequency=0.0125,
        mean_activation=2.5,
        examples=(
            ContextExample(tokens=("The", " cat", SCRIPT, "\n", " sat"), highlight=2, value=7.25),
            ContextExample(tokens=("a", "\tb"), highlight=0, value=3.0),
        ),
    )


def _page() -> str:
    rows = [{"site": "layers.1", "ev": 0.912345}, {"site": "<b>x</b>", "l0": 32}]
    curves = {"layers.1": [(8, 0.7), (32, 0.9)], "layers.3&mlp": [(32, 0.8), (8, 0.6)]}
    sections = [
        Section("Metrics & stuff", metrics_table(rows, caption="per site")),
        Section("Curves", line_plot_svg(curves, xlabel="L0", ylabel="explained variance", log_x=True)),
        Section("Curves", line_plot_svg(curves, xlabel="L0", ylabel="MSE")),
        Section("Features", feature_cards_html([_card()])),
    ]
    return render_page("Report <gpt2>", sections, subtitle="model a&b")


def test_metrics_table_rows_cells_and_formatting() -> None:
    rows = [
        {"site": "layers.1", "ev": 0.912345, "l0": 32},
        {"site": "layers.2", "ev": 1234.5678, "dead": True},
    ]
    table = metrics_table(rows, caption="fidelity")
    assert re.findall(r"<th>(.*?)</th>", table) == ["site", "ev", "l0", "dead"]
    body_rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    assert len(body_rows) == 2
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in body_rows]
    assert cells == [["layers.1", "0.9123", "32", "–"], ["layers.2", "1235", "–", "True"]]
    assert "<caption>fidelity</caption>" in table


def test_metrics_table_explicit_columns_and_escaping() -> None:
    table = metrics_table([{"a&b": "<i>", "c": 1e-7}], columns=["c", "a&b"])
    assert re.findall(r"<th>(.*?)</th>", table) == ["c", "a&amp;b"]
    assert re.findall(r"<td[^>]*>(.*?)</td>", table) == ["1e-07", "&lt;i&gt;"]


def test_feature_card_marks_the_highlighted_token() -> None:
    html = feature_cards_html([_card()])
    hits = re.findall(r'<span class="tok hit" title="([^"]*)">(.*?)</span>', html)
    assert hits == [("activation 7.25", "&lt;script&gt;alert(1)&lt;/script&gt;"), ("activation 3", "a")]
    assert html.count('class="tok"') == 5  # the 7 tokens less the 2 hits
    assert "layers.3&amp;mlp · feature 17" in html
    assert "1.25% of tokens" in html and "mean activation 2.5" in html
    assert '<span class="tok">↵</span>' in html and '<span class="tok">⇥b</span>' in html


def test_feature_card_without_examples_and_validation() -> None:
    empty = FeatureCard(site="embed", feature=0, frequency=0.0, mean_activation=0.0, examples=())
    assert "no activating contexts" in feature_cards_html([empty])
    with pytest.raises(ValueError, match="highlight"):
        ContextExample(tokens=("a",), highlight=1, value=1.0)
    with pytest.raises(ValueError, match="frequency"):
        FeatureCard(site="embed", feature=0, frequency=1.5, mean_activation=0.0, examples=())


def test_page_escapes_user_text() -> None:
    page = _page()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "layers.3&amp;mlp" in page and "layers.3&mlp" not in page
    assert "<title>Report &lt;gpt2&gt;</title>" in page
    assert "model a&amp;b" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page


def test_page_is_self_contained() -> None:
    page = _page()
    assert page.startswith("<!doctype html>") and '<meta charset="utf-8">' in page
    for needle in ("<link", "<script", "<img", "<iframe", "src=", "@import"):
        assert needle not in page
    assert re.findall(r"url\((?!#)", page) == []  # only same-document references such as url(#clip)
    # The only URLs are the SVG namespace declarations, which are never fetched.
    without_ns = re.sub(r'xmlns(:\w+)?="http://www\.w3\.org/[^"]*"', "", page)
    assert "http://" not in without_ns and "https://" not in without_ns


def test_page_toc_links_to_unique_section_ids() -> None:
    page = _page()
    ids = re.findall(r'<section id="([^"]*)">', page)
    assert ids == ["metrics-stuff", "curves", "curves-2", "features"]
    assert re.findall(r'<a href="#([^"]*)">', page) == ids
    all_ids = re.findall(r'\sid="([^"]*)"', page)
    assert len(all_ids) == len(set(all_ids))  # two plots on one page share no element id


def test_line_plot_svg_is_inline_svg_with_labels() -> None:
    svg = line_plot_svg(
        {"layers.1": [(1, 0.5), (10, 0.8)], "_hidden?": [(1, 0.2)]},
        xlabel="L0 (active latents)",
        ylabel="explained variance",
        title="cost $5 & up",
        log_x=True,
    )
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<?xml" not in svg and "DOCTYPE" not in svg
    for text in ("L0 (active latents)", "explained variance", "cost $5 &amp; up", "layers.1", "_hidden?"):
        assert f">{text}</text>" in svg


def test_write_report_writes_and_replaces(tmp_path) -> None:
    path = tmp_path / "sub" / "report.html"
    returned = write_report(str(path), "First", [Section("A", "<p>one</p>")])
    assert returned == path
    assert "<h1>First</h1>" in path.read_text(encoding="utf-8")
    write_report(path, "Second", [])
    text = path.read_text(encoding="utf-8")
    assert "<h1>Second</h1>" in text and "First" not in text
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]
