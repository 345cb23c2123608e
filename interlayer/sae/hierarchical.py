"""HierarchicalTopK SAE (Balagansky et al., arXiv:2505.24473), ``--architecture hierarchical``: one SAE for
every sparsity budget k ≤ K.

Codes are TopK's with K = ``--k``. Sort a token's K selected values descending, v_(1) ≥ … ≥ v_(K) with
latents f_(1), …; the prefix reconstructions are x̂_j = b_dec + Σ_{i ≤ j} v_(i) W_dec[f_(i)], and the loss
term is the mean over budgets

    S = (1/K) Σ_{j=1..K} Σ_b ‖x_b − x̂_{j,b}‖²

(normalised by Σ‖x − x̄‖² in the trainer, like TopK's). AuxK is TopK's. At inference any k ≤ K keeps the k
largest (``sae.encode(x, k=8)``, ``interlayer sae eval --k-eval 8,16``), which is exactly the prefix x̂_k.

:class:`PrefixLoss` computes S without a B×K×d tensor: with r_j = x − x̂_j,
    forward   r ← x − b_dec, then for j = 1..K: r ← r − v_(j) W_dec[f_(j)], S += ‖r‖²
    backward  R_j = Σ_{j' ≥ j} r_j' (a running suffix sum, from j = K down; r_{j−1} = r_j + v_(j) W_dec[f_(j)]
              recovers each earlier residual from the final one) and
              ∂S/∂v_(j) = −(2/K) ⟨R_j, W_dec[f_(j)]⟩,  ∂S/∂W_dec[f_(j)] += −(2/K) v_(j) R_j,
              ∂S/∂(x − b_dec) = (2/K) R_1.
The loops go over blocks of ``BLOCK`` budgets at a time (cumulative sums inside a block), so memory is
O(BLOCK·B·d) whatever K is. The same two loops as the official Triton kernel (github.com/corl-team/flexsae),
written here in PyTorch ops so that it runs on the CPU and on any GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from interlayer.errors import UserError
from interlayer.sae.base import TrainingOutput
from interlayer.sae.topk import TopKConfig, TopKSAE

BLOCK = 8
"""Budgets handled together in :class:`PrefixLoss` (memory BLOCK·B·d floats per intermediate)."""


@dataclass(frozen=True, kw_only=True)
class HierarchicalConfig(TopKConfig):
    """A HierarchicalTopK SAE trained for every budget k ≤ K (K = ``k``)."""

    architecture: str = "hierarchical"

    @property
    def k_max(self) -> int | None:
        return self.k


class PrefixLoss(torch.autograd.Function):
    """(target_BD = x − b_dec, values_BK sorted descending, indices_BK, W_dec_FD) -> (S, r_K detached)."""

    @staticmethod
    def forward(
        ctx: Any,
        target_BD: torch.Tensor,
        values_BK: torch.Tensor,
        indices_BK: torch.Tensor,
        W_dec_FD: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        K = values_BK.shape[1]
        residual_BD = target_BD.clone()
        total = target_BD.new_zeros((), dtype=torch.float64)
        for start in range(0, K, BLOCK):
            terms_BSD = values_BK[:, start : start + BLOCK, None] * F.embedding(
                indices_BK[:, start : start + BLOCK], W_dec_FD
            )
            residuals_BSD = residual_BD[:, None] - terms_BSD.cumsum(1)
            total += residuals_BSD.pow(2).sum(dtype=torch.float64)
            residual_BD = residuals_BSD[:, -1]
        ctx.save_for_backward(values_BK, indices_BK, W_dec_FD, residual_BD)
        ctx.mark_non_differentiable(residual_BD)
        return (total / K).to(target_BD.dtype), residual_BD

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad_S = grads[0]
        values_BK, indices_BK, W_dec_FD, residual_BD = ctx.saved_tensors
        if grad_S is None:
            return None, None, None, None
        K = values_BK.shape[1]
        c = 2 * grad_S / K
        suffix_BD = torch.zeros_like(residual_BD)  # R_j: Σ of r_j' for j' ≥ j
        grad_values_BK = torch.empty_like(values_BK)
        grad_W_FD = torch.zeros_like(W_dec_FD)
        for start in reversed(range(0, K, BLOCK)):
            idx_BS = indices_BK[:, start : start + BLOCK]
            rows_BSD = F.embedding(idx_BS, W_dec_FD)
            v_BS1 = values_BK[:, start : start + BLOCK, None]
            terms_BSD = v_BS1 * rows_BSD
            # r_j = r_end + Σ_{i in (j, end]} term_i  (residual_BD is r at the block's last budget)
            after_BSD = terms_BSD.flip(1).cumsum(1).flip(1) - terms_BSD
            residuals_BSD = residual_BD[:, None] + after_BSD
            suffix_BSD = suffix_BD[:, None] + residuals_BSD.flip(1).cumsum(1).flip(1)
            grad_values_BK[:, start : start + BLOCK] = -c * (suffix_BSD * rows_BSD).sum(-1)
            grad_W_FD.index_add_(
                0, idx_BS.reshape(-1), (-c * v_BS1 * suffix_BSD).reshape(-1, W_dec_FD.shape[1])
            )
            suffix_BD = suffix_BSD[:, 0]
            residual_BD = residuals_BSD[:, 0] + terms_BSD[:, 0]
        return c * suffix_BD, grad_values_BK, None, grad_W_FD


def prefix_loss(
    target_BD: torch.Tensor, values_BK: torch.Tensor, indices_BK: torch.Tensor, W_dec_FD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/K) Σ_j Σ_b ‖target_b − Σ_{i ≤ j} v_bi W_dec[i_bi]‖² (values sorted descending) and the final residual."""
    out = PrefixLoss.apply(target_BD, values_BK, indices_BK, W_dec_FD)
    return out[0], out[1]


class HierarchicalTopKSAE(TopKSAE):
    """TopK codes with K = ``k``; loss averaged over every budget j ≤ K of the sorted prefix."""

    config_class = HierarchicalConfig
    cfg: HierarchicalConfig

    def check_k(self, k: int | None) -> None:
        if k is not None and k > self.cfg.k:
            raise UserError(
                f"k = {k} exceeds K = {self.cfg.k}, the largest budget this HierarchicalTopK SAE was trained for"
            )
        super().check_k(k)

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        values_BK, indices_BK, aux_hat, fired_F = self.select(x_BD, dead_F, k_aux)
        order_BK = values_BK.detach().argsort(dim=1, descending=True)
        sorted_BK = values_BK.gather(1, order_BK)
        recon, residual_BD = prefix_loss(
            x_BD - self.b_dec_D, sorted_BK, indices_BK.gather(1, order_BK), self.W_dec_FD
        )
        return TrainingOutput(recon, x_BD - residual_BD, aux_hat, fired_F, float((values_BK > 0).sum()))
