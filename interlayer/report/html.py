"""Self-contained HTML reports: tables, line plots as inline SVG, feature cards, and the page around them.

A report is a list of :class:`Section` values rendered into one page by :func:`render_page`. The page needs no
network: CSS is inline and plots are inline SVG drawn by matplotlib (text kept as text). Every helper here
returns already-safe HTML; all text that comes from a user or a model (tokens, site names, model names, metric
names) is escaped with :func:`html.escape` on the way in. A later stage adds to a report by building its own
``Section(title, body_html)`` from these helpers (or its own escaped HTML) and appending it.

Example::

    sections = [
        Section("Metrics", metrics_table(rows, caption="per site")),
        Section("Sparsity vs fidelity", line_plot_svg(curves, xlabel="L0", ylabel="EV", log_x=True)),
        Section("Features", feature_cards_html(cards)),
    ]
    write_report("out/report.html", "SAE run", sections, subtitle="gpt2 · stdlib:docs")
"""

from __future__ import annotations

import io
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from interlayer import __version__
from interlayer.atomic import write_text

MISSING = "–"
"""What a table cell shows when its row has no value for the column."""


@dataclass(frozen=True)
class Section:
    """One titled part of a report page; the page's table of contents links to it."""

    title: str
    """Heading, plain text (escaped when rendered)."""
    body_html: str
    """The section's content: already-safe HTML, as produced by the helpers in this module."""


@dataclass(frozen=True)
class ContextExample:
    """A window of tokens around one token on which a feature activates."""

    tokens: tuple[str, ...]
    """Decoded tokens of the window, in order."""
    highlight: int
    """Index into ``tokens`` of the activating token, in ``[0, len(tokens))``."""
    value: float
    """The feature's activation on the highlighted token."""

    def __post_init__(self) -> None:
        if not 0 <= self.highlight < len(self.tokens):
            raise ValueError(
                f"highlight must be in [0, {len(self.tokens)}) for {len(self.tokens)} tokens, got {self.highlight}"
            )


@dataclass(frozen=True)
class FeatureCard:
    """Summary of one feature at one site: how often it fires, how strongly, and its top contexts."""

    site: str
    """Site name, e.g. ``layers.3``."""
    feature: int
    """Index of the feature (latent), >= 0."""
    frequency: float
    """Fraction of tokens on which the feature fires, in [0, 1]."""
    mean_activation: float
    """Mean activation over the tokens on which it fires."""
    examples: tuple[ContextExample, ...]
    """Top-activating contexts, highest activation first."""

    def __post_init__(self) -> None:
        if self.feature < 0:
            raise ValueError(f"feature must be >= 0, got {self.feature}")
        if not 0.0 <= self.frequency <= 1.0:
            raise ValueError(f"frequency must be in [0, 1], got {self.frequency}")


def _fmt(value: object) -> str:
    """Format a table value: non-integral reals with 4 significant digits, anything else with ``str``."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.4g}"
    return str(value)


def metrics_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None, caption: str = ""
) -> str:
    """An HTML ``<table>`` with one row per mapping.

    ``columns`` defaults to the union of the rows' keys in first-seen order. Floats show 4 significant digits,
    a missing key or ``None`` shows ``–``; numeric cells are right-aligned.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    parts = ['<table class="metrics">']
    if caption:
        parts.append(f"<caption>{escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{escape(str(c))}</th>" for c in columns) + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if value is None:
                cells.append(f'<td class="missing">{MISSING}</td>')
            elif isinstance(value, numbers.Real) and not isinstance(value, bool):
                cells.append(f'<td class="num">{escape(_fmt(value))}</td>')
            else:
                cells.append(f"<td>{escape(str(value))}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _mpl_text(text: str) -> str:
    """Make ``text`` literal for matplotlib (a ``$`` would otherwise start mathtext)."""
    return text.replace("$", r"\$")


def _figure_svg(fig: Figure) -> str:
    """The figure as an inline ``<svg>`` element: no XML prologue or DOCTYPE, no group ids (``figure_1``, ...)
    so that several plots can share one page."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]
    return re.sub(r'<g id="[^"]*"', "<g", svg).strip()


def line_plot_svg(
    series: Mapping[str, Sequence[tuple[float, float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_x: bool = False,
) -> str:
    """An inline ``<svg>`` element with one line with markers per series (points sorted by x) and a legend.

    Drawn by matplotlib without pyplot (no global state); text stays text (``svg.fonttype='none'``) and is
    escaped by matplotlib's SVG writer. The XML prologue and DOCTYPE are stripped, and the ids matplotlib puts
    on its groups (``figure_1``, ...) are removed so that several plots can share one page.
    """
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig = Figure(figsize=(7.2, 4.2), layout="constrained")
        ax = fig.subplots()
        lines, names = [], []
        for name, points in series.items():
            xs, ys = zip(*sorted(points), strict=True) if points else ((), ())
            (line,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.5)
            lines.append(line)
            names.append(_mpl_text(name))
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(_mpl_text(xlabel))
        ax.set_ylabel(_mpl_text(ylabel))
        if title:
            ax.set_title(_mpl_text(title))
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend(lines, names, frameon=False, fontsize="small")
        return _figure_svg(fig)


def heatmap_svg(
    values: Sequence[Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    colorbar: str = "",
) -> str:
    """An inline ``<svg>`` heatmap of a matrix (row i drawn at y = i, column j at x = j, origin top left), with a
    colour bar; drawn and cleaned like :func:`line_plot_svg`. NaN cells are left blank."""
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig = Figure(figsize=(6.0, 5.0), layout="constrained")
        ax = fig.subplots()
        image = ax.imshow(values, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xlabel(_mpl_text(xlabel))
        ax.set_ylabel(_mpl_text(ylabel))
        if title:
            ax.set_title(_mpl_text(title))
        bar = fig.colorbar(image, ax=ax)
        if colorbar:
            bar.set_label(_mpl_text(colorbar))
        return _figure_svg(fig)


def _token_text(token: str) -> str:
    """A token made readable: line breaks as ``↵``, tabs as ``⇥`` (spaces are kept by the CSS)."""
    return token.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")


def _example_html(example: ContextExample) -> str:
    spans = []
    for i, token in enumerate(example.tokens):
        text = escape(_token_text(token))
        if i == example.highlight:
            spans.append(f'<span class="tok hit" title="activation {example.value:.4g}">{text}</span>')
        else:
            spans.append(f'<span class="tok">{text}</span>')
    return f'<li><span class="val">{example.value:.4g}</span><span class="ctx">{"".join(spans)}</span></li>'


def _slug(text: str) -> str:
    """Lower-case ``text`` with every run of characters other than letters and digits replaced by ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def feature_cards_html(cards: Sequence[FeatureCard]) -> str:
    """A responsive grid with one card per feature: header, firing frequency, mean activation, top contexts.

    Each context is one line of tokens; the activating token has class ``hit`` and its activation in its
    ``title``. Each card has the id ``feature-<site slug>-<feature>`` so other sections can link to it.
    """
    parts = ['<div class="cards">']
    for card in cards:
        header = f"{escape(card.site)} · feature {card.feature}"
        parts.append(f'<div class="card" id="feature-{_slug(card.site)}-{card.feature}"><h3>{header}</h3>')
        parts.append(
            f'<p class="stats">fires on {card.frequency * 100:.3g}% of tokens · '
            f"mean activation {card.mean_activation:.4g}</p>"
        )
        if card.examples:
            parts.append('<ol class="examples">' + "".join(_example_html(e) for e in card.examples) + "</ol>")
        else:
            parts.append('<p class="empty">no activating contexts</p>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


_CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --zebra: #f6f8fa; --accent: #0969da; --hit: #ffb000; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 2rem 1.5rem 3rem; }
h1 { margin: 0 0 .25rem; font-size: 1.9rem; }
.subtitle { margin: 0 0 1.5rem; color: var(--muted); }
h2 { margin: 2.5rem 0 1rem; padding-bottom: .3rem; border-bottom: 1px solid var(--line); font-size: 1.35rem; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
nav.toc { background: var(--zebra); border: 1px solid var(--line); border-radius: 6px; padding: .6rem 1rem; }
nav.toc strong { font-size: .9rem; }
nav.toc ol { margin: .3rem 0 0; padding-left: 1.4rem; }
table.metrics { border-collapse: collapse; margin: 1rem 0; font-size: .92rem; }
table.metrics caption { caption-side: top; text-align: left; color: var(--muted); padding-bottom: .3rem; }
table.metrics th, table.metrics td { border: 1px solid var(--line); padding: .3rem .7rem; }
table.metrics th { background: #eef1f4; text-align: left; }
table.metrics tbody tr:nth-child(even) { background: var(--zebra); }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td.missing { text-align: center; color: var(--muted); }
svg { display: block; max-width: 100%; height: auto; margin: 1rem 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 1rem; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: .8rem 1rem; min-width: 0; }
.card h3 { margin: 0; font-size: 1rem; }
.card .stats { margin: .2rem 0 .6rem; color: var(--muted); font-size: .85rem; }
.card .empty { color: var(--muted); font-style: italic; }
ol.examples { list-style: none; margin: 0; padding: 0; }
ol.examples li { display: flex; gap: .6rem; align-items: baseline; padding: .25rem 0;
  border-top: 1px solid var(--zebra); }
.val { flex: none; width: 3.2em; text-align: right; color: var(--muted); font-size: .8rem;
  font-variant-numeric: tabular-nums; }
.ctx { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .82rem;
  overflow-wrap: anywhere; }
.tok { white-space: pre-wrap; border-radius: 2px; box-shadow: inset 0 -1px 0 #e4e7eb; }
.tok.hit { background: var(--hit); font-weight: 600; box-shadow: none; }
footer { margin-top: 3rem; padding-top: .8rem; border-top: 1px solid var(--line); color: var(--muted);
  font-size: .8rem; }
"""


def render_page(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """A complete self-contained HTML page: heading, table of contents, the sections in order, a footer.

    Each section's id is a slug of its title (``section`` if that is empty), made unique with ``-2``, ``-3``...
    """
    ids: list[str] = []
    for section in sections:
        base = _slug(section.title) or "section"
        slug, n = base, 1
        while slug in ids:
            n += 1
            slug = f"{base}-{n}"
        ids.append(slug)
    toc = "".join(
        f'<li><a href="#{i}">{escape(s.title)}</a></li>' for i, s in zip(ids, sections, strict=True)
    )
    body = "\n".join(
        f'<section id="{i}">\n<h2>{escape(s.title)}</h2>\n{s.body_html}\n</section>'
        for i, s in zip(ids, sections, strict=True)
    )
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>{escape(title)}</h1>
{f'<p class="subtitle">{escape(subtitle)}</p>' if subtitle else ""}
{f'<nav class="toc"><strong>Contents</strong><ol>{toc}</ol></nav>' if sections else ""}
{body}
<footer>Generated by interlayer {escape(__version__)} on {generated}.</footer>
</main>
</body>
</html>
"""


def write_report(path: str | Path, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    """Render the page and write it atomically to ``path`` (parent folders are created); returns the path."""
    path = Path(path)
    write_text(path, render_page(title, sections, subtitle))
    return path
