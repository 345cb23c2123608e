"""Report sections for the steering-vector analyses of :mod:`interlayer.steering.analysis`.

:func:`analysis_sections` turns the results into :class:`~interlayer.report.html.Section` values: tables by
:func:`~interlayer.report.html.metrics_table` and inline SVG plots by :func:`~interlayer.report.html.line_plot_svg`,
both of which escape every token and site name; the one sentence that opens each section is escaped here.
Tokens are shown as Python string literals (``' To'``, ``'\\n'``), so spaces and line breaks stay visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from interlayer.report.html import Section, line_plot_svg, metrics_table
from interlayer.steering.analysis import (
    LensResult,
    PathPatching,
    PersistenceCurve,
    TokenCount,
    TokenSubstitution,
)


def _intro(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def _tokens(tokens: Sequence[str], values: Sequence[float]) -> str:
    return ", ".join(f"{token!r} {value:.3f}" for token, value in zip(tokens, values, strict=True))


def _lens_section(lens: Sequence[LensResult]) -> Section:
    rows = [
        {
            "site": r.site,
            "‖s‖": r.norm,
            "top tokens (cosine)": _tokens(r.top_tokens, r.top_cosines),
            "bottom tokens (cosine)": _tokens(r.bottom_tokens, r.bottom_cosines),
        }
        for r in lens
    ]
    intro = _intro(
        "Each row is one site's vector s: the tokens whose unembedding rows point most along s (top) and most "
        "against it (bottom), with the cosine; tokens that form a theme mean the vector writes directly toward "
        "the output vocabulary."
    )
    return Section("Logit lens of the steering vectors", intro + metrics_table(rows))


def _persistence_section(curves: Sequence[PersistenceCurve]) -> Section:
    intro = _intro(
        "Each line inserts one site's vector s alone and follows the change it makes in the residual stream, "
        "Δh = steered − vanilla, through its own and every later layer: the first plot is the mean cosine of Δh "
        "with s (1 at the insertion layer; staying high means later layers carry s forward unchanged), the "
        "second the mean cosine of Δh with its mean over tokens (high means the same shift at every token)."
    )
    with_vector = {c.site: list(zip(c.layers, c.cos_with_vector, strict=True)) for c in curves}
    with_mean = {c.site: list(zip(c.layers, c.cos_with_mean, strict=True)) for c in curves}
    plots = line_plot_svg(with_vector, xlabel="layer m", ylabel="mean cos(Δh_m, s)") + line_plot_svg(
        with_mean, xlabel="layer m", ylabel="mean cos(Δh_m, mean Δh_m)"
    )
    return Section("Persistence of each vector", intro + plots)


def _count_rows(first: Sequence[TokenCount], rest: Sequence[TokenCount]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for rank in range(max(len(first), len(rest))):
        row: dict[str, object] = {"rank": rank + 1}
        if rank < len(first):
            row["first position: token"] = repr(first[rank].token)
            row["first position: count"] = first[rank].count
        if rank < len(rest):
            row["later positions: token"] = repr(rest[rank].token)
            row["later positions: count"] = rest[rank].count
        rows.append(row)
    return rows


def _substitution_section(sub: TokenSubstitution) -> Section:
    intro = _intro(
        f"Teacher-forcing the completions with and without the vector at {sub.site}, at each completion "
        "position the token whose probability rises most is counted, separately for the first generated "
        "token and the later ones; a larger mean rise and total variation at the first position means the "
        "vector acts mostly on how the completion starts."
    )
    summary = metrics_table(
        [
            {
                "positions": "first generated token",
                "count": sub.num_first,
                "mean max rise": sub.mean_rise_first,
                "mean total variation": sub.mean_tv_first,
            },
            {
                "positions": "later tokens",
                "count": sub.num_rest,
                "mean max rise": sub.mean_rise_rest,
                "mean total variation": sub.mean_tv_rest,
            },
        ],
        caption="probability change Δp = P(steered) − P(vanilla) per position",
    )
    counts = metrics_table(
        _count_rows(sub.counts_first, sub.counts_rest),
        columns=[
            "rank",
            "first position: token",
            "first position: count",
            "later positions: token",
            "later positions: count",
        ],
        caption="the most-risen token: how often, by position",
    )
    rises = metrics_table(
        [{"token": repr(r.token), "mean Δp": r.rise} for r in sub.first_mean_rise],
        caption="tokens with the largest mean probability rise at the first generated position",
    )
    return Section("Token substitution", intro + summary + counts + rises)


def _patching_section(result: PathPatching) -> Section:
    intro = _intro(
        f"With the vector at {result.vector_site} on, block {result.block}'s attention output is replaced by "
        "its vanilla value in the MLP's input only (mlp), in the residual stream only (residual) or in both; "
        "each line is the mean KL(vanilla ‖ run) at each position, and the patch whose line drops toward zero "
        "is the path that carries the steering effect."
    )
    plot = line_plot_svg(
        {v: list(zip(result.positions, result.kl_by_position[v], strict=True)) for v in result.variants},
        xlabel="position",
        ylabel="mean KL(vanilla ‖ run)",
    )
    table = metrics_table(
        [
            {
                "run": v,
                "mean KL": result.mean_kl[v],
                "fraction of the steering KL removed": result.fraction_removed.get(v),
            }
            for v in result.variants
        ]
    )
    return Section("Path patching", intro + plot + table)


def analysis_sections(
    lens: Sequence[LensResult] | None,
    persistence: Sequence[PersistenceCurve] | None,
    substitution: TokenSubstitution | None,
    patching: PathPatching | None,
) -> list[Section]:
    """One report section per analysis given (None skips it), in the order of the arguments."""
    sections = []
    if lens is not None:
        sections.append(_lens_section(lens))
    if persistence is not None:
        sections.append(_persistence_section(persistence))
    if substitution is not None:
        sections.append(_substitution_section(substitution))
    if patching is not None:
        sections.append(_patching_section(patching))
    return sections
