"""Samples side by side: every token escaped, flagged tokens highlighted, prompts greyed."""

from __future__ import annotations

import torch

from interlayer.diffusion.report import ShownSample, shown_samples, side_by_side_html


class _Tokenizer:
    all_special_ids = [0]
    texts = {0: "<s>", 1: "<script>", 2: " x", 3: " & y"}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.texts[i] for i in ids)


def test_tokens_are_escaped_flagged_and_prompts_greyed() -> None:
    tokens = torch.tensor([[0, 1, 2, 3]])
    shown = shown_samples(
        _Tokenizer(), tokens, torch.tensor([[False, False, True, True]]), torch.ones(1, 4, dtype=torch.long),
        torch.tensor([[0.0, -1.0, 2.0, -3.0]]),
    )  # fmt: skip
    assert shown == [ShownSample(("<script>", " x", " & y"), (False, True, True), (False, True, False))]
    html = side_by_side_html([("gstar", shown)], "caption <b>")
    assert "<script>" not in html and "&lt;script&gt;" in html and "caption &lt;b&gt;" in html
    assert (
        html.count("background:#fbd5d5") == 1 and '#fbd5d5;border-bottom:2px solid #c0392b"> x</span>' in html
    )
    assert 'color:#888">&lt;script&gt;</span>' in html and " &amp; y" in html
