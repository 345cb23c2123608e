"""CER and WER: the Levenshtein distance and corpus-level rates against hand counts."""

from __future__ import annotations

import pytest

from interlayer.speech.metrics import edit_distance, error_rates


def test_edit_distance_counts_substitutions_insertions_and_deletions() -> None:
    assert edit_distance("kitten", "sitting") == 3  # k→s, e→i, +g
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance(["3", "1", "4"], ["3", "4"]) == 1


def test_error_rates_are_corpus_level_not_a_mean_of_clips() -> None:
    rates = error_rates(["3 1 4", "1 5"], ["3 1", "1 5 9"])
    # chars: "3 1 4" → "3 1" deletes 2 of 5; "1 5" → "1 5 9" inserts 2 (of 3): 4 / 8
    assert rates["cer"] == pytest.approx(4 / 8)
    # words: 1 deletion of 3, 1 insertion of 2: 2 / 5 (a mean of clip rates would be (1/3 + 1/2) / 2)
    assert rates["wer"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError):
        error_rates(["a"], [])
