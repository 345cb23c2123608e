"""The fused TopK encoder and the sparse decoder against plain dense autograd (float64, tight tolerances)."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE

from interlayer.sae.kernels import FusedTopKEncode, fused_topk_encode, sparse_decode

B, D, F, K = 12, 10, 40, 5


def dense_codes(values_BK: torch.Tensor, indices_BK: torch.Tensor, latents: int) -> torch.Tensor:
    """Scatter (value, index) pairs into a dense [B, F] code (differentiable in the values)."""
    return values_BK.new_zeros(values_BK.shape[0], latents).scatter(1, indices_BK, values_BK)


def reference_topk(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Dense TopK(ReLU(pre)): keep the k largest of ReLU(pre) per row, zero elsewhere."""
    act_BF = pre_BF.relu()
    top, where = act_BF.topk(k, dim=1)
    return torch.zeros_like(act_BF).scatter(1, where, top)


def reference_aux(pre_BF: torch.Tensor, dead_F: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Dense top-k_aux of ReLU(pre) among the dead latents only, zero elsewhere."""
    act_BF = pre_BF.relu().masked_fill(~dead_F, float("-inf"))
    top, where = act_BF.topk(min(k_aux, int(dead_F.sum())), dim=1)
    return torch.zeros_like(pre_BF).scatter(1, where, top)


def make_inputs(seed: int, dtype: torch.dtype = torch.float64, bias_shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    W = torch.randn(F, D, generator=g, dtype=dtype) / D**0.5
    b = torch.randn(F, generator=g, dtype=dtype) * 0.1 + bias_shift
    if bias_shift < 0:
        # rows of growing norm under a negative bias: the first rows have few or no positive pre-activations
        x = x * torch.linspace(0.05, 1.5, B, dtype=dtype)[:, None]
    return x.to(TEST_DEVICE), W.to(TEST_DEVICE), b.to(TEST_DEVICE)


def test_forward_matches_dense_reference() -> None:
    x, W, b = make_inputs(0)
    values, indices, aux_v, aux_i = fused_topk_encode(x, W, b, K)
    assert values.shape == (B, K) and indices.shape == (B, K)
    assert aux_v.shape == (B, 0) and aux_i.shape == (B, 0)
    assert values.dtype == torch.float64
    ref = reference_topk(x @ W.T + b, K)
    torch.testing.assert_close(dense_codes(values, indices, F), ref, rtol=0, atol=1e-12)
    # every row here has at least K positive pre-activations: exactly K nonzeros per row
    assert (dense_codes(values, indices, F) != 0).sum(1).tolist() == [K] * B


def test_forward_rows_with_fewer_than_k_positive() -> None:
    """Rows with 0 < #positive < k and with no positive pre-activation at all: only positives survive."""
    x, W, b = make_inputs(1, bias_shift=-0.75)
    pre = x @ W.T + b
    positives = (pre > 0).sum(1)
    assert int(positives.min()) == 0, "the case must include a row with no positive pre-activation"
    assert bool(((positives > 0) & (positives < K)).any()), "and a row with between 1 and k-1 positives"
    values, indices, _, _ = fused_topk_encode(x, W, b, K)
    assert bool((values >= 0).all())
    dense = dense_codes(values, indices, F)
    torch.testing.assert_close(dense, reference_topk(pre, K), rtol=0, atol=1e-12)
    assert (dense > 0).sum(1).tolist() == positives.clamp(max=K).tolist()


def test_forward_with_aux_selection() -> None:
    x, W, b = make_inputs(2)
    dead = torch.zeros(F, dtype=torch.bool, device=TEST_DEVICE)
    dead[torch.randperm(F, generator=torch.Generator().manual_seed(3))[:15]] = True
    k_aux = 6
    values, indices, aux_v, aux_i = fused_topk_encode(x, W, b, K, dead, k_aux)
    pre = x @ W.T + b
    torch.testing.assert_close(dense_codes(values, indices, F), reference_topk(pre, K), rtol=0, atol=1e-12)
    assert aux_v.shape == (B, k_aux)
    assert bool(dead[aux_i].all()), "the aux selection must only pick dead latents"
    torch.testing.assert_close(
        dense_codes(aux_v, aux_i, F), reference_aux(pre, dead, k_aux), rtol=0, atol=1e-12
    )
    # fewer dead latents than k_aux: all of them are taken
    few = torch.zeros(F, dtype=torch.bool, device=TEST_DEVICE)
    few[[4, 9, 33]] = True
    _, _, aux_v, aux_i = fused_topk_encode(x, W, b, K, few, k_aux)
    assert aux_v.shape == (B, 3)
    torch.testing.assert_close(
        dense_codes(aux_v, aux_i, F), reference_aux(pre, few, k_aux), rtol=0, atol=1e-12
    )
    # no dead latent: no aux selection
    _, _, aux_v, _ = fused_topk_encode(
        x, W, b, K, torch.zeros(F, dtype=torch.bool, device=TEST_DEVICE), k_aux
    )
    assert aux_v.shape == (B, 0)


@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("bias_shift", [0.0, -0.6])
def test_backward_matches_dense_autograd(with_aux: bool, bias_shift: float) -> None:
    """Gradients w.r.t. x, W_enc and b_enc for random upstream gradients on both outputs."""
    x, W, b = make_inputs(4, bias_shift=bias_shift)
    dead = None
    k_aux = 0
    if with_aux:
        dead = torch.zeros(F, dtype=torch.bool, device=TEST_DEVICE)
        dead[torch.randperm(F, generator=torch.Generator().manual_seed(5))[:12]] = True
        k_aux = 4
    g = torch.Generator().manual_seed(6)
    up_main = torch.randn(B, F, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    up_aux = torch.randn(B, F, generator=g, dtype=torch.float64).to(TEST_DEVICE)

    xs, Ws, bs = (t.clone().requires_grad_(True) for t in (x, W, b))
    values, indices, aux_v, aux_i = fused_topk_encode(xs, Ws, bs, K, dead, k_aux)
    loss = (dense_codes(values, indices, F) * up_main).sum()
    if with_aux:
        loss = loss + (dense_codes(aux_v, aux_i, F) * up_aux).sum()
    loss.backward()

    xr, Wr, br = (t.clone().requires_grad_(True) for t in (x, W, b))
    pre = xr @ Wr.T + br
    loss_ref = (reference_topk(pre, K) * up_main).sum()
    if with_aux:
        assert dead is not None
        loss_ref = loss_ref + (reference_aux(pre, dead, k_aux) * up_aux).sum()
    loss_ref.backward()

    if bias_shift < 0:
        assert int(((x @ W.T + b) > 0).sum(1).min()) < K, "want rows with fewer than k positives"
    for got, want in ((xs.grad, xr.grad), (Ws.grad, Wr.grad), (bs.grad, br.grad)):
        assert got is not None and want is not None
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_backward_only_aux_output_used() -> None:
    """An upstream gradient on the aux values alone (main values unused) still reaches x, W and b."""
    x, W, b = make_inputs(7)
    dead = torch.zeros(F, dtype=torch.bool, device=TEST_DEVICE)
    dead[::3] = True
    xs, Ws, bs = (t.clone().requires_grad_(True) for t in (x, W, b))
    _, _, aux_v, aux_i = fused_topk_encode(xs, Ws, bs, K, dead, 3)
    dense_codes(aux_v, aux_i, F).pow(2).sum().backward()
    xr, Wr, br = (t.clone().requires_grad_(True) for t in (x, W, b))
    reference_aux(xr @ Wr.T + br, dead, 3).pow(2).sum().backward()
    for got, want in ((xs.grad, xr.grad), (Ws.grad, Wr.grad), (bs.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck_fused_encoder() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    W = torch.randn(9, 5, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    b = (torch.randn(9, generator=g, dtype=torch.float64).to(TEST_DEVICE) * 0.1).requires_grad_(True)
    dead = torch.zeros(9, dtype=torch.bool, device=TEST_DEVICE)
    dead[[1, 4, 6, 7]] = True
    # keep away from kinks: no pre-activation near 0 and no near-ties among the top values
    pre = (x @ W.T + b).detach()
    assert float(pre.abs().min()) > 1e-3
    gaps = pre.sort(dim=1).values.diff(dim=1)
    assert float(gaps.min()) > 1e-3

    def fn(x_, W_, b_):
        v, i, av, ai = FusedTopKEncode.apply(x_, W_, b_, 3, dead, 2)
        # differentiable outputs only, as dense codes so the selection is in the comparison
        return dense_codes(v, i, 9), dense_codes(av, ai, 9)

    assert torch.autograd.gradcheck(fn, (x, W, b), eps=1e-6, atol=1e-7)


def test_float32_matches_float64_reference() -> None:
    x, W, b = make_inputs(9)
    values, indices, _, _ = fused_topk_encode(x.float(), W.float(), b.float(), K)
    torch.testing.assert_close(
        dense_codes(values.double(), indices, F), reference_topk(x @ W.T + b, K), rtol=0, atol=1e-5
    )


def test_sparse_decode_matches_dense_and_gradients() -> None:
    g = torch.Generator().manual_seed(10)
    W_dec = torch.randn(F, D, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    values = torch.randn(B, K, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    indices = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(B)])
    up = torch.randn(B, D, generator=g, dtype=torch.float64).to(TEST_DEVICE)

    vs, Wd = values.clone().requires_grad_(True), W_dec.clone().requires_grad_(True)
    out = sparse_decode(vs, indices, Wd)
    (out * up).sum().backward()

    vr, Wr = values.clone().requires_grad_(True), W_dec.clone().requires_grad_(True)
    z = dense_codes(vr, indices, F)
    ref = z @ Wr
    (ref * up).sum().backward()

    # slow obvious loop for the forward value as a second reference
    loop = torch.zeros(B, D, dtype=torch.float64, device=TEST_DEVICE)
    for row in range(B):
        for j in range(K):
            loop[row] += values[row, j] * W_dec[indices[row, j]]
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.detach(), loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vs.grad, vr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Wd.grad, Wr.grad, rtol=1e-12, atol=1e-12)
    # the decoder gradient touches only the selected rows
    untouched = torch.ones(F, dtype=torch.bool, device=TEST_DEVICE)
    untouched[indices.flatten()] = False
    assert float(Wd.grad[untouched].abs().max()) == 0.0


def test_sparse_decode_gradcheck() -> None:
    g = torch.Generator().manual_seed(11)
    W_dec = torch.randn(7, 4, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    values = torch.randn(3, 2, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    indices = torch.tensor([[0, 3], [6, 1], [3, 5]], device=TEST_DEVICE)
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, indices, w), (values, W_dec))
