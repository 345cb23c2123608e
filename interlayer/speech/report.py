"""The HTML page of a ``varan train`` run: test metrics, the mean posterior over layers, per-layer heads, curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interlayer.report.html import Section, line_plot_svg, metrics_table, write_report


def posterior_section(series: dict[str, list[float]], title: str) -> Section:
    """Mean q(ℓ | x) per layer ℓ = 1..N, one curve per run."""
    points = {name: [(float(i + 1), q) for i, q in enumerate(qs)] for name, qs in series.items()}
    return Section(title, line_plot_svg(points, xlabel="layer ℓ", ylabel="mean q(ℓ | x) on the test clips"))


def write_run_report(out: Path, summary: dict[str, Any], history: list[dict[str, Any]]) -> Path:
    """``out/report.html`` of one run."""
    cfg, test = summary["config"], summary["test"]
    metric = "accuracy" if "accuracy" in test else "cer"
    rows = [{"clips": test["clips"]} | {k: test[k] for k in ("accuracy", "cer", "wer") if k in test}]
    sections = [Section("Test", metrics_table(rows))]
    if cfg["aggregation"] == "varan":
        sections.append(posterior_section({"VARAN": test["mean_posterior"]}, "Posterior over layers"))
    head_metric = test.get("head_accuracy") or test.get("head_cer") or []
    if len(head_metric) > 1:
        sections.append(
            Section(
                "Each layer's head alone",
                metrics_table(
                    [{"layer": i + 1, metric: value} for i, value in enumerate(head_metric)],
                    caption="the prediction of layer ℓ's head by itself",
                ),
            )
        )
    if summary.get("weighted_sum"):
        weights = {"softmax(w)": summary["weighted_sum"]}
        sections.append(posterior_section(weights, "Weighted-sum layer weights"))
    sections.append(
        Section(
            "Training",
            line_plot_svg({"train loss": [(r["step"], r["loss"]) for r in history]}, "step", "loss"),
        )
    )
    validation = [(r["step"], r[f"val_{metric}"]) for r in history if f"val_{metric}" in r]
    if validation:
        sections.append(
            Section("Validation", line_plot_svg({f"validation {metric}": validation}, "step", metric))
        )
    subtitle = (
        f"{summary['model']} · {cfg['task']} · {cfg['aggregation']} · {cfg['mode']} · seed {cfg['seed']}"
    )
    return write_report(out / "report.html", "VARAN fine-tuning", sections, subtitle=subtitle)
