"""HierarchicalTopK SAE (Balagansky et al., arXiv:2505.24473), ``--architecture hierarchical``: one SAE for
every sparsity budget k ≤ K.

Codes are TopK's with K = ``--k``. Sort a token's K selected values descending, v_(1) ≥ … ≥ v_(K) with
latents f_(1), …; the prefix reconstructions are x̂_j = b_dec + Σ_{i ≤ j} v_(i) W_dec[f_(i)], and the loss
term is the mean over budgets

    S = (1/K) Σ_{j=1..K} Σ_b ‖x_b − x̂_{j,b}‖²

(normalised by Σ‖x − x̄‖² in the trainer, like TopK's). AuxK is TopK's. At inference any k ≤ K keeps the k
largest (``sae.encode(x, k=8)``, ``interlayer sae eval --k-eval 8,16``), which is exactly the prefix x̂_k.

:class:`PrefixLoss` computes S and its gradients without a B×K×d tensor. Per token, with r0 = x − b_dec,
w_i = W_dec[f_(i)], positions i = 0..K−1, a_i = (K − i)/K (the share of the K budgets that include
position i) and A_ii' = (K − max(i, i'))/K (the share that include both),

    S_b = ‖r0‖² − 2 Σ_i a_i v_i ⟨w_i, r0⟩ + Σ_{i,i'} A_ii' v_i v_i' ⟨w_i, w_i'⟩,

and, with M_i = Σ_i' A_ii' v_i' w_i',
    ∂S/∂v_i = 2 ⟨w_i, M_i − a_i r0⟩,   ∂S/∂w_i = 2 v_i (M_i − a_i r0),   ∂S/∂r0 = 2 (r0 − Σ_i a_i v_i w_i).
Tokens go in chunks of C = CHUNK_ELEMENTS / (K·max(d, K)): each chunk gathers its C×K decoder rows once and forms
2v_i(M_i − a_i r0) with one batched K×K product; S, ∂S/∂v, ∂S/∂r0 and the scatter into ∂S/∂W_dec follow
from it, in the forward pass (the backward only scales them). Memory is O(C·K·max(d, K)): 8 MB per
buffer on the CPU, 64 MB on a GPU (fewer, larger launches), never B×K×d. The official Triton kernel (github.com/corl-team/flexsae) loops over budgets instead (a running
suffix sum of residuals); the algebra above turns that loop into BLAS products, which is what plain
PyTorch does fast on a CPU and on any GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from interlayer.sae.base import TrainingOutput
from interlayer.sae.topk import TopKConfig, TopKSAE

CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 24}
"""Per device type: tokens go in chunks of C = CHUNK_ELEMENTS // (K·max(d, K)), so each C×K×d (or C×K×K)
buffer holds at most this many floats (8 MB on the CPU, 64 MB on a GPU)."""


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
        budget = CHUNK_ELEMENTS.get(target_BD.device.type, CHUNK_ELEMENTS["cpu"])
        rows = max(1, budget // (K * max(d, K)))
        for s in range(0, B, rows):
            r0_CD, v_CK, idx_CK = target_BD[s : s + rows], values_BK[s : s + rows], indices_BK[s : s + rows]
            rows_CKD = F.embedding(idx_CK, W_dec_FD)
            two_v_CK1 = 2 * v_CK[:, :, None]
            # T_i = 2 v_i (M_i − a_i r0) with M_i = Σ_i' A_ii' v_i' w_i': the rows of ∂S/∂W_dec
            T_CKD = torch.bmm(two_v_CK1 * A_KK * v_CK[:, None, :], rows_CKD)
            T_CKD.addcmul_(two_v_CK1 * a_K[:, None], r0_CD[:, None, :], value=-1)
            # u_i = ⟨w_i, M_i − a_i r0⟩ = ⟨w_i, T_i⟩ / 2v_i (unused where v_i = 0: the encoder's gradient
            # is masked there)
            u_CK = torch.linalg.vecdot(rows_CKD, T_CKD) / two_v_CK1[..., 0].clamp_min(
                torch.finfo(v_CK.dtype).tiny
            )
            grad_values_BK[s : s + rows] = 2 * u_CK
            sums_C2D = torch.bmm(torch.stack([v_CK, a_K * v_CK], dim=1), rows_CKD)  # Σ v w, Σ a v w
            # S_b = ‖r0‖² − 2 Σ a_i v_i c_i + Σ v_i ⟨w_i, M_i⟩ = ‖r0‖² + Σ v_i u_i − ⟨Σ a_i v_i w_i, r0⟩
            total += (r0_CD.pow(2).sum() + (v_CK * u_CK).sum() - (sums_C2D[:, 1] * r0_CD).sum()).double()
            residual_BD[s : s + rows] = r0_CD - sums_C2D[:, 0]
            grad_target_BD[s : s + rows] = 2 * (r0_CD - sums_C2D[:, 1])
            grad_W_FD.index_add_(0, idx_CK.reshape(-1), T_CKD.reshape(-1, d))
        # kept as attributes, not saved tensors, so the backward can scale them in place (no second F×d copy)
        ctx.grads = (grad_target_BD, grad_values_BK, grad_W_FD)
        ctx.mark_non_differentiable(residual_BD)
        return total.to(target_BD.dtype), residual_BD

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad_S = grads[0]
        if grad_S is None:
            return None, None, None, None
        if ctx.grads is None:
            raise RuntimeError("PrefixLoss supports one backward pass (its gradients are scaled in place)")
        grad_target_BD, grad_values_BK, grad_W_FD = ctx.grads
        ctx.grads = None
        return grad_target_BD.mul_(grad_S), grad_values_BK.mul_(grad_S), None, grad_W_FD.mul_(grad_S)


def prefix_loss(
    target_BD: torch.Tensor, values_BK: torch.Tensor, indices_BK: torch.Tensor, W_dec_FD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/K) Σ_j Σ_b ‖target_b − Σ_{i ≤ j} v_bi W_dec[i_bi]‖² (values sorted descending, ≥ 0) and the final
    residual. The gradient with respect to a value that is exactly 0 is returned as 0: the values are ReLU
    outputs, whose gradient is 0 there anyway."""
    out = PrefixLoss.apply(target_BD, values_BK, indices_BK, W_dec_FD)
    return out[0], out[1]


class HierarchicalTopKSAE(TopKSAE):
    """TopK codes with K = ``k``; loss averaged over every budget j ≤ K of the sorted prefix."""

    config_class = HierarchicalConfig
    cfg: HierarchicalConfig

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        selection = self.select(x_BD, dead_F, k_aux)
        values_BK, indices_BK = selection[0], selection[1]
        order_BK = values_BK.detach().argsort(dim=1, descending=True)
        recon, residual_BD = prefix_loss(
            x_BD - self.b_dec_D, values_BK.gather(1, order_BK), indices_BK.gather(1, order_BK), self.W_dec_FD
        )
        return self.sparse_training_output(x_BD, selection, (recon, x_BD - residual_BD))
