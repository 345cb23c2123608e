"""Fast paths for TopK SAEs, each tested against plain autograd (tests/sae/test_kernels.py).

Fused TopK encoder
    Forward: pre = x W_encᵀ + b_enc (one ``addmm``), (v, i) = TopK(pre), v ← max(v, 0). Taking the top k of
    ``pre`` and clamping equals taking the top k of ReLU(pre): the selected values are the same multiset and
    a zero contributes nothing whatever its index. Optionally also the AuxK selection: the top k_aux of
    ReLU(pre) among the latents flagged dead, read from the same ``pre`` (no second matrix product).
    Backward (g = ∂L/∂v masked by v > 0, for the main and aux selections together):
        ∂L/∂x        = Σ_j g_j W_enc[i_j]                 (``embedding_bag`` over the selected rows)
        ∂L/∂W_enc[f] = Σ_{b,j: i_bj = f} g_bj x_b          (a sparse F×B matrix times x: only selected rows)
        ∂L/∂b_enc[f] = Σ_{b,j: i_bj = f} g_bj
    instead of the dense B×F gradient of plain autograd. This follows the shape of EleutherAI sparsify's
    fused encoder; written here because it must also carry the AuxK selection in the same pass.

Sparse decoder
    x̂ = Σ_j v_j W_dec[i_j] + b_dec as ``embedding_bag(i, W_dec, per_sample_weights=v, mode="sum")``: reads
    k rows per token instead of multiplying a dense B×F code by W_dec.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_WORKSPACE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def workspace(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A reused [rows, cols] buffer for the dense pre-activations, which are never kept past one forward.

    Allocating a fresh B×F tensor every step costs more than the bias add itself on CPU (a large allocation
    is fresh memory from the OS and page-faults on first touch), so the buffer is kept per device and dtype
    and grown when needed."""
    key = (like.device, like.dtype)
    buffer = _WORKSPACE.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        buffer = _WORKSPACE[key] = torch.empty(rows * cols, device=like.device, dtype=like.dtype)
    return buffer[: rows * cols].view(rows, cols)


def release_workspace() -> None:
    """Free the pre-activation buffers (B×F floats per device and dtype); the next encode allocates anew."""
    _WORKSPACE.clear()


class FusedTopKEncode(torch.autograd.Function):
    """(x_BD, W_enc_FD, b_enc_F, k, dead_F | None, k_aux) -> (values_BK, indices_BK, aux_values_BA, aux_indices_BA)."""

    @staticmethod
    def forward(
        ctx: Any,
        x_BD: torch.Tensor,
        W_enc_FD: torch.Tensor,
        b_enc_F: torch.Tensor,
        k: int,
        dead_F: torch.Tensor | None,
        k_aux: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pre_BF = torch.addmm(b_enc_F, x_BD, W_enc_FD.T, out=workspace(x_BD.shape[0], W_enc_FD.shape[0], x_BD))
        values_BK, indices_BK = pre_BF.topk(k, dim=1, sorted=False)
        values_BK = values_BK.clamp_(min=0)
        aux_values_BA = x_BD.new_zeros(x_BD.shape[0], 0)
        aux_indices_BA = indices_BK.new_zeros(x_BD.shape[0], 0)
        if dead_F is not None and k_aux > 0:
            dead_ids = dead_F.nonzero().squeeze(1)
            if dead_ids.numel() > 0:
                top, where = pre_BF.index_select(1, dead_ids).topk(
                    min(k_aux, dead_ids.numel()), dim=1, sorted=False
                )
                aux_values_BA, aux_indices_BA = top.clamp_(min=0), dead_ids[where]
        ctx.save_for_backward(x_BD, W_enc_FD, indices_BK, values_BK, aux_indices_BA, aux_values_BA)
        ctx.mark_non_differentiable(indices_BK, aux_indices_BA)
        return values_BK, indices_BK, aux_values_BA, aux_indices_BA

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad_values_BK, _, grad_aux_BA, _ = grads
        x_BD, W_enc_FD, indices_BK, values_BK, aux_indices_BA, aux_values_BA = ctx.saved_tensors
        parts_g, parts_i = [], []
        if grad_values_BK is not None:
            parts_g.append(grad_values_BK * (values_BK > 0))
            parts_i.append(indices_BK)
        if grad_aux_BA is not None and aux_indices_BA.shape[1] > 0:
            parts_g.append(grad_aux_BA * (aux_values_BA > 0))
            parts_i.append(aux_indices_BA)
        if not parts_g:
            return None, None, None, None, None, None
        g_BS = torch.cat(parts_g, dim=1).to(x_BD.dtype)
        grad_x, grad_W, grad_b = sparse_linear_backward(
            g_BS, torch.cat(parts_i, dim=1), x_BD, W_enc_FD, ctx.needs_input_grad[:3]
        )
        return grad_x, grad_W, grad_b, None, None, None


def sparse_linear_backward(
    g_BS: torch.Tensor,
    i_BS: torch.Tensor,
    x_BD: torch.Tensor,
    W_GD: torch.Tensor,
    needs: tuple[bool, ...] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of pre = x Wᵀ + b when ∂L/∂pre is sparse: g[b, s] at column i[b, s] (duplicates summed).

    Returns (∂L/∂x = Σ_s g_bs W[i_bs], ∂L/∂W[g] = Σ_{b,s: i_bs = g} g_bs x_b, ∂L/∂b[g] = Σ g_bs), each None
    where ``needs`` says it is not wanted.
    """
    grad_x = grad_W = grad_b = None
    if needs[0]:
        grad_x = F.embedding_bag(i_BS, W_GD, per_sample_weights=g_BS, mode="sum")
    if needs[1]:
        grad_W = torch.sparse.mm(_selection_matrix(g_BS, i_BS, W_GD.shape[0]), x_BD)
    if needs[2]:
        grad_b = W_GD.new_zeros(W_GD.shape[0]).index_add_(0, i_BS.reshape(-1), g_BS.reshape(-1))
    return grad_x, grad_W, grad_b


def _selection_matrix(g_BS: torch.Tensor, i_BS: torch.Tensor, latents: int) -> torch.Tensor:
    """The sparse F×B matrix G with G[i_bs, b] = g_bs (duplicates summed), so that G x = Σ g_bs x_b per latent."""
    batch, slots = i_BS.shape
    rows_S = torch.arange(batch, device=i_BS.device).repeat_interleave(slots)
    coords = torch.stack([i_BS.reshape(-1), rows_S])
    return torch.sparse_coo_tensor(coords, g_BS.reshape(-1), (latents, batch), check_invariants=False)


def fused_topk_encode(
    x_BD: torch.Tensor,
    W_enc_FD: torch.Tensor,
    b_enc_F: torch.Tensor,
    k: int,
    dead_F: torch.Tensor | None = None,
    k_aux: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopK(ReLU(x W_encᵀ + b_enc)) as (values, indices), plus the AuxK selection among ``dead_F`` latents."""
    out = FusedTopKEncode.apply(x_BD, W_enc_FD, b_enc_F, k, dead_F, k_aux)
    return out[0], out[1], out[2], out[3]


def sparse_decode(values_BK: torch.Tensor, indices_BK: torch.Tensor, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """Σ_j values[b, j] · W_dec[indices[b, j]] for every row b (no decoder bias)."""
    return F.embedding_bag(indices_BK, W_dec_FD, per_sample_weights=values_BK.to(W_dec_FD.dtype), mode="sum")
