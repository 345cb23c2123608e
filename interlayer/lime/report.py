"""HTML pages of ``lime train`` (loss curves, final table) and ``lime analyze`` (entropy, router reading)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from interlayer import atomic
from interlayer.report.html import Section, heatmap_svg, line_plot_svg, metrics_table, write_report


def write_training_report(out: Path, summary: dict[str, Any]) -> Path:
    """``out/training.html``: training and validation loss per step of every architecture, and the final table."""
    config = summary["config"]
    subtitle = (
        f"{summary['data']} · {config['layers']} layers · d = {config['d_model']} · seed {config['seed']}"
    )
    return write_report(
        out / "training.html", "LIMe training", training_sections(out, summary), subtitle=subtitle
    )


def training_sections(out: Path, summary: dict[str, Any]) -> list[Section]:
    """The final table and the validation and training loss curves of a ``lime train`` run in ``out``."""
    train_curves: dict[str, list[tuple[float, float]]] = {}
    val_curves: dict[str, list[tuple[float, float]]] = {}
    for architecture in summary["runs"]:
        history = atomic.read_json(out / architecture / "history.json", "training history")
        train_curves[architecture] = [(r["step"], r["loss"]) for r in history]
        val_curves[architecture] = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    rows = [
        {
            k: run[k]
            for k in ("architecture", "parameters", "cross_layer_parameters", "train_tokens", "val_loss")
        }
        | {"train GFLOPs": run["train_flops"] / 1e9, "s/step": run["seconds_per_step"]}
        for run in summary["runs"].values()
    ]
    return [
        Section(
            "Final validation loss", metrics_table(rows, caption="nats per token, the same tokens for all")
        ),
        Section("Validation loss", line_plot_svg(val_curves, xlabel="step", ylabel="validation loss (nats)")),
        Section("Training loss", line_plot_svg(train_curves, xlabel="step", ylabel="training loss (nats)")),
    ]


def write_analysis_report(
    path: Path,
    model_name: str,
    entropy: Mapping[str, Sequence[float]],
    shares_LL: Sequence[Sequence[float]],
    expected: Sequence[float],
    alpha: float,
    dynamic_shares_LL: Sequence[Sequence[float]] | None = None,
) -> Path:
    """``report.html``: value entropy per layer (one curve per model), the router heatmap and expected layer."""
    sections = analysis_sections(entropy, shares_LL, expected, alpha, dynamic_shares_LL)
    return write_report(path, "LIMe analysis", sections, subtitle=model_name)


def _upper_blank(shares_LL: Sequence[Sequence[float]]) -> list[list[float]]:
    """The shares with NaN above the diagonal (a layer never reads a later one: blank, not a zero share)."""
    return [
        [share if m <= r else float("nan") for m, share in enumerate(row)] for r, row in enumerate(shares_LL)
    ]


def analysis_sections(
    entropy: Mapping[str, Sequence[float]],
    shares_LL: Sequence[Sequence[float]],
    expected: Sequence[float],
    alpha: float,
    dynamic_shares_LL: Sequence[Sequence[float]] | None = None,
) -> list[Section]:
    """Value entropy per layer, the router heatmap, the expected retrieved layer (and the dynamic heatmap)."""
    layers = len(expected)
    depth = max(layers, *(len(values) for values in entropy.values()))
    entropy_rows = [
        {"layer": layer}
        | {name: values[layer] if layer < len(values) else None for name, values in entropy.items()}
        for layer in range(depth)
    ]
    sections = [
        Section(
            "Value entropy per layer",
            line_plot_svg(
                {name: list(enumerate(values)) for name, values in entropy.items()},
                xlabel="layer",
                ylabel=f"Rényi entropy S_{alpha:g} of the values (nats)",
            )
            + metrics_table(entropy_rows, caption="higher: less representation collapse"),
        ),
        Section(
            "Which layers each router reads",
            heatmap_svg(
                _upper_blank(shares_LL),
                xlabel="source layer m",
                ylabel="reading layer r",
                colorbar="share of |W_r| on layer m",
            ),
        ),
        Section(
            "Expected retrieved layer",
            line_plot_svg(
                {
                    "E_r = Σ m·p_r(m)": list(enumerate(expected)),
                    "own layer (identity router)": [(r, r) for r in range(layers)],
                },
                xlabel="reading layer r",
                ylabel="expected source layer",
            )
            + metrics_table(
                [{"layer": r, "expected layer": e, "distance back": r - e} for r, e in enumerate(expected)]
            ),
        ),
    ]
    if dynamic_shares_LL is not None:
        sections.append(
            Section(
                "Per-token (dynamic) router, averaged over tokens",
                heatmap_svg(
                    _upper_blank(dynamic_shares_LL),
                    xlabel="source layer m",
                    ylabel="reading layer r",
                    colorbar="mean share of |W_r(x_t)| on layer m",
                ),
            )
        )
    return sections
