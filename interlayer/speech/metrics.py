"""Speech metrics: character and word error rates.

CER = Σ_clips edit(reference chars, hypothesis chars) / Σ_clips len(reference chars), and WER the same over
whitespace-separated words, where edit is the Levenshtein distance (substitutions, insertions and deletions,
each costing 1): the corpus-level rates that jiwer and the ASR literature report (not a mean of per-clip rates).
Written here (a dozen lines) rather than adding jiwer as a dependency for one function.
"""

from __future__ import annotations

from collections.abc import Sequence


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """The Levenshtein distance between two sequences (dynamic programming over one row)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, hyp_item in enumerate(hypothesis, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ref_item != hyp_item))
    return row[-1]


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """``cer`` and ``wer`` of ``hypotheses`` against ``references`` (see the module docstring)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    chars = sum(len(r) for r in references)
    words = sum(len(r.split()) for r in references)
    if not chars or not words:
        raise ValueError("error rates need non-empty references")
    char_edits = sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True))
    word_edits = sum(edit_distance(r.split(), h.split()) for r, h in zip(references, hypotheses, strict=True))
    return {"cer": char_edits / chars, "wer": word_edits / words}
