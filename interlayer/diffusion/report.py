"""HTML for samples side by side, with the positions a remasker flags as errors highlighted.

A flagged token is one whose error logit g_φ > 0 (σ(g) > 0.5) on the finished sample. Every token's text is
escaped; styles are inline so the fragment renders inside any report page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import torch

_FLAG = "background:#fbd5d5;border-bottom:2px solid #c0392b"
_PROMPT = "color:#888"


@dataclass(frozen=True)
class ShownSample:
    """One sample to show: its tokens' texts, which were generated, which the remasker flags."""

    tokens: tuple[str, ...]
    generated: tuple[bool, ...]
    flagged: tuple[bool, ...]


def shown_samples(
    tokenizer: object,
    tokens_NL: torch.Tensor,
    generated_NL: torch.Tensor,
    attention_NL: torch.Tensor,
    error_logits_NL: torch.Tensor | None,
) -> list[ShownSample]:
    """The samples' token texts (special tokens dropped) with the flags of ``error_logits_NL > 0``."""
    special = set(tokenizer.all_special_ids)  # type: ignore[attr-defined]
    out = []
    for i, row in enumerate(tokens_NL.tolist()):
        keep = [j for j, t in enumerate(row) if attention_NL[i, j] and t not in special]
        texts = tuple(tokenizer.decode([row[j]]) for j in keep)  # type: ignore[attr-defined]
        flags = tuple(bool(error_logits_NL[i, j] > 0) if error_logits_NL is not None else False for j in keep)
        out.append(ShownSample(texts, tuple(bool(generated_NL[i, j]) for j in keep), flags))
    return out


def sample_html(sample: ShownSample) -> str:
    """One sample as a ``<pre>`` block, flagged tokens highlighted, fixed (prompt) tokens greyed."""
    parts = []
    for text, generated, flagged in zip(sample.tokens, sample.generated, sample.flagged, strict=True):
        style = _FLAG if flagged else ("" if generated else _PROMPT)
        piece = escape(text)
        parts.append(f'<span style="{style}">{piece}</span>' if style else piece)
    return '<pre style="white-space:pre-wrap;margin:0;font-size:12px">' + "".join(parts) + "</pre>"


def side_by_side_html(columns: Sequence[tuple[str, Sequence[ShownSample]]], caption: str = "") -> str:
    """A table with one column per sampler (its name as header) and one row per sample index."""
    head = "".join(f"<th>{escape(name)}</th>" for name, _ in columns)
    rows = []
    for i in range(max(len(samples) for _, samples in columns)):
        cells = "".join(
            f'<td style="vertical-align:top">{sample_html(samples[i]) if i < len(samples) else ""}</td>'
            for _, samples in columns
        )
        rows.append(f"<tr>{cells}</tr>")
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table class="metrics">{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
