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

CHUNK_ELEMENTS = 1 << 22
"""Tokens are handled in chunks of C = CHUNK_ELEMENTS // (K·d), so the gathered rows take 16 MB (fp32)."""


@dataclass(frozen=True, kw_only=True)
class HierarchicalConfig(TopKConfig):
    """A HierarchicalTopK SAE trained for every budget k ≤ K (K = ``k``)."""

    architecture: str = "hierarchical"

    @property
    def k_max(self) -> int | None:
        return self.k


class PrefixLoss(torch.autograd.Function):
    """(target_BD = x − b_dec, values_BK sorted descending, indices_BK, W_dec_FD) -> (S, r_K detached).

    The gradients are computed in the forward pass (the loss is always differentiated when it is used) and
    scaled by the upstream gradient in the backward, so the selected decoder rows are gathered once.
    """

    @staticmethod
    def forward(
        ctx: Any,
        target_BD: torch.Tensor,
        values_BK: torch.Tensor,
        indices_BK: torch.Tensor,
        W_dec_FD: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, K = values_BK.shape
        d = W_dec_FD.shape[1]
        order_K = torch.arange(K, device=values_BK.device)
        a_K = (K - order_K).to(values_BK.dtype) / K  # share of the K budgets that include position i
        A_KK = (K - torch.maximum(order_K[:, None], order_K[None, :])).to(values_BK.dtype) / K
        total = target_BD.new_zeros((), dtype=torch.float64)
        grad_values_BK = torch.empty_like(values_BK)
        grad_target_BD = torch.empty_like(target_BD)
        residual_BD = torch.empty_like(target_BD)
        grad_W_FD = torch.zeros_like(W_dec_FD)
        rows = max(1, CHUNK_ELEMENTS // (K * d))
        for s in range(0, B, rows):
            r0_CD, v_CK, idx_CK = target_BD[s : s + rows], values_BK[s : s + rows], indices_BK[s : s + rows]
            rows_CKD = F.embedding(idx_CK, W_dec_FD)
            c_CK = torch.bmm(rows_CKD, r0_CD[:, :, None])[..., 0]  # ⟨w_i, r0⟩
            mix_CKD = torch.bmm(A_KK * v_CK[:, None, :], rows_CKD)  # M_i = Σ_i' A_ii' v_i' w_i'
            AvG_CK = torch.linalg.vecdot(rows_CKD, mix_CKD)  # Σ_i' A_ii' v_i' ⟨w_i, w_i'⟩ = ⟨w_i, M_i⟩
            total += (r0_CD.pow(2).sum() - 2 * (a_K * v_CK * c_CK).sum() + (v_CK * AvG_CK).sum()).double()
            grad_values_BK[s : s + rows] = 2 * (AvG_CK - a_K * c_CK)
            sums_C2D = torch.bmm(torch.stack([v_CK, a_K * v_CK], dim=1), rows_CKD)  # Σ v w, Σ a v w
            residual_BD[s : s + rows] = r0_CD - sums_C2D[:, 0]
            grad_target_BD[s : s + rows] = 2 * (r0_CD - sums_C2D[:, 1])
            # ∂S/∂w_i = 2 v_i (M_i − a_i r0)
            mix_CKD.addcmul_(a_K[None, :, None], r0_CD[:, None, :], value=-1).mul_(2 * v_CK[:, :, None])
            grad_W_FD.index_add_(0, idx_CK.reshape(-1), mix_CKD.reshape(-1, d))
        ctx.save_for_backward(grad_target_BD, grad_values_BK, grad_W_FD)
        ctx.mark_non_differentiable(residual_BD)
        return total.to(target_BD.dtype), residual_BD

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad_S = grads[0]
        if grad_S is None:
            return None, None, None, None
        grad_target_BD, grad_values_BK, grad_W_FD = ctx.saved_tensors
        return grad_target_BD * grad_S, grad_values_BK * grad_S, None, grad_W_FD.mul_(grad_S)


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
