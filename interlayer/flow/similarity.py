"""Feature flow (arXiv:2502.03032): where each feature of the residual stream comes from, by decoder cosines.

Decoder rows are unit-normalised: v^P_k = W_dec^P[k] / ‖W_dec^P[k]‖. For a feature f of the residual SAE at
layer L (site ``layers.L``) and each candidate source P — the residual SAE at L−1 (``layers.L-1``, or
``embed`` for L = 0), the MLP-output SAE at L (``layers.L.mlp``) and the attention-output SAE at L
(``layers.L.attn``) —

    s(P) = max_k cos(v^L_f, v^P_k),    its argmax the best match of f in P (top-1 cosine).

The general top-k transition from dictionary A to B is T = 1[x > 0] · topk_k(V^A V^Bᵀ) row by row
(:func:`transitions`). Each feature is then classified with two thresholds, τ_R for the residual and τ_M for
the modules (defaults 0.5 and 0.15, the cut rules the paper uses for flow graphs):

    translated   s(R) ≥ τ_R and s(M) < τ_M and s(A) < τ_M   (carried over from the previous residual)
    processed    s(R) ≥ τ_R and (s(M) ≥ τ_M or s(A) ≥ τ_M)  (carried over and touched by a module)
    born         s(R) < τ_R and (s(M) ≥ τ_M or s(A) ≥ τ_M)  (new, written by a module)
    unexplained  s(R) < τ_R and s(M) < τ_M and s(A) < τ_M

A missing module SAE counts as s = 0. τ_M = 0.15 is close to the largest cosine a random direction reaches
in a dictionary of a few thousand rows in d = 384 (about √(2 ln F / d) ≈ 0.2): :func:`chance_cosine` gives that
level for the dictionaries at hand, and the results report it beside the classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from interlayer.errors import UserError
from interlayer.sae import SparseAutoencoder

CLASSES = ("translated", "processed", "born", "unexplained")
"""The classes of :func:`classify`, in the order of its codes 0..3."""
SOURCES = ("residual", "mlp", "attn")
"""The candidate sources of a residual feature at layer L: residual L−1, MLP output L, attention output L."""


@dataclass(frozen=True)
class FlowThresholds:
    """The cosine levels of the classification and of the flow-graph cuts."""

    residual: float = 0.5
    """τ_R: a residual feature continues from (or into) the neighbouring residual layer when s(R) ≥ τ_R."""
    module: float = 0.15
    """τ_M: a module feature takes part in a residual feature when its cosine is ≥ τ_M."""

    def __post_init__(self) -> None:
        for name in ("residual", "module"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"the {name} threshold must lie in [0, 1], got {getattr(self, name)}")


def unit_rows(W_FD: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norms (float32)."""
    W_FD = W_FD.detach().float()
    return W_FD / W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)


def top_cosines(
    target_FD: torch.Tensor, source_GD: torch.Tensor, k: int = 1, rows_per_block: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``target_FD``, the ``k`` largest cosines with rows of ``source_GD`` and their indices
    ([F, k] each, largest first); computed block by block so no F × G matrix is held."""
    t_FD, s_GD = unit_rows(target_FD), unit_rows(source_GD)
    values, indices = [], []
    for start in range(0, t_FD.shape[0], rows_per_block):
        top = (t_FD[start : start + rows_per_block] @ s_GD.T).topk(min(k, s_GD.shape[0]), dim=1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)


def transitions(W_a_FD: torch.Tensor, W_b_GD: torch.Tensor, k: int) -> torch.Tensor:
    """T = 1[x > 0] · topk_k(V^A V^Bᵀ) as a sparse COO [F, G] matrix (per row of A, its k largest positive
    cosines with B)."""
    values_FK, indices_FK = top_cosines(W_a_FD, W_b_GD, k)
    keep_FK = values_FK > 0
    rows_FK = torch.arange(values_FK.shape[0])[:, None].expand_as(values_FK)
    index_2N = torch.stack([rows_FK[keep_FK], indices_FK[keep_FK]])
    shape = (W_a_FD.shape[0], W_b_GD.shape[0])
    return torch.sparse_coo_tensor(index_2N, values_FK[keep_FK], shape, check_invariants=True).coalesce()


def chance_cosine(W_GD: torch.Tensor, samples: int = 512, quantile: float = 0.99, seed: int = 0) -> float:
    """The ``quantile`` of max_k cos(r, v_k) over random unit directions r: the top-1 cosine that chance
    alone reaches in this dictionary."""
    generator = torch.Generator().manual_seed(seed)
    r_SD = torch.randn(samples, W_GD.shape[1], generator=generator)
    best_S = top_cosines(r_SD, W_GD.cpu())[0][:, 0]
    return float(best_S.quantile(quantile))


def classify(
    scores: Mapping[str, torch.Tensor], thresholds: FlowThresholds = FlowThresholds()
) -> torch.Tensor:
    """Class codes [F] (indices into :data:`CLASSES`) from s(R), s(M), s(A) ([F] each; a missing module = 0)."""
    s_R = scores["residual"]
    zeros = torch.zeros_like(s_R)
    module_F = (scores.get("mlp", zeros) >= thresholds.module) | (
        scores.get("attn", zeros) >= thresholds.module
    )
    from_residual_F = s_R >= thresholds.residual
    codes = torch.full(s_R.shape, 3, dtype=torch.int64)  # unexplained
    codes[from_residual_F & ~module_F] = 0
    codes[from_residual_F & module_F] = 1
    codes[~from_residual_F & module_F] = 2
    return codes


def source_sites(layer: int) -> dict[str, str]:
    """The candidate source sites of residual layer ``layer``, by source kind."""
    previous = "embed" if layer == 0 else f"layers.{layer - 1}"
    return {"residual": previous, "mlp": f"layers.{layer}.mlp", "attn": f"layers.{layer}.attn"}


@dataclass(frozen=True)
class LayerFlow:
    """Where the features of the residual SAE at one layer come from."""

    layer: int
    """L: the features are those of ``layers.L``."""
    scores: dict[str, torch.Tensor]
    """Source kind → s(P) [F] (sources with no SAE are absent)."""
    best: dict[str, torch.Tensor]
    """Source kind → the index of the best match in P [F]."""
    classes: torch.Tensor
    """Class codes [F] (indices into :data:`CLASSES`)."""

    def fractions(self) -> dict[str, float]:
        """The fraction of the layer's features in each class."""
        counts = torch.bincount(self.classes, minlength=len(CLASSES)).double() / self.classes.numel()
        return dict(zip(CLASSES, counts.tolist(), strict=True))


def layer_flow(
    saes: Mapping[str, SparseAutoencoder], layer: int, thresholds: FlowThresholds = FlowThresholds()
) -> LayerFlow:
    """Top-1 cosines of every feature of ``layers.{layer}`` against its sources, and their classes. Needs the
    residual SAEs at ``layer`` and the one before it; the module SAEs are used where present."""
    target = f"layers.{layer}"
    sources = source_sites(layer)
    for needed in (target, sources["residual"]):
        if needed not in saes:
            raise UserError(
                f"feature flow at {target} needs an SAE at {needed}; the folder has {', '.join(saes)}"
            )
    scores, best = {}, {}
    for kind, site in sources.items():
        if site in saes:
            values, indices = top_cosines(saes[target].W_dec_FD, saes[site].W_dec_FD)
            scores[kind], best[kind] = values[:, 0].cpu(), indices[:, 0].cpu()
    return LayerFlow(layer, scores, best, classify(scores, thresholds))
