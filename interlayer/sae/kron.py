"""KronSAE with mAND (Kurochkin et al., arXiv:2505.22255), ``--architecture kron --heads H --m m --n n``.

A factorised encoder: one matrix W_enc of shape H·(m+n) × d with bias, for H heads h = 0..H−1,

    pre = ReLU(W_enc (x − b_dec) + b_enc) = [p_{0..H−1,0}, …, p_{0..H−1,m−1}, q_{0..H−1,0}, …, q_{0..H−1,n−1}]
          (factor-major rows: p_{h,i} is row i·H + h, q_{h,j} row H·m + j·H + h, so the per-head maxima
          are element-wise maxima of contiguous [B, H] slabs),
    z_{h,i,j} = mAND(p_{h,i}, q_{h,j}) = √(p_{h,i} · q_{h,j}),   latent f = h·m·n + i·n + j  (F = H·m·n, m ≤ n),

then TopK over the F post-latents and the ordinary F×d decoder: x̂ = W_decᵀ TopK(z) + b_dec. The encoder costs
O(H(m+n)d) instead of O(F·d). As for every SAE here, b_dec is subtracted before the encoder (the paper's
appendix does not; the two are equivalent by b_enc ← b_enc − W_enc b_dec).

The mAND rule used here: z = √(p·q) exactly, so a pair is 0 whenever p ≤ 0 or q ≤ 0 (after the ReLU: p = 0 or
q = 0), with no ε inside the root (the appendix's √(pq + 1e-5) makes every inactive pair ≈ 0.003, which
breaks exact sparsity and lets TopK pick inactive pairs). Gradient: where z > 0, ∂z/∂p = q / (2z) = ½√(q/p)
and ∂z/∂q = p / (2z); where z = 0 (either factor 0, or both) it is 0, the same convention as ReLU at 0. Only
the k selected pairs per token get gradients, so a tiny p with a large q can give a large but finite
gradient (both factors are ≥ the smallest positive float; tested).

Top-k without materialising the B×F post-latents (:class:`KronTopK`): a head's largest post-latent is
√(max p · max q), and every post-latent of a head is at most that. So a head whose maximum is not among the k
largest head maxima of its token holds no latent of the top k (k other heads each hold a larger one). Per
token, take the top min(k, h) heads by max p · max q, form their k·m·n candidate products, and keep the top
k of those (√ is monotone, so products are compared). The backward maps each selected latent's gradient to
its p and q entries and from there to W_enc, b_enc and x through the sparse rows of the encoder product
(:func:`interlayer.sae.kernels.sparse_linear_backward`), as the TopK encoder does.

Initialisation (the paper's): encoder N(0, 1)/√(2F), b_enc = 0, decoder row (h, i, j) = P_{h,i} + Q_{h,j}
(the encoder rows of that head's p_i and q_j), then rows normalised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.sae.base import SparseAutoencoder, TrainingOutput
from interlayer.sae.config import KConfig, SAEConfig
from interlayer.sae.kernels import sparse_decode, sparse_linear_backward, workspace


@dataclass(frozen=True, kw_only=True)
class KronConfig(KConfig):
    """A KronSAE: h heads of m × n mAND pairs each, F = h·m·n."""

    architecture: str = "kron"
    heads: int = 0
    """Heads h; 0 means latents / (m·n)."""
    m: int = 2
    """The p factors per head (m ≤ n; the paper recommends small m, from 2)."""
    n: int = 4
    """The q factors per head."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.m < 1 or self.n < 1:
            raise UserError(f"kron needs m ≥ 1 and n ≥ 1, got m = {self.m}, n = {self.n}")
        if self.m > self.n:
            raise UserError(f"kron needs m ≤ n, got m = {self.m} > n = {self.n}")
        mn = self.m * self.n
        if not self.heads and self.latents % mn:
            raise UserError(
                f"kron needs heads·m·n = latents, but latents {self.latents} is not a multiple of m·n = {mn}; "
                "choose --latents, --m and --n to fit"
            )
        heads = self.heads or self.latents // mn
        if heads * mn != self.latents:
            raise UserError(
                f"kron needs heads·m·n = latents: {heads}·{self.m}·{self.n} = {heads * mn} ≠ {self.latents}; "
                f"leave out --heads (it is then latents / (m·n)) or pass --heads {self.latents / mn:g}"
            )
        object.__setattr__(self, "heads", heads)

    @property
    def encoder_rows(self) -> int:
        """h·(m + n), the rows of the factorised encoder."""
        return self.heads * (self.m + self.n)


def p_column(latent: torch.Tensor, cfg: KronConfig) -> torch.Tensor:
    """The encoder row of p_{h,i} for latent f = h·m·n + i·n + j: row i·heads + h."""
    return (latent % (cfg.m * cfg.n)).div(cfg.n, rounding_mode="floor") * cfg.heads + latent.div(
        cfg.m * cfg.n, rounding_mode="floor"
    )


def q_column(latent: torch.Tensor, cfg: KronConfig) -> torch.Tensor:
    """The encoder row of q_{h,j} for latent f = h·m·n + i·n + j: row heads·m + j·heads + h."""
    return cfg.heads * cfg.m + (latent % cfg.n) * cfg.heads + latent.div(cfg.m * cfg.n, rounding_mode="floor")


class KronTopK(torch.autograd.Function):
    """(x_BD (already minus b_dec), W_enc_GD, b_enc_G, cfg, k, dead_F | None, k_aux)
    -> (values_BK, latent indices_BK, aux_values_BA, aux_indices_BA)."""

    @staticmethod
    def forward(
        ctx: Any,
        x_BD: torch.Tensor,
        W_enc_GD: torch.Tensor,
        b_enc_G: torch.Tensor,
        cfg: KronConfig,
        k: int,
        dead_F: torch.Tensor | None,
        k_aux: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h, m, n, mn = cfg.heads, cfg.m, cfg.n, cfg.m * cfg.n
        B, kh = x_BD.shape[0], min(k, h)
        pre_BG = torch.addmm(b_enc_G, x_BD, W_enc_GD.T, out=workspace(B, W_enc_GD.shape[0], x_BD))
        p_BMH, q_BNH = pre_BG[:, : h * m].view(B, m, h), pre_BG[:, h * m :].view(B, n, h)
        # ReLU is applied to the few values read below, never to the whole [B, h(m+n)] block; the maxima
        # over i and j run across contiguous [B, h] slabs (rows are factor-major, see p_column)
        head_max_BH = p_BMH.amax(1).clamp_min_(0).mul_(q_BNH.amax(1).clamp_min_(0))
        heads_BJ = head_max_BH.topk(kh, dim=1, sorted=False).indices
        p_BMJ = p_BMH.gather(2, heads_BJ[:, None, :].expand(-1, m, -1)).clamp_min_(0)
        q_BNJ = q_BNH.gather(2, heads_BJ[:, None, :].expand(-1, n, -1)).clamp_min_(0)
        products_BC = (p_BMJ[:, :, None, :] * q_BNJ[:, None, :, :]).view(B, mn * kh)
        top_BK, where_BK = products_BC.topk(k, dim=1, sorted=False)
        # candidate c = (i·n + j)·kh + slot, read from small tables instead of integer division on [B, k]
        c = torch.arange(mn * kh, device=x_BD.device)
        i_BK, j_BK, slot_BK = (c // (n * kh))[where_BK], (c // kh % n)[where_BK], (c % kh)[where_BK]
        head_BK = heads_BJ.gather(1, slot_BK)
        indices_BK = head_BK * mn + i_BK * n + j_BK
        cols_p_BS, cols_q_BS = i_BK * h + head_BK, h * m + j_BK * h + head_BK
        p_BS = p_BMJ.reshape(B, m * kh).gather(1, i_BK * kh + slot_BK)
        q_BS = q_BNJ.reshape(B, n * kh).gather(1, j_BK * kh + slot_BK)
        z_BS = top_BK.sqrt()
        aux_indices_BA = indices_BK.new_zeros(B, 0)
        if dead_F is not None and k_aux > 0:
            dead_ids = dead_F.nonzero().squeeze(1)
            if dead_ids.numel() > 0:
                dead_p, dead_q = p_column(dead_ids, cfg), q_column(dead_ids, cfg)
                p_BN = pre_BG.index_select(1, dead_p).clamp_min_(0)
                q_BN = pre_BG.index_select(1, dead_q).clamp_min_(0)
                top_BA, where = (p_BN * q_BN).topk(min(k_aux, dead_ids.numel()), dim=1, sorted=False)
                aux_indices_BA = dead_ids[where]
                cols_p_BS = torch.cat([cols_p_BS, dead_p[where]], dim=1)
                cols_q_BS = torch.cat([cols_q_BS, dead_q[where]], dim=1)
                p_BS = torch.cat([p_BS, p_BN.gather(1, where)], dim=1)
                q_BS = torch.cat([q_BS, q_BN.gather(1, where)], dim=1)
                z_BS = torch.cat([z_BS, top_BA.sqrt()], dim=1)
        ctx.save_for_backward(x_BD, W_enc_GD, cols_p_BS, cols_q_BS, p_BS, q_BS, z_BS)
        ctx.k = k
        ctx.mark_non_differentiable(indices_BK, aux_indices_BA)
        return z_BS[:, :k], indices_BK, z_BS[:, k:], aux_indices_BA

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        grad_values_BK, _, grad_aux_BA, _ = grads
        x_BD, W_enc_GD, cols_p_BS, cols_q_BS, p_BS, q_BS, z_BS = ctx.saved_tensors
        parts = [
            torch.zeros_like(z_BS[:, a:b]) if g is None else g
            for g, a, b in ((grad_values_BK, 0, ctx.k), (grad_aux_BA, ctx.k, z_BS.shape[1]))
            if b > a
        ]
        g_BS = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        live_BS = z_BS > 0
        half_over_z = torch.where(live_BS, 0.5 / z_BS.clamp_min(torch.finfo(z_BS.dtype).tiny), 0.0)
        g_p_BS, g_q_BS = g_BS * q_BS * half_over_z, g_BS * p_BS * half_over_z
        grad_x, grad_W, grad_b = sparse_linear_backward(
            torch.cat([g_p_BS, g_q_BS], dim=1).to(x_BD.dtype),
            torch.cat([cols_p_BS, cols_q_BS], dim=1),
            x_BD,
            W_enc_GD,
            ctx.needs_input_grad[:3],
        )
        return grad_x, grad_W, grad_b, None, None, None, None


def kron_topk(
    x_BD: torch.Tensor,
    W_enc_GD: torch.Tensor,
    b_enc_G: torch.Tensor,
    cfg: KronConfig,
    k: int,
    dead_F: torch.Tensor | None = None,
    k_aux: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopK over the mAND post-latents as (values, latent indices), plus the AuxK selection among ``dead_F``."""
    out = KronTopK.apply(x_BD, W_enc_GD, b_enc_G, cfg, k, dead_F, k_aux)
    return out[0], out[1], out[2], out[3]


class KronSAE(SparseAutoencoder):
    """Factorised mAND encoder, TopK over the F = h·m·n post-latents, dense decoder."""

    config_class = KronConfig
    file_names = {"W_enc": "W_enc_GD", "b_enc": "b_enc_G", **SparseAutoencoder.file_names}
    cfg: KronConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        assert isinstance(cfg, KronConfig)
        self.W_enc_GD = nn.Parameter(torch.empty(cfg.encoder_rows, cfg.d_in))
        self.b_enc_G = nn.Parameter(torch.zeros(cfg.encoder_rows))

    def initialise_(self, generator: torch.Generator, b_dec_D: torch.Tensor | None = None) -> None:
        cfg = self.cfg
        W_enc_GD = torch.randn(self.W_enc_GD.shape, generator=generator) / math.sqrt(2 * cfg.latents)
        split = cfg.heads * cfg.m
        P_HMD = W_enc_GD[:split].view(cfg.m, cfg.heads, cfg.d_in).transpose(0, 1)
        Q_HND = W_enc_GD[split:].view(cfg.n, cfg.heads, cfg.d_in).transpose(0, 1)
        self._initialise_decoder_(
            (P_HMD[:, :, None] + Q_HND[:, None, :]).reshape(cfg.latents, cfg.d_in), b_dec_D
        )
        with torch.no_grad():
            self.W_enc_GD.copy_(W_enc_GD)
            self.b_enc_G.zero_()

    def encoder_weight(self) -> nn.Parameter:
        return self.W_enc_GD

    def encode_sparse(self, x_BD: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        values_BK, indices_BK, _, _ = kron_topk(
            x_BD - self.b_dec_D, self.W_enc_GD, self.b_enc_G, self.cfg, self.cfg.k if k is None else k
        )
        return values_BK, indices_BK

    def _codes(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        values_BK, indices_BK = self.encode_sparse(x_BD, k)
        return x_BD.new_zeros(x_BD.shape[0], self.cfg.latents).scatter_(1, indices_BK, values_BK)

    def _forward(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        values_BK, indices_BK = self.encode_sparse(x_BD, k)
        return sparse_decode(values_BK, indices_BK, self.W_dec_FD) + self.b_dec_D

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        selection = kron_topk(
            x_BD - self.b_dec_D, self.W_enc_GD, self.b_enc_G, self.cfg, self.cfg.k, dead_F, k_aux
        )
        return self.sparse_training_output(x_BD, selection)
