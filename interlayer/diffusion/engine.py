"""The sampling engine shared by every sampler: state, seeded per-sample noise, proposals, NFE accounting.

Samples are generated in batches, but every random number a sample uses comes from its own generator,
seeded from (seed, index of the sample), and each step draws the same amount from it whatever happens, so
a sample depends only on (seed, its index, its template) — not on the batch size or on its neighbours.

A *template* says what to generate: positions holding the [MASK] id are generated (``generated``), every
other position is fixed (a prompt, the context around an infilling gap, BOS); padding positions
(``attention = 0``) are fixed and hidden from the network.

Network evaluations (NFE) are counted per sample: a sample's count goes up by one each time its row is
passed through the denoiser (``nfe``) or the remasker (``remasker_nfe``). The denoiser's output for a row is
cached and reused while the row has not changed since it was computed (MDLM's cache: exact, because the
networks here do not take t), and rows without a [MASK] are not evaluated when only x̂0 is needed.

Proposals: x̂0 at a masked position is drawn from p_θ(· | x_t)^(1/T) renormalised, restricted to its
nucleus (the smallest set of most probable tokens whose mass reaches ``top_p``), by inverse-CDF sampling
(in vocabulary order) with one uniform per position; T = 0 takes the argmax. The proposal's probability of the drawn token is its
*confidence* ψ.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from interlayer.diffusion.denoiser import Denoiser
from interlayer.training import row_seed


class RowNoise:
    """One CPU generator per sample; :meth:`step` draws exactly 2 × L uniforms from each."""

    def __init__(self, seed: int, indices: range, length: int, device: torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(row_seed(seed, i)) for i in indices]
        self.length = length
        self.device = device

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float32 [B, L] tensors of U(0, 1) draws: for tokens and for the step's other choices."""
        draws_B2L = torch.stack([torch.rand(2, self.length, generator=g) for g in self.generators])
        draws_B2L = draws_B2L.to(self.device)
        return draws_B2L[:, 0], draws_B2L[:, 1]


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise −log(−log u) from uniforms."""
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def nucleus_threshold(p_MV: torch.Tensor, top_p: float) -> torch.Tensor:
    """τ per row [M, 1]: the smallest probability in the nucleus — the most probable tokens taken in order until
    their mass reaches ``top_p`` of the row's.

    Only the sorted *values* are needed, not the order: on the CPU they come from ``numpy.sort`` (a radix
    sort for floats, about 10× faster here than ``torch.sort``, whose order we would not use); on a GPU from
    ``torch.sort``. With the values v_1 ≥ v_2 ≥ … the nucleus is {j : v_1 + … + v_{j−1} < top_p · Σ v}."""
    total_M1 = p_MV.sum(-1, keepdim=True)
    if p_MV.device.type == "cpu":
        ascending_MV = torch.from_numpy(np.sort(p_MV.detach().numpy(), axis=-1))
        after_MV = total_M1 - ascending_MV.cumsum(-1)  # mass strictly after each value in ascending order
        count_M1 = (after_MV < top_p * total_M1).sum(-1, keepdim=True)
        return ascending_MV.gather(-1, p_MV.shape[-1] - count_M1)
    descending_MV = p_MV.sort(-1, descending=True).values
    before_MV = descending_MV.cumsum(-1) - descending_MV
    count_M1 = (before_MV < top_p * total_M1).sum(-1, keepdim=True)
    return descending_MV.gather(-1, count_M1 - 1)


def draw_tokens(
    log_p_MV: torch.Tensor, u_M: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``log_p_MV`` as the module doc says; returns (tokens, their probability ψ).

    The nucleus is {v : p_v ≥ τ} (:func:`nucleus_threshold`; tokens tied with τ are all kept), and the draw is
    the inverse CDF of p restricted to it, in vocabulary order, at the row's uniform."""
    if temperature == 0.0:
        tokens_M = log_p_MV.argmax(-1)
        return tokens_M, log_p_MV.gather(-1, tokens_M.unsqueeze(-1)).squeeze(-1).exp()
    p_MV = log_p_MV.exp() if temperature == 1.0 else (log_p_MV / temperature).softmax(-1)
    if top_p < 1.0:
        p_MV = p_MV * (p_MV >= nucleus_threshold(p_MV, top_p))
    cdf_MV = p_MV.cumsum(-1)
    tokens_M = torch.searchsorted(cdf_MV, (u_M * cdf_MV[:, -1]).unsqueeze(-1)).squeeze(-1)
    tokens_M = tokens_M.clamp(max=p_MV.shape[-1] - 1)
    return tokens_M, p_MV.gather(-1, tokens_M.unsqueeze(-1)).squeeze(-1) / cdf_MV[:, -1]


class ErrorScorer(Protocol):
    """What G-Star's remasking needs: per-position error logits [B, L] for a batch of full proposals."""

    def __call__(self, x0_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class State:
    """One batch in flight."""

    x_BL: torch.Tensor
    """Current tokens (int64)."""
    generated_BL: torch.Tensor
    """Positions the sampler writes (bool)."""
    attention_BL: torch.Tensor
    """1 for real positions, 0 for padding."""
    mask_id: int
    confidence_BL: torch.Tensor
    """ψ of each decoded token (the proposal probability it was drawn with); 1 at fixed positions."""
    nfe_B: torch.Tensor
    remasker_nfe_B: torch.Tensor
    network_seconds: float = 0.0
    cache_BLV: torch.Tensor | None = None
    fresh_B: torch.Tensor | None = None
    """Rows whose cached denoiser output is for their current tokens."""

    @property
    def masked_BL(self) -> torch.Tensor:
        return self.x_BL == self.mask_id

    def changed(self, rows_B: torch.Tensor) -> None:
        """Mark rows whose tokens changed: their cached denoiser output is stale."""
        if self.fresh_B is not None:
            self.fresh_B &= ~rows_B


def timed(state: State, device: torch.device, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run a network call and add its time (synchronised on CUDA) to ``state.network_seconds``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state.network_seconds += time.perf_counter() - started
    return out


def predict(state: State, denoiser: Denoiser, need_B: torch.Tensor) -> torch.Tensor:
    """log p_θ(x0 | x_t) [B, L, V] at the [MASK] positions of every row (:meth:`Denoiser.masked_log_probs`),
    computed for the rows in ``need_B`` whose cache is stale (the others' entries are the cached ones, or
    stale for rows not needed). The networks do not take t, so the cache is exact."""
    if state.cache_BLV is None or state.fresh_B is None:
        batch, length = state.x_BL.shape
        state.cache_BLV = torch.empty(
            batch, length, denoiser.vocab_size, device=state.x_BL.device, dtype=torch.float32
        )
        state.fresh_B = torch.zeros(batch, dtype=torch.bool, device=state.x_BL.device)
    run_B = need_B & ~state.fresh_B
    if bool(run_B.any()):
        rows = run_B.nonzero().squeeze(1)
        x_RL, attention_RL = state.x_BL[rows], state.attention_BL[rows]
        log_p_RLV = timed(state, denoiser.device, lambda: denoiser.masked_log_probs(x_RL, attention_RL))
        if len(rows) == len(state.x_BL):
            state.cache_BLV = log_p_RLV  # every row recomputed: keep the tensor instead of copying it in
        else:
            state.cache_BLV[rows] = log_p_RLV
        state.nfe_B[rows] += 1
        state.fresh_B[rows] = True
    return state.cache_BLV


def propose(
    state: State,
    log_p_BLV: torch.Tensor,
    where_BL: torch.Tensor,
    u_BL: torch.Tensor,
    temperature: float,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 and ψ: the current tokens and confidences with a fresh draw at ``where_BL``."""
    x0_BL, psi_BL = state.x_BL.clone(), state.confidence_BL.clone()
    if bool(where_BL.any()):
        tokens_M, psi_M = draw_tokens(log_p_BLV[where_BL], u_BL[where_BL], temperature, top_p)
        x0_BL[where_BL], psi_BL[where_BL] = tokens_M, psi_M
    return x0_BL, psi_BL


def score_errors(
    state: State, scorer: ErrorScorer, x0_BL: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The remasker's error logits for every row's proposal, counted in ``remasker_nfe``."""
    logits_BL = timed(state, device, lambda: scorer(x0_BL, state.attention_BL))
    state.remasker_nfe_B += 1
    return logits_BL


def top_k_positions(score_BL: torch.Tensor, eligible_BL: torch.Tensor, k_B: torch.Tensor) -> torch.Tensor:
    """A bool [B, L] selecting, in each row b, the k_b eligible positions of highest score (ties: lower index)."""
    score_BL = score_BL.masked_fill(~eligible_BL, float("-inf"))
    order_BL = score_BL.argsort(dim=-1, descending=True, stable=True)
    rank_BL = torch.empty_like(order_BL)
    rank_BL.scatter_(
        -1, order_BL, torch.arange(score_BL.shape[1], device=score_BL.device).expand_as(order_BL)
    )
    return (rank_BL < k_B.unsqueeze(1)) & eligible_BL
