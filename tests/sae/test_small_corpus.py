"""A corpus smaller than one chunk (a few thousand tokens): trained on when it fills a batch, else one line
that says how many tokens there were and what to lower."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cli import run_cli  # noqa: E402


def small_corpus(folder: Path) -> Path:
    """200 short rows, as a .jsonl file: far less than one chunk (8 batches × 32 contexts × 128 tokens)."""
    path = folder / "small.jsonl"
    rows = [
        {"text": f"Row {i} says the parser reads token {i % 17} before token {i % 5}."} for i in range(200)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def test_small_corpus_messages_and_training(
    tiny_models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = small_corpus(tmp_path)
    base = ["sae", "train", "--model", str(tiny_models["llama"]), "--sites", "layers.1", "--data", str(data)]
    base += ["--latents", "64", "--k", "4", "--context-len", "64"]
    code, _, err = run_cli([*base, "--out", str(tmp_path / "a")], capsys)
    assert code == 2
    line = err.strip()
    assert line.startswith("error: the data gave ") and "fewer than one batch of 4,096 (--batch-size)" in line
    available = int(line.split("the data gave ")[1].split(" ")[0].replace(",", ""))
    assert 2_000 < available < 4_096, line  # the train split of 200 short rows, a partial chunk
    # the same folder then takes a run that fits: one pass over what there is
    code, out, err = run_cli(
        [*base, "--batch-size", "256", "--tokens", "512", "--out", str(tmp_path / "a"), "--json"], capsys
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["tokens"] == 512
    code, _, err = run_cli(
        [*base, "--batch-size", "256", "--tokens", "40000", "--out", str(tmp_path / "b")], capsys
    )
    assert code == 2 and "pass --tokens " in err and "training tokens of the 40,000 asked for" in err
