"""``interlayer flow match`` as a library call: match every consecutive pair of SAEs, score, save, resume.

Output folder::

    settings.json                    what was asked and a fingerprint of every SAE (a rerun with other
                                     settings or other SAEs is refused, not mixed in)
    pairs/<site_a>--<site_b>/        one folder per pair, written in this order:
        match.safetensors            permutation [F] (int64) and folded MSE [F]
        match.json                   sites, terms, fold
        scores.json                  the pair's scores; written last, so its presence marks the pair done
    matches.json                     every pair's scores and the compositions along the residual stream

A killed run resumes at the first pair without ``scores.json``; pairs already done are read back, not redone.
Scores of a pair: folded MSE (mean and median over pairs of features), and with activations (a model and
data) the matching score against a random permutation and, for consecutive residual sites, layer skipping
(:mod:`interlayer.flow.evaluate`). Compositions: P(A → C) for every pair of residual sites, by composing the
consecutive permutations, with its matching score when activations are given (how far features persist).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from interlayer.atomic import read_json_object, write_json
from interlayer.errors import UserError
from interlayer.flow.evaluate import (
    TokenBatch,
    consecutive_pairs,
    fire_masks,
    layer_skipping,
    matching_score,
    model_batches,
    scale_ratio,
    scores_from_fires,
    site_activations,
)
from interlayer.flow.fold import fold_features
from interlayer.flow.graph import site_layer
from interlayer.flow.match import FeatureMatch, check_matchable, check_terms, match_folded
from interlayer.models import LoadedModel
from interlayer.sae import SparseAutoencoder


@dataclass(frozen=True)
class MatchSettings:
    """What ``flow match`` was asked for (recorded in ``settings.json``)."""

    terms: tuple[str, ...] = ("encoder", "decoder", "bias")
    """Folded parameters the cost compares."""
    fold: str = "auto"
    """How each feature's scale is chosen (:mod:`interlayer.flow.fold`)."""
    data: str = ""
    """Text for data scales and the data evaluations ('' = none: data-free)."""
    tokens: int = 20_000
    """Kept tokens for the matching score and data scales."""
    skip_tokens: int = 4_000
    """Kept tokens for layer skipping (each pair costs one forward per variant per batch)."""
    context_len: int = 128
    """Tokens per context."""
    batch_size: int = 16
    """Contexts per model forward."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"terms": list(self.terms)}


def pair_folder(out: Path, site_a: str, site_b: str) -> Path:
    return out / "pairs" / f"{site_a}--{site_b}"


def sae_fingerprint(sae: SparseAutoencoder) -> dict[str, Any]:
    """What identifies an SAE for a resume: its model, size and a SHA-256 of its tensors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.file_tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return {
        "model": sae.cfg.model,
        "latents": sae.cfg.latents,
        "d_in": sae.cfg.d_in,
        "sha256": digest.hexdigest(),
    }


def _check_settings(out: Path, settings: MatchSettings, saes: Mapping[str, SparseAutoencoder]) -> None:
    recorded = {
        "settings": settings.to_json(),
        "saes": {site: sae_fingerprint(saes[site]) for site in sorted(saes)},
    }
    path = out / "settings.json"
    if path.exists():
        previous = read_json_object(path, "flow match settings")
        if previous != recorded:
            raise UserError(
                f"{out} holds a flow match run with other settings or SAEs ({path}); use another --out"
            )
    else:
        write_json(path, recorded)


def match_run(
    saes: Mapping[str, SparseAutoencoder],
    out: str | Path,
    settings: MatchSettings = MatchSettings(),
    lm: LoadedModel | None = None,
    on_pair: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Match every consecutive pair of ``saes`` (site → SAE) into ``out`` (see the module docstring); with
    ``lm`` and ``settings.data``, also the data evaluations. Returns what ``matches.json`` holds."""
    out = Path(out)
    check_terms(settings.terms)
    pairs = consecutive_pairs(list(saes))
    if not pairs:
        raise UserError(
            f"no two SAEs at consecutive layers of one kind among {', '.join(saes)}; flow match needs "
            "e.g. layers.2 and layers.3"
        )
    for site_a, site_b in pairs:
        check_matchable(saes[site_a], saes[site_b])
    if settings.data and lm is None:
        raise UserError("data evaluations need a model: pass --model with --data")
    _check_settings(out, settings, saes)
    acts = _activations(saes, pairs, settings, lm)
    batches = (
        list(
            model_batches(lm, settings.data, settings.skip_tokens, settings.context_len, settings.batch_size)
        )
        if lm and settings.data
        else []
    )
    rows, matches = [], {}
    for site_a, site_b in pairs:
        folder = pair_folder(out, site_a, site_b)
        if not (folder / "scores.json").exists():
            match, scores = _match_pair(saes, site_a, site_b, settings, acts, lm, batches)
            match.save(folder)
            write_json(folder / "scores.json", scores)
        matches[(site_a, site_b)] = FeatureMatch.load(folder)
        rows.append(
            {"site_a": site_a, "site_b": site_b} | read_json_object(folder / "scores.json", "pair scores")
        )
        if on_pair is not None:
            on_pair(site_a, site_b)
    summary = {"pairs": rows, "compositions": _compositions(saes, matches, acts)}
    write_json(out / "matches.json", summary)
    return summary


def _activations(
    saes: Mapping[str, SparseAutoencoder],
    pairs: Sequence[tuple[str, str]],
    settings: MatchSettings,
    lm: LoadedModel | None,
) -> dict[str, torch.Tensor]:
    if lm is None or not settings.data:
        return {}
    sites = sorted({s for pair in pairs for s in pair}, key=site_layer)
    for site in sites:
        if saes[site].cfg.d_in != lm.d_model:
            raise UserError(
                f"the SAE at {site} reads width {saes[site].cfg.d_in}, but {lm.name} has {lm.d_model}"
            )
    return site_activations(
        lm, sites, settings.data, settings.tokens, settings.context_len, settings.batch_size
    )


def _match_pair(
    saes: Mapping[str, SparseAutoencoder],
    site_a: str,
    site_b: str,
    settings: MatchSettings,
    acts: Mapping[str, torch.Tensor],
    lm: LoadedModel | None,
    batches: Sequence[TokenBatch],
) -> tuple[FeatureMatch, dict[str, Any]]:
    sae_a, sae_b = saes[site_a], saes[site_b]
    folded_a = fold_features(sae_a, settings.fold, acts.get(site_a))
    folded_b = fold_features(sae_b, settings.fold, acts.get(site_b))
    match = match_folded(folded_a, folded_b, settings.terms, site_a=site_a, site_b=site_b)
    scores: dict[str, Any] = {
        "fold": match.fold,
        "folded_mse_mean": float(match.mse.mean()),
        "folded_mse_median": float(match.mse.median()),
    }
    if acts:
        scores |= matching_score(sae_a, sae_b, match, acts[site_a], acts[site_b])
    if lm is not None and batches and site_layer(site_a)[1] == "residual":
        ratio_F = scale_ratio(folded_a.scale_F, folded_b.scale_F, match.permutation)
        scores["layer_skipping"] = layer_skipping(lm, sae_a, sae_b, match, batches, ratio_F)
    return match, scores


def _compositions(
    saes: Mapping[str, SparseAutoencoder],
    matches: Mapping[tuple[str, str], FeatureMatch],
    acts: Mapping[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """P(A → C) for every pair of residual sites A before C joined by an unbroken chain of consecutive
    matches (composed), with its matching score when activations are given: how far features persist."""
    following = {a: b for a, b in matches if site_layer(a)[1] == "residual"}
    fires: dict[str, torch.Tensor] = {}
    rows = []
    for start in sorted(following, key=site_layer):
        composed, site = None, start
        while site in following:
            step = matches[(site, following[site])]
            composed = step if composed is None else composed.compose(step)
            site = following[site]
            row: dict[str, Any] = {
                "site_a": start,
                "site_b": site,
                "distance": site_layer(site)[0] - site_layer(start)[0],
            }
            if acts:
                for s in (start, site):  # each site's firing masks once, for all the pairs it is in
                    if s not in fires:
                        fires[s] = fire_masks(saes[s], acts[s])
                score = scores_from_fires(fires[start], fires[site], composed)
                row |= {k: score[k] for k in ("matching_score", "random_score")}
            rows.append(row)
    return rows
