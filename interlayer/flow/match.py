"""SAE Match (arXiv:2410.07656): the permutation that best aligns the features of SAE A with those of SAE B.

After folding (:mod:`interlayer.flow.fold`), feature i is described by the vector u_i of its selected folded
parameters, concatenated: encoder row W_enc'[i] (d values), decoder row W_dec'[i] (d values), input-independent
bias c'_i (1 value). Features i of A and j of B are compared by the mean squared error of those P coordinates,

    MSE(i, j) = ‖u^A_i − u^B_j‖² / P = (‖u^A_i‖² + ‖u^B_j‖² − 2 u^A_i·u^B_j) / P,

and π* = argmin_π Σ_i MSE(i, π(i)), which is ‖U^A − P_π U^B‖²_F, the Frobenius objective of the paper. The norm
terms sum to the same value under every permutation, so π* = argmax_π Σ_i u^A_i · u^B_π(i): the cost needs
one F × F matmul of inner products. The assignment is solved exactly by scipy's solvers with an LP optimality
certificate (:mod:`interlayer.flow.assignment`). Permutations compose along layers: P(A→C)[i] = P(B→C)[P(A→B)[i]].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from interlayer.atomic import read_json_object, read_tensors, write_json, write_tensors
from interlayer.errors import UserError
from interlayer.flow.assignment import assignment
from interlayer.flow.fold import FoldedFeatures, fold_features
from interlayer.sae import SparseAutoencoder

TERMS = ("encoder", "decoder", "bias")
"""The parameter groups a match can compare."""


@dataclass(frozen=True)
class FeatureMatch:
    """A permutation from the features of SAE A to those of SAE B, with the folded MSE of every pair."""

    permutation: torch.Tensor
    """LongTensor [F]: entry i is the feature of B matched to feature i of A."""
    mse: torch.Tensor
    """[F] float: the folded MSE of pair (i, permutation[i]) over the coordinates of the chosen terms (NaN
    after composition, which has no parameters to compare; :func:`pair_mse` recomputes it for the end points)."""
    terms: tuple[str, ...] = TERMS
    """The terms the cost compared."""
    site_a: str = ""
    """Site of SAE A."""
    site_b: str = ""
    """Site of SAE B."""
    fold: str = "none"
    """The folding used (``threshold``, ``data``, ``none``; ``a/b`` when the two SAEs differed)."""

    def compose(self, then: FeatureMatch) -> FeatureMatch:
        """P(A→C) from this P(A→B) and ``then`` = P(B→C): entry i is then.permutation[self.permutation[i]]."""
        if self.site_b and then.site_a and self.site_b != then.site_a:
            raise UserError(f"cannot compose {self.site_a}→{self.site_b} with {then.site_a}→{then.site_b}")
        if then.permutation.shape != self.permutation.shape:
            raise UserError(
                f"cannot compose permutations of {self.permutation.numel()} and {then.permutation.numel()} features"
            )
        return FeatureMatch(
            then.permutation[self.permutation],
            torch.full_like(self.mse, math.nan),
            self.terms,
            self.site_a,
            then.site_b,
            self.fold,
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``match.safetensors`` (permutation, mse) and ``match.json`` (terms, sites, fold) into ``folder``."""
        folder = Path(folder)
        write_tensors(
            folder / "match.safetensors", {"permutation": self.permutation.cpu(), "mse": self.mse.cpu()}
        )
        write_json(
            folder / "match.json",
            {"site_a": self.site_a, "site_b": self.site_b, "terms": list(self.terms), "fold": self.fold},
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> FeatureMatch:
        """Read what :meth:`save` wrote (safetensors and JSON only)."""
        folder = Path(folder)
        meta = read_json_object(folder / "match.json", "feature match")
        tensors = read_tensors(folder / "match.safetensors", "feature match")
        if set(tensors) != {"permutation", "mse"}:
            raise UserError(f"{folder / 'match.safetensors'}: expected tensors permutation and mse")
        permutation = tensors["permutation"]
        if (
            permutation.dtype != torch.int64
            or permutation.dim() != 1
            or tensors["mse"].shape != permutation.shape
        ):
            raise UserError(
                f"{folder / 'match.safetensors'}: permutation must be int64 [F] with mse [F] beside it"
            )
        if not torch.equal(permutation.sort().values, torch.arange(permutation.numel())):
            raise UserError(f"{folder / 'match.safetensors'}: permutation is not a permutation of 0..F-1")
        return cls(
            permutation,
            tensors["mse"],
            tuple(meta.get("terms", TERMS)),
            str(meta.get("site_a", "")),
            str(meta.get("site_b", "")),
            str(meta.get("fold", "none")),
        )


def check_terms(terms: Sequence[str]) -> tuple[str, ...]:
    """``terms`` as a tuple, each one of :data:`TERMS`, at least one, no repeats."""
    chosen = tuple(terms)
    bad = [t for t in chosen if t not in TERMS]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise UserError(
            f"terms must be distinct values among {', '.join(TERMS)}; got {', '.join(chosen) or 'none'}"
        )
    return chosen


def check_matchable(sae_a: SparseAutoencoder, sae_b: SparseAutoencoder) -> None:
    """A :class:`UserError` unless the two SAEs have the same width and dictionary size and model."""
    a, b = sae_a.cfg, sae_b.cfg
    names = f"{a.site or 'A'} and {b.site or 'B'}"
    if a.d_in != b.d_in:
        raise UserError(
            f"the SAEs at {names} read different widths ({a.d_in} and {b.d_in}); match SAEs of one model"
        )
    if a.latents != b.latents:
        raise UserError(
            f"the SAEs at {names} have different dictionary sizes ({a.latents} and {b.latents}); "
            "a permutation needs equal sizes"
        )
    if a.model and b.model and a.model != b.model:
        raise UserError(f"the SAEs at {names} were trained on different models ({a.model} and {b.model})")


def feature_vectors(folded: FoldedFeatures, terms: Sequence[str]) -> torch.Tensor:
    """u [F, P]: the chosen folded terms concatenated (encoder row, decoder row, bias)."""
    parts = []
    for term in terms:
        value = {"encoder": folded.W_enc_FD, "decoder": folded.W_dec_FD, "bias": folded.bias_F}[term]
        if value is None:
            raise UserError(
                f"the {term} term needs a dense encoder, which this SAE does not have; match with --terms decoder"
            )
        parts.append(value if value.dim() == 2 else value[:, None])
    return torch.cat(parts, dim=1)


def pair_mse(u_a_FP: torch.Tensor, u_b_FP: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """MSE(i, permutation[i]) = ‖u^A_i − u^B_π(i)‖² / P for every i (float32 [F])."""
    return (u_a_FP - u_b_FP[permutation.to(u_b_FP.device)]).pow(2).mean(1).cpu()


def match_folded(
    folded_a: FoldedFeatures, folded_b: FoldedFeatures, terms: Sequence[str] = TERMS, **meta: Any
) -> FeatureMatch:
    """The :class:`FeatureMatch` of two already folded SAEs (``meta``: site_a, site_b)."""
    terms = check_terms(terms)
    u_a, u_b = feature_vectors(folded_a, terms), feature_vectors(folded_b, terms)
    for u, site in ((u_a, meta.get("site_a", "A")), (u_b, meta.get("site_b", "B"))):
        if not bool(torch.isfinite(u).all()):
            raise UserError(
                f"the SAE at {site} has non-finite (NaN/inf) folded parameters; it cannot be matched"
            )
    permutation = assignment(u_a, u_b)
    fold = folded_a.fold if folded_a.fold == folded_b.fold else f"{folded_a.fold}/{folded_b.fold}"
    return FeatureMatch(permutation, pair_mse(u_a, u_b, permutation), terms, fold=fold, **meta)


def match_features(
    sae_a: SparseAutoencoder,
    sae_b: SparseAutoencoder,
    terms: Sequence[str] = TERMS,
    fold: str = "auto",
    x_a_ND: torch.Tensor | None = None,
    x_b_ND: torch.Tensor | None = None,
) -> FeatureMatch:
    """Match every feature of ``sae_a`` to one of ``sae_b`` (data-free unless ``fold`` uses data scales).

    ``terms``: which folded parameters the cost compares (``encoder``, ``decoder``, ``bias``).
    ``fold``: ``auto``, ``threshold``, ``data`` or ``none`` (:mod:`interlayer.flow.fold`); ``x_a_ND`` and
    ``x_b_ND`` are activations at the two sites, used only for data scales.

    >>> match = match_features(sae_a, sae_b, terms=("encoder", "decoder", "bias"))
    >>> match.permutation[i]   # the feature of B matched to feature i of A
    >>> match.mse[i]           # its folded MSE
    """
    check_matchable(sae_a, sae_b)
    check_terms(terms)
    folded_a = fold_features(sae_a, fold, x_a_ND)
    folded_b = fold_features(sae_b, fold, x_b_ND)
    return match_folded(folded_a, folded_b, terms, site_a=sae_a.cfg.site, site_b=sae_b.cfg.site)


def random_match(match: FeatureMatch, seed: int = 0) -> FeatureMatch:
    """The same sites with a uniformly random permutation: the chance baseline of every evaluation."""
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(match.permutation.numel(), generator=generator)
    return replace(match, permutation=permutation, mse=torch.full_like(match.mse, math.nan))
