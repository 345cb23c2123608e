"""The demo (the README's first command) end to end, at a size that runs in seconds."""

from __future__ import annotations

import json
from pathlib import Path

from interlayer.demo import DemoConfig, run_demo


def test_demo_trains_evaluates_and_reports(tmp_path: Path) -> None:
    cfg = DemoConfig(
        out=tmp_path,
        tokens=8192,
        latents=256,
        k=8,
        batch_size=512,
        eval_tokens=600,
        sites="layers.0,layers.5",
    )
    summary = run_demo(cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert set(summary["sae"]) == {"layers.0", "layers.5"}
    for metrics in summary["sae"].values():  # 16 steps: a rough SAE, but better than the mean (EV 0)
        assert 0.05 < metrics["explained_variance"] < 1 and metrics["l0"] <= 8 and metrics["tokens"] >= 600
        assert -1 <= metrics["pooled_cosine_sae"] <= 1 and -1 <= metrics["pooled_cosine_zero"] <= 1
    html = (tmp_path / "report.html").read_text()
    assert "<script" not in html.lower() or "src=" not in html.lower()  # self-contained
    assert html.count('class="card"') == 2 * cfg.cards_per_site
