"""The certified sparse assignment finds the optimum of scipy's dense solver on the same cost matrix."""

from __future__ import annotations

import pytest
import torch

from interlayer.flow.assignment import assignment, dense_assignment, squared_distances


def total(cost_FF: torch.Tensor, permutation: torch.Tensor) -> float:
    return float(cost_FF.double()[torch.arange(cost_FF.shape[0]), permutation].sum())


@pytest.mark.parametrize("k", [1, 2, 16])
@pytest.mark.parametrize("case", ["random", "clustered", "duplicates"])
def test_equals_the_dense_optimum(case: str, k: int) -> None:
    g = torch.Generator().manual_seed(0)
    n, p = 300, 12
    if case == "random":  # no structure: the hardest for a sparse candidate set
        a, b = torch.randn(n, p, generator=g), torch.randn(n, p, generator=g)
    elif case == "clustered":  # many near-equal costs: long augmenting paths
        centres = torch.randn(6, p, generator=g)
        a = centres[torch.randint(6, (n,), generator=g)] + 0.05 * torch.randn(n, p, generator=g)
        b = centres[torch.randint(6, (n,), generator=g)] + 0.05 * torch.randn(n, p, generator=g)
    else:  # exact ties: repeated rows
        a = torch.randn(30, p, generator=g).repeat(10, 1)
        b = torch.randn(30, p, generator=g).repeat(10, 1)
    permutation = assignment(a, b, k=k)
    assert torch.equal(permutation.sort().values, torch.arange(n))
    cost_FF = squared_distances(a, b)
    assert total(cost_FF, permutation) == pytest.approx(
        total(cost_FF, dense_assignment(cost_FF)), rel=1e-9, abs=1e-9
    )


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3])
def test_the_scale_of_the_inputs_does_not_matter(scale: float) -> None:
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 12, generator=g)
    a = scale * (centres[torch.randint(6, (300,), generator=g)] + 0.05 * torch.randn(300, 12, generator=g))
    b = scale * (centres[torch.randint(6, (300,), generator=g)] + 0.05 * torch.randn(300, 12, generator=g))
    cost_FF = squared_distances(a, b)
    reference = total(cost_FF, dense_assignment(cost_FF))
    assert total(cost_FF, assignment(a, b)) == pytest.approx(reference, rel=1e-7)


def test_known_permutation_is_recovered() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(500, 40, generator=g)
    perm = torch.randperm(500, generator=g)
    b = torch.empty_like(a)
    b[perm] = a + 0.1 * torch.randn(a.shape, generator=g)
    assert torch.equal(assignment(a, b), perm)


def test_squared_distances_by_hand() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g)
    want = ((a[:, None] - b[None]) ** 2).sum(-1)
    assert torch.allclose(squared_distances(a, b, rows_per_block=3), want, atol=1e-5)
