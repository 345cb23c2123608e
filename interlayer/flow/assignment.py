"""Exact linear assignment for C_ij = ‖a_i − b_j‖² between two point sets, without solving the dense problem.

scipy's dense ``linear_sum_assignment`` is exact but its run time depends on the cost's structure: on real SAE
pairs (MiniLM, F = 4096) it took 2–13 s, which grows to minutes at F = 16,384. Here the same optimum comes
from scipy's sparse solver (``min_weight_full_bipartite_matching``, LAPJVsp) on a small candidate set, with a
linear-programming certificate that it is the optimum of the full problem:

1. C is built once (float32, from one matmul of inner products: 1 GiB at F = 16,384). Candidates: each row's
   K nearest columns, each column's K nearest rows, and the diagonal (so that a perfect matching always exists).
2. Solve the assignment on the candidates exactly: matching M, row i → column M(i).
3. Duals. Complementary slackness fixes y_i = C_{i,M(i)} − z_{M(i)}; dual feasibility y_i + z_j ≤ C_ij on the
   candidates is the system of difference constraints z_j ≤ z_{M(i)} + (C_ij − C_{i,M(i)}), solved by
   Bellman–Ford (shortest distances from a virtual source; no negative cycle exists because M is optimal
   on the candidates).
4. Certificate: if every reduced cost C_ij − y_i − z_j of the full matrix is ≥ −tol, (y, z) is dual feasible
   for the full problem and M is optimal for it (LP duality: Σ_i C_{i,M(i)} = Σ y + Σ z). Otherwise the
   violating entries (up to K per row) join the candidates and the loop returns to 2; it ends because the
   candidate set only grows.

C is first divided by max |C| (no optimum changes), so that the shift the sparse solver needs and the
tolerances below mean the same at every scale of the inputs. Costs, duals and the check all read the same
float32 C (in float64 arithmetic), so the permutation certified is optimal for that matrix, the one scipy's
dense solver is handed too (tested, also at input scales down to 1e-6), up to tol = 1e-9 per entry, which
absorbs the float64 rounding of the Bellman–Ford sums.
"""

from __future__ import annotations

import math

import scipy.sparse
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

CANDIDATES = 16
"""K: nearest columns per row (and rows per column) in the first candidate set."""


def squared_distances(a_FP: torch.Tensor, b_FP: torch.Tensor, rows_per_block: int = 2048) -> torch.Tensor:
    """C [F_a, F_b] (float32, CPU): C_ij = ‖a_i‖² + ‖b_j‖² − 2 a_i·b_j, built block by block."""
    out = torch.empty(a_FP.shape[0], b_FP.shape[0])
    sq_b_F = b_FP.pow(2).sum(1)
    for start in range(0, a_FP.shape[0], rows_per_block):
        a_BP = a_FP[start : start + rows_per_block]
        out[start : start + a_BP.shape[0]] = torch.addmm(
            sq_b_F[None, :] + a_BP.pow(2).sum(1, keepdim=True), a_BP, b_FP.T, alpha=-2
        ).cpu()
    return out


def dense_assignment(cost_FF: torch.Tensor) -> torch.Tensor:
    """π minimising Σ_i C_{i,π(i)} with scipy's dense ``linear_sum_assignment`` (the reference)."""
    rows, cols = linear_sum_assignment(cost_FF.double().numpy())
    permutation = torch.empty(cost_FF.shape[0], dtype=torch.int64)
    permutation[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return permutation


def _keys(rows: torch.Tensor, cols: torch.Tensor, n: int) -> torch.Tensor:
    """Edges as sorted unique int64 keys row·n + column."""
    return torch.unique(rows * n + cols)


def _initial_candidates(cost_FF: torch.Tensor, k: int) -> torch.Tensor:
    """Keys of every row's k nearest columns, every column's k nearest rows, and the diagonal."""
    n = cost_FF.shape[0]
    near_rows_FK = cost_FF.topk(k, dim=1, largest=False).indices
    near_cols_KF = cost_FF.topk(k, dim=0, largest=False).indices
    diagonal = torch.arange(n)
    rows = torch.cat([diagonal, diagonal.repeat_interleave(k), near_cols_KF.reshape(-1)])
    cols = torch.cat([diagonal, near_rows_FK.reshape(-1), diagonal.repeat(near_cols_KF.shape[0])])
    return _keys(rows, cols, n)


def _sparse_solve(cost_E: torch.Tensor, rows_E: torch.Tensor, cols_E: torch.Tensor, n: int) -> torch.Tensor:
    """The optimal perfect matching on the candidate edges (row i → column)."""
    # shifted to be positive: a sparse matrix cannot hold a weight of 0, and a shift changes no optimum
    weights = (cost_E - cost_E.min() + 1.0).numpy()
    graph = scipy.sparse.csr_matrix((weights, (rows_E.numpy(), cols_E.numpy())), shape=(n, n))
    _, columns = min_weight_full_bipartite_matching(graph)
    return torch.from_numpy(columns).long()


def _column_duals(
    cost_E: torch.Tensor,
    rows_E: torch.Tensor,
    cols_E: torch.Tensor,
    matched_F: torch.Tensor,
    permutation: torch.Tensor,
) -> torch.Tensor:
    """z solving z_j ≤ z_{M(i)} + C_ij − C_{i,M(i)} on the candidates (Bellman–Ford from a virtual source)."""
    source_E = permutation[rows_E]
    slack_E = cost_E - matched_F[rows_E]
    z_F = torch.zeros(permutation.numel(), dtype=torch.float64)
    for _ in range(permutation.numel() + 1):
        relaxed = torch.full_like(z_F, math.inf).scatter_reduce(
            0, cols_E, z_F[source_E] + slack_E, reduce="amin"
        )
        updated = torch.minimum(z_F, relaxed)
        if torch.equal(updated, z_F):
            return z_F
        z_F = updated
    raise RuntimeError("negative cycle among the candidate edges: the sparse matching was not optimal")


def _violations(
    cost_FF: torch.Tensor,
    y_F: torch.Tensor,
    z_F: torch.Tensor,
    tol: float,
    k: int,
    rows_per_block: int = 2048,
) -> torch.Tensor:
    """Keys of entries with reduced cost C_ij − y_i − z_j < −tol (at most k per row, most negative first).

    A float32 pass flags the entries below a margin (the float32 rounding of y_i + z_j); only those are
    recomputed in float64, so the test is exact at the cost of one float32 sweep over C."""
    n = cost_FF.shape[0]
    margin = 1e-6 * max(float(y_F.abs().max() + z_F.abs().max()), 1.0)
    y32_F, z32_F = y_F.float(), z_F.float()
    found = []
    for start in range(0, n, rows_per_block):
        block_BF = cost_FF[start : start + rows_per_block]
        rows, cols = (
            (block_BF - y32_F[start : start + rows_per_block, None] - z32_F) < margin - tol
        ).nonzero(as_tuple=True)
        rows = rows + start
        reduced = cost_FF[rows, cols].double() - y_F[rows] - z_F[cols]
        bad = reduced < -tol
        rows, cols, reduced = rows[bad], cols[bad], reduced[bad]
        if rows.numel() > k * block_BF.shape[0]:  # keep the k most negative of each row
            order = torch.argsort(rows * 4.0 * (float(reduced.abs().max()) + 1) + reduced)
            rows, cols = rows[order], cols[order]
            rank = torch.arange(rows.numel()) - torch.searchsorted(rows, rows)
            rows, cols = rows[rank < k], cols[rank < k]
        found.append(rows * n + cols)
    return torch.cat(found) if found else torch.empty(0, dtype=torch.int64)


def assignment(a_FP: torch.Tensor, b_FP: torch.Tensor, k: int = CANDIDATES) -> torch.Tensor:
    """π minimising Σ_i ‖a_i − b_π(i)‖² over permutations, certified optimal (see the module docstring)."""
    cost_FF = squared_distances(a_FP.float(), b_FP.float())
    cost_FF /= max(float(cost_FF.abs().max()), torch.finfo(torch.float32).tiny)  # scale-free: max |C| = 1
    n = cost_FF.shape[0]
    k = min(k, n)
    tol = 1e-9
    keys = _initial_candidates(cost_FF, k)
    while True:
        rows_E, cols_E = keys // n, keys % n
        cost_E = cost_FF[rows_E, cols_E].double()
        permutation = _sparse_solve(cost_E, rows_E, cols_E, n)
        matched_F = cost_FF[torch.arange(n), permutation].double()
        z_F = _column_duals(cost_E, rows_E, cols_E, matched_F, permutation)
        y_F = matched_F - z_F[permutation]
        grown = torch.unique(torch.cat([keys, _violations(cost_FF, y_F, z_F, tol, k)]))
        if grown.numel() == keys.numel():  # no entry outside the candidates violates: certified optimal
            return permutation
        keys = grown
