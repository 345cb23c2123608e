"""High-norm outlier tokens (> m × median norm): they never reach the SAE in training and are left out of
evaluation metrics, when asked for."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_evaluate import TEXT
from test_topk import planted_atoms, planted_chunks

from interlayer.activations import Chunk, check_outlier_norm, inlier_mask, shuffled_rows
from interlayer.distributed import SINGLE, ProcessGroup
from interlayer.errors import UserError
from interlayer.models import load_model
from interlayer.sae import TopKConfig, TopKSAE, TrainConfig
from interlayer.sae.evaluate import evaluate_saes
from interlayer.sae.io import load_sae
from interlayer.sae.trainer import SiteTrainer, train_saes

ATOMS = planted_atoms(32, 16, seed=1)
CLEAN = planted_chunks(ATOMS, 3, 2048, 7, seed=1)  # chunks 0-5 train, chunk 6 is held out
SINKS = range(0, 2048, 50)  # 41 rows per chunk, blown up 1000×


def with_sinks(start: int) -> Iterator[Chunk]:
    for chunk in CLEAN(start):
        if chunk.index < 6:
            x_ND = chunk.acts["site"].clone()
            x_ND[list(SINKS)] *= 1000
            yield Chunk(chunk.index, {"site": x_ND})


def test_inlier_mask_known_answer() -> None:
    x_ND = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [0.0, 30.0], [0.0, 0.0]])  # norms 5 1 2 30 0
    assert inlier_mask(x_ND, 10).tolist() == [True, True, True, False, True]  # lower median 2: limit 20
    assert inlier_mask(x_ND, 2).tolist() == [False, True, True, False, True]  # limit 4
    assert inlier_mask(x_ND, 0).all() and inlier_mask(x_ND[:0], 10).shape == (0,)
    for bad in (1.0, 0.5, -3.0):
        with pytest.raises(UserError, match="outlier-norm must be 0 .off. or above 1"):
            check_outlier_norm(bad)
    with pytest.raises(UserError, match="outlier-norm"):
        TrainConfig(outlier_norm=0.5)


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae.safetensors"))


def clean_fvu(folder: Path) -> float:
    x_ND = next(CLEAN(6)).acts["site"]
    with torch.no_grad():
        err = (load_sae(folder)(x_ND) - x_ND).pow(2).sum()
    return float(err / (x_ND - x_ND.mean(0)).pow(2).sum())


def test_outliers_never_reach_the_sae_and_stop_spoiling_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    real_step = SiteTrainer.step

    def spy(
        self: SiteTrainer, x_BD: torch.Tensor, lr: float, shards: ProcessGroup = SINGLE
    ) -> dict[str, float]:
        seen.append(x_BD.clone())
        return real_step(self, x_BD, lr, shards)

    monkeypatch.setattr(SiteTrainer, "step", spy)
    cfg = {"site": TopKConfig(d_in=16, latents=128, k=3, site="site")}
    train = TrainConfig(tokens=6 * 2048, batch_size=256, seed=0, lr=3e-3, checkpoint_seconds=1e9)
    train_saes(
        tmp_path / "filtered", with_sinks, cfg, TrainConfig(**{**train.__dict__, "outlier_norm": 10.0}), {}
    )
    assert len(seen) == 48
    assert sum(len(x) for x in seen) == 6 * (2048 - len(SINKS))  # exactly the planted rows are left out
    assert max(float(x.norm(dim=1).max()) for x in seen) < 20  # clean tokens have norms of about 2-5
    seen.clear()
    train_saes(tmp_path / "unfiltered", with_sinks, cfg, train, {})
    assert sum(len(x) for x in seen) == 6 * 2048
    train_saes(tmp_path / "clean", lambda start: (c for c in CLEAN(start) if c.index < 6), cfg, train, {})
    filtered, unfiltered, clean = (
        clean_fvu(tmp_path / run / "site") for run in ("filtered", "unfiltered", "clean")
    )
    assert filtered < 1.5 * clean and unfiltered > 3 * filtered


def test_evaluation_leaves_outliers_out(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    lm = load_model(str(tiny_models["llama"]))
    site = "layers.1"
    sae = TopKSAE(TopKConfig(d_in=32, latents=64, k=4, site=site))
    sae.initialise_(torch.Generator().manual_seed(0))

    def evaluate(outlier_norm: float) -> dict[str, float]:
        evaluation = evaluate_saes(
            lm, {site: sae}, str(corpus), 600, 32, 8, split="all", outlier_norm=outlier_norm
        )
        return evaluation.metrics(site)

    everything, lenient, strict = evaluate(0.0), evaluate(1e9), evaluate(1.05)
    assert lenient == everything  # nothing is that far out: the same tokens, the same numbers
    assert 0 < strict["tokens"] < everything["tokens"]  # about half the tokens lie above 1.05 × median
    assert strict["ce_clean"] == everything["ce_clean"]  # CE still covers every kept target
    assert strict["ce_sae"] != everything["ce_sae"]  # ... but only inliers are spliced


def test_a_batch_left_with_under_two_tokens_takes_no_step(tmp_path: Path) -> None:
    x_ND = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    x_ND[::2] *= 1000  # half the tokens are outliers: batches of 2 are often left with 0 or 1 tokens
    chunk = Chunk(0, {"s": x_ND})
    train = TrainConfig(tokens=64, batch_size=2, outlier_norm=10.0, checkpoint_seconds=1e9)
    inliers_N = inlier_mask(x_ND, 10.0)
    assert inliers_N.tolist() == [False, True] * 32
    batches = list(shuffled_rows(chunk, 2, train.seed))
    useful = sum(int(inliers_N[rows].sum()) == 2 for rows in batches)
    assert len(batches) == 32 and 0 < useful < 32
    cfg = {"s": TopKConfig(d_in=8, latents=16, k=2, site="s")}
    metrics = train_saes(tmp_path, lambda start: iter([chunk][start:]), cfg, train, {})
    assert metrics["steps"] == 32 and metrics["sites"]["s"]["steps"] == useful
    assert all(bool(t.isfinite().all()) for t in saved(tmp_path / "s").values())
    with pytest.raises(UserError, match="batch_size must be at least 2"):
        TrainConfig(tokens=64, batch_size=1)
