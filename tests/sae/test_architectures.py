"""HierarchicalTopK, Matryoshka, KronSAE and JumpReLU against slow, obvious references, plus what every
architecture shares: any leading shape, save/load, k at inference, exact resumption."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE

from interlayer.errors import UserError
from interlayer.sae import ARCHITECTURES, build_sae, hierarchical, load_sae, make_config, save_sae
from interlayer.sae.hierarchical import prefix_loss
from interlayer.sae.jumprelu import JumpReLUSAE
from interlayer.sae.kron import KronConfig, KronSAE, kron_topk
from interlayer.sae.matryoshka import MatryoshkaSAE
from interlayer.sae.topk import TopKSAE

D, F = 12, 48
OPTIONS = {
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "hierarchical": {"k": 6},
    "matryoshka": {"k": 4, "prefixes": (6, 24, 48)},
    "kron": {"k": 4, "heads": 6, "m": 2, "n": 4},
    "jumprelu": {"l0_coefficient": 1e-3},
    "relu": {"l1_coefficient": 1e-3},
}


def random_sae(architecture: str, seed: int = 0):
    """An SAE in float64 with every parameter random (thresholds small and positive)."""
    sae = build_sae(make_config(architecture, d_in=D, latents=F, **OPTIONS[architecture])).double()
    return randomise_(sae, seed).to(TEST_DEVICE)


@torch.no_grad()
def randomise_(sae, seed: int):
    """Every parameter of ``sae`` (float64) drawn from N(0, 0.25), JumpReLU's θ from U(0.01, 0.31), a scalar
    BatchTopK threshold 0.2, decoder rows normalised."""
    g = torch.Generator().manual_seed(seed)
    for name, param in sae.named_parameters():
        param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64) * 0.5)
        if name == "log_threshold_F":
            param.copy_(torch.log(torch.rand(param.shape, generator=g, dtype=torch.float64) * 0.3 + 0.01))
    if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.Tensor) and sae.threshold.dim() == 0:
        sae.threshold.fill_(0.2)
    sae.normalise_decoder_()
    return sae


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normal float64 values on the test device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        TEST_DEVICE
    )


def test_registry_is_the_one_table() -> None:
    assert list(ARCHITECTURES) == [
        "topk",
        "batchtopk",
        "hierarchical",
        "matryoshka",
        "kron",
        "jumprelu",
        "relu",
        "boosted",
    ]
    for name, cls in ARCHITECTURES.items():
        assert cls.config_class(d_in=4, latents=16, **_small(name)).architecture == name


def _small(name: str) -> dict:
    return {"topk": {"k": 2}, "batchtopk": {"k": 2}, "hierarchical": {"k": 2}, "matryoshka": {"k": 2},
            "kron": {"k": 2, "m": 2, "n": 2}, "jumprelu": {}, "relu": {},
            "boosted": {"base": {"d_in": 4, "latents": 8, "k": 2}, "residual_latents": (8,), "residual_k": (2,),
                        "residual_data": ("d",)}}[name]  # fmt: skip


# ---- every architecture --------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", list(OPTIONS))
def test_any_leading_shape_and_dtype(architecture: str) -> None:
    sae = random_sae(architecture)
    x_BTD = rand(3, 5, D, seed=1)
    flat = sae(x_BTD.reshape(15, D))
    torch.testing.assert_close(sae(x_BTD), flat.reshape(3, 5, D), rtol=0, atol=0)
    z = sae.encode(x_BTD)
    assert z.shape == (3, 5, F)
    x_hat, codes = sae.reconstruct(x_BTD)
    torch.testing.assert_close(x_hat, sae(x_BTD), rtol=1e-12, atol=1e-12)  # forward may take a sparse path
    torch.testing.assert_close(codes, z, rtol=0, atol=0)
    torch.testing.assert_close(sae.decode(z), z @ sae.W_dec_FD + sae.b_dec_D, rtol=1e-12, atol=1e-12)
    # a float32 input is computed in the SAE's dtype and returned as float32
    assert sae(x_BTD.float()).dtype == torch.float32
    with pytest.raises(UserError, match="last dimension is 7"):
        sae(torch.zeros(2, 7, dtype=torch.float64, device=TEST_DEVICE))


@pytest.mark.parametrize("architecture", list(OPTIONS))
def test_save_load_round_trip(architecture: str, tmp_path: Path) -> None:
    sae = random_sae(architecture, seed=3).float()
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae", device=TEST_DEVICE)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    x = rand(9, D, seed=2).float()
    torch.testing.assert_close(loaded(x), sae(x).detach(), rtol=1e-6, atol=1e-6)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["version"] == 2


def test_k_at_inference_only_where_there_is_a_k() -> None:
    with pytest.raises(UserError, match="jumprelu SAE has no k"):
        random_sae("jumprelu").encode(torch.zeros(1, D, dtype=torch.float64, device=TEST_DEVICE), k=2)
    with pytest.raises(UserError, match="k = 7 exceeds 6, the largest budget of this hierarchical SAE"):
        random_sae("hierarchical").encode(torch.zeros(1, D, dtype=torch.float64, device=TEST_DEVICE), k=7)
    topk = random_sae("topk")
    x = rand(20, D, seed=5)
    assert int((topk.encode(x, k=9) != 0).sum(-1).max()) == 9  # TopK can be asked for more than its k
    # BatchTopK at a given k is TopK inference on its pre-activations
    batch = random_sae("batchtopk")
    want = batch.pre_activations(x).relu()
    kept = want.topk(3, dim=1).indices
    z = batch.encode(x, k=3)
    torch.testing.assert_close(z.gather(1, kept), want.gather(1, kept))
    assert int((z != 0).sum()) == int((want.gather(1, kept) > 0).sum())


# ---- HierarchicalTopK ---------------------------------------------------------------------------------
def naive_prefix_loss(target_BD, values_BK, indices_BK, W_dec_FD) -> torch.Tensor:
    """(1/K) Σ_j Σ_b ‖target_b − Σ_{i ≤ j} v_bi W[i_bi]‖², with the whole B×K×d tensor of prefixes."""
    prefixes_BKD = (values_BK[..., None] * W_dec_FD[indices_BK]).cumsum(1)
    return (target_BD[:, None] - prefixes_BKD).pow(2).sum() / values_BK.shape[1]


@pytest.mark.parametrize("K", [1, 7, 64])
def test_prefix_loss_and_every_gradient_match_the_naive_reference(
    K: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = 2 * K * max(6, K)  # tokens in chunks of 2 (the last of 1)
    monkeypatch.setitem(hierarchical.CHUNK_ELEMENTS, TEST_DEVICE.type, budget)
    g = torch.Generator().manual_seed(K)
    B, d, latents = 5, 6, 80
    target = torch.randn(B, d, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    values = torch.rand(B, K, generator=g, dtype=torch.float64).sort(1, descending=True).values
    values = values.to(TEST_DEVICE).requires_grad_()
    indices = torch.stack([torch.randperm(latents, generator=g)[:K] for _ in range(B)]).to(TEST_DEVICE)
    W = torch.randn(latents, d, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    if K > 1:
        indices[0, -1] = indices[0, 0]  # a latent twice in one token: its row's gradients must accumulate
    if K > 1:  # a token with fewer than K positive values: the tail is 0 (ReLU outputs)
        with torch.no_grad():
            values[1, K // 2 :] = 0
    upstream = 0.37
    fast, residual = prefix_loss(target, values, indices, W)
    grads_fast = torch.autograd.grad(fast * upstream, (target, values, W))
    slow = naive_prefix_loss(target, values, indices, W)
    grads_slow = torch.autograd.grad(slow * upstream, (target, values, W))
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    positive = values.detach() > 0  # the documented rule: ∂S/∂v is 0 where v = 0 (a ReLU's gradient there)
    torch.testing.assert_close(
        grads_fast[1], torch.where(positive, grads_slow[1], 0.0), rtol=1e-10, atol=1e-10
    )
    for got, want in zip(grads_fast[::2], grads_slow[::2], strict=True):  # target and W_dec
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    full = (values[..., None] * W[indices]).sum(1)
    torch.testing.assert_close(residual, (target - full).detach(), rtol=1e-12, atol=1e-12)


def test_hierarchical_training_loss_is_the_mean_over_sorted_prefixes() -> None:
    sae = random_sae("hierarchical")
    x = rand(10, D, seed=4)
    out = sae.training_forward(x, None, 0)
    pre = sae.pre_activations(x).relu()
    top = pre.topk(6, dim=1)  # sorted descending
    want = naive_prefix_loss(x - sae.b_dec_D, top.values, top.indices, sae.W_dec_FD)
    torch.testing.assert_close(out.recon_loss, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.x_hat_BD, sae(x), rtol=1e-10, atol=1e-10)
    # at inference, budget j is exactly the j-th prefix
    for j in (1, 3, 6):
        prefix = (top.values[:, :j, None] * sae.W_dec_FD[top.indices[:, :j]]).sum(1) + sae.b_dec_D
        torch.testing.assert_close(sae(x, k=j), prefix, rtol=1e-10, atol=1e-10)


# ---- Matryoshka ---------------------------------------------------------------------------------------
def test_matryoshka_loss_is_the_sum_over_nested_prefixes() -> None:
    sae = random_sae("matryoshka")
    assert isinstance(sae, MatryoshkaSAE)
    x = rand(16, D, seed=6)
    out = sae.training_forward(x, None, 0)
    pre = sae.pre_activations(x).relu()
    flat = pre.flatten()
    kept = flat.topk(4 * 16).indices
    z = torch.zeros_like(flat).index_copy(0, kept, flat[kept]).view_as(pre)
    want = sum((x - (z[:, :m] @ sae.W_dec_FD[:m] + sae.b_dec_D)).pow(2).sum() for m in (6, 24, 48))
    torch.testing.assert_close(out.recon_loss, want, rtol=1e-10, atol=1e-10)
    assert float(out.active) == 64


def test_matryoshka_prefix_validation() -> None:
    assert make_config("matryoshka", d_in=4, latents=64, k=2).prefixes == (4, 16, 64)
    with pytest.raises(UserError, match="increasing"):
        make_config("matryoshka", d_in=4, latents=64, k=2, prefixes=(16, 8, 64))
    with pytest.raises(UserError, match="end at latents"):
        make_config("matryoshka", d_in=4, latents=64, k=2, prefixes=(8, 32))


# ---- KronSAE ------------------------------------------------------------------------------------------
def mand_pairs(pre_BG: torch.Tensor, cfg: KronConfig) -> torch.Tensor:
    """Every post-latent z [B, F] from ReLU'd pre-activations [B, h(m+n)]: the slow, explicit reference."""
    B, split = pre_BG.shape[0], cfg.heads * cfg.m
    p_BHM = pre_BG[:, :split].view(B, cfg.m, cfg.heads).transpose(1, 2)
    q_BHN = pre_BG[:, split:].view(B, cfg.n, cfg.heads).transpose(1, 2)
    return (p_BHM[..., :, None] * q_BHN[..., None, :]).sqrt().reshape(B, -1)


def test_factorised_post_latents_equal_every_explicit_pair() -> None:
    cfg = KronConfig(d_in=D, latents=3 * 2 * 5, k=4, m=2, n=5)
    pre = torch.rand(4, cfg.encoder_rows, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pre = pre.to(TEST_DEVICE)
    pre[pre < 0.3] = 0  # some factors inactive
    z = mand_pairs(pre, cfg)
    for b in range(4):
        for h in range(3):
            for i in range(2):
                for j in range(5):
                    p, q = float(pre[b, i * 3 + h]), float(pre[b, 3 * 2 + j * 3 + h])  # factor-major rows
                    assert float(z[b, h * 10 + i * 5 + j]) == pytest.approx(math.sqrt(p * q), abs=1e-15)


@pytest.mark.parametrize(
    ("m", "n", "heads", "k"), [(2, 4, 6, 4), (1, 3, 16, 5), (3, 3, 2, 11), (2, 2, 5, 20)]
)
def test_kron_topk_equals_topk_of_the_dense_post_latents(m: int, n: int, heads: int, k: int) -> None:
    cfg = KronConfig(d_in=D, latents=heads * m * n, k=k, heads=heads, m=m, n=n)
    g = torch.Generator().manual_seed(heads)
    x = torch.randn(7, D, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    W = torch.randn(cfg.encoder_rows, D, generator=g, dtype=torch.float64).to(TEST_DEVICE).requires_grad_()
    b = (
        (torch.randn(cfg.encoder_rows, generator=g, dtype=torch.float64) * 0.5)
        .to(TEST_DEVICE)
        .requires_grad_()
    )
    dead = (torch.rand(cfg.latents, generator=g) < 0.5).to(TEST_DEVICE)
    values, indices, aux_values, aux_indices = kron_topk(x, W, b, cfg, k, dead, 3)
    pre = torch.addmm(b, x, W.T).relu()
    dense = mand_pairs(pre.detach(), cfg)
    want = dense.topk(k, dim=1)
    torch.testing.assert_close(values.sort(1).values, want.values.sort(1).values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense.gather(1, indices), values, rtol=1e-12, atol=1e-12)
    dead_dense = dense.masked_fill(~dead, -1.0)
    want_aux = dead_dense.topk(3, dim=1)
    torch.testing.assert_close(
        aux_values.sort(1).values, want_aux.values.sort(1).values, rtol=1e-12, atol=1e-12
    )
    assert bool(dead[aux_indices].all())
    # gradients: the selected post-latents recomputed with autograd from the same pre-activations
    weights = torch.randn(values.shape, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    aux_weights = torch.randn(aux_values.shape, generator=g, dtype=torch.float64).to(TEST_DEVICE)
    got = torch.autograd.grad((values * weights).sum() + (aux_values * aux_weights).sum(), (W, b))

    def selected(idx: torch.Tensor) -> torch.Tensor:
        head, pair = idx // (m * n), idx % (m * n)
        p = pre.gather(1, (pair // n) * heads + head)  # factor-major rows: p_{h,i} at i·heads + h
        q = pre.gather(1, heads * m + (pair % n) * heads + head)
        pq = p * q
        return torch.where(pq > 0, pq.clamp_min(1e-300).sqrt(), 0.0)  # the rule: no gradient at z = 0

    ref = (selected(indices) * weights).sum() + (selected(aux_indices) * aux_weights).sum()
    want_grads = torch.autograd.grad(ref, (W, b))
    for a, w in zip(got, want_grads, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)


def test_mand_boundary_values_and_gradients() -> None:
    """Documented rule: z = √(p·q), exactly 0 when either factor is 0; gradient q/(2z), p/(2z) where z > 0,
    and 0 where z = 0."""
    cfg = KronConfig(d_in=2, latents=4, k=4, heads=1, m=2, n=2)
    tiny = 1e-30
    cases = {  # (p0, p1, q0, q1) as the pre-activations (identity encoder)
        "p zero": (0.0, 0.0, 2.0, 3.0),
        "q zero": (4.0, 1.0, 0.0, 0.0),
        "both zero": (0.0, 0.0, 0.0, 0.0),
        "tiny p": (tiny, 0.0, 1.0, 0.0),
        "negative": (-1.0, 2.0, -3.0, 5.0),
    }
    for name, (p0, p1, q0, q1) in cases.items():
        b = torch.tensor([p0, p1, q0, q1], dtype=torch.float64, device=TEST_DEVICE, requires_grad=True)
        W = torch.zeros(4, 2, dtype=torch.float64, device=TEST_DEVICE, requires_grad=True)
        x = torch.zeros(1, 2, dtype=torch.float64, device=TEST_DEVICE)
        values, indices, _, _ = kron_topk(x, W, b, cfg, 4)
        (grad_b,) = torch.autograd.grad(values.sum(), (b,))
        p, q = [max(p0, 0), max(p1, 0)], [max(q0, 0), max(q1, 0)]
        want_grad = [0.0] * 4
        for value, f in zip(values[0].tolist(), indices[0].tolist(), strict=True):
            i, j = f // 2, f % 2
            z = math.sqrt(p[i] * q[j])
            assert value == pytest.approx(z, rel=1e-12, abs=0), name
            if z > 0:
                want_grad[i] += q[j] / (2 * z)
                want_grad[2 + j] += p[i] / (2 * z)
        assert torch.isfinite(grad_b).all(), name
        torch.testing.assert_close(
            grad_b.cpu(), torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=0
        )
        if name == "tiny p":  # z = 1e-15 and ∂z/∂p = ½√(q/p) = 5e14, large but finite
            assert float(grad_b[0]) == pytest.approx(5e14, rel=1e-9)
        if name == "both zero":
            assert float(values.detach().abs().sum()) == 0 and float(grad_b.abs().sum()) == 0


def test_kron_sae_init_and_shape_validation() -> None:
    sae = build_sae(make_config("kron", d_in=D, latents=48, k=4, m=2, n=4))
    assert isinstance(sae, KronSAE) and sae.cfg.heads == 6 and sae.W_enc_GD.shape == (36, D)
    sae.initialise_(torch.Generator().manual_seed(0))
    rows = sae.W_enc_GD.detach()
    want = (
        rows[1 * 6 + 2] + rows[6 * 2 + 3 * 6 + 2]
    )  # latent (head 2, i 1, j 3) = P_{2,1} + Q_{2,3} (factor-major rows), normalised
    torch.testing.assert_close(sae.W_dec_FD[2 * 8 + 1 * 4 + 3].detach(), want / want.norm())
    with pytest.raises(UserError, match="heads·m·n = latents"):
        make_config("kron", d_in=D, latents=48, k=4, heads=5, m=2, n=4)
    with pytest.raises(UserError, match="m ≤ n"):
        make_config("kron", d_in=D, latents=48, k=4, m=4, n=2)


# ---- JumpReLU -----------------------------------------------------------------------------------------
def test_jumprelu_forward_penalty_and_straight_through_gradients() -> None:
    sae = random_sae("jumprelu")
    assert isinstance(sae, JumpReLUSAE)
    x = rand(30, D, seed=8)
    pre = sae.pre_activations(x).detach()
    theta = sae.threshold_F.detach()
    z = pre * (pre > theta)
    torch.testing.assert_close(sae.encode(x), z, rtol=0, atol=0)
    out = sae.training_forward(x, None, 0)
    torch.testing.assert_close(out.x_hat_BD, z @ sae.W_dec_FD + sae.b_dec_D)
    assert out.penalty is not None
    assert float(out.penalty) == pytest.approx(1e-3 * float((pre > theta).sum()))
    assert out.aux_hat_BD is None
    # θ's gradient from the penalty alone: −(λ/ε) Σ_b K((pre − θ)/ε), times θ for log θ (chain rule)
    eps = sae.cfg.bandwidth
    (grad_log,) = torch.autograd.grad(out.penalty, (sae.log_threshold_F,))
    kernel = ((pre - theta).abs() < eps / 2).double().sum(0)
    torch.testing.assert_close(grad_log, -(1e-3 / eps) * kernel * theta)
    # and from the output: ∂/∂θ [pre·H(pre − θ)] := −(θ/ε) K, so for L = Σ z, ∂L/∂log θ = −(θ²/ε) Σ K
    (grad_log,) = torch.autograd.grad(_jump(sae, x).sum(), (sae.log_threshold_F,))
    torch.testing.assert_close(grad_log, -(theta**2 / eps) * kernel)
    assert kernel.sum() > 0, "the case must put some pre-activations inside the kernel's window"


def _jump(sae: JumpReLUSAE, x: torch.Tensor) -> torch.Tensor:
    from interlayer.sae.jumprelu import JumpReLUFn

    return JumpReLUFn.apply(sae.pre_activations(x), sae.threshold_F, sae.cfg.bandwidth)


def test_jumprelu_file_stores_the_threshold_itself(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sae = random_sae("jumprelu").float()
    save_sae(sae, tmp_path / "j")
    stored = load_file(str(tmp_path / "j" / "sae.safetensors"))
    torch.testing.assert_close(stored["threshold"], sae.threshold_F.detach().cpu())
    stored["threshold"][0] = -1.0
    from safetensors.torch import save_file

    save_file(stored, str(tmp_path / "j" / "sae.safetensors"))
    with pytest.raises(UserError, match=r"sae.safetensors: 1 JumpReLU threshold\(s\) are negative or NaN"):
        load_sae(tmp_path / "j")
    stored["threshold"][0] = 0.0  # θ = 0 is a ReLU on that latent
    save_file(stored, str(tmp_path / "j" / "sae.safetensors"))
    x = rand(40, D, seed=4).float()
    relu_at_0 = load_sae(tmp_path / "j", device=TEST_DEVICE)
    torch.testing.assert_close(relu_at_0.encode(x)[:, 0], relu_at_0.pre_activations(x)[:, 0].relu())


def test_l0_coefficient_only_for_jumprelu() -> None:
    with pytest.raises(UserError, match="--l0-coefficient does not apply to a topk SAE"):
        make_config("topk", d_in=4, latents=8, k=2, l0_coefficient=0.1)
    assert isinstance(build_sae(make_config("topk", d_in=4, latents=8, k=2)), TopKSAE)


@pytest.mark.parametrize("architecture", list(OPTIONS))
def test_fold_input_scale_for_every_architecture(architecture: str) -> None:
    """An SAE trained on c·x, applied to c·x and divided by c, equals the folded SAE applied to x (thresholds
    included: they sit on the unchanged pre-activations)."""
    c = 3.7
    sae = random_sae(architecture, seed=9)
    folded = random_sae(architecture, seed=9)
    folded.load_state_dict(sae.state_dict())
    folded.fold_input_scale_(c)
    x = rand(30, D, seed=10)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), sae(c * x) / c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(folded.encode(x), sae.encode(c * x), rtol=1e-10, atol=1e-12)
        assert int((folded.encode(x) != 0).sum()) > 0
        assert not torch.allclose(folded(x), sae(x)), "folding must change the function on raw x"
