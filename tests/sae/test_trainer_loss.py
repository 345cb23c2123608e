"""The trainer's loss, computed by hand on a tiny case: FVU term, AuxK term with its weight
α·min(n_dead/k_aux, 1), the JumpReLU penalty over the batch size, and the decoder-gradient projection."""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE

from interlayer.sae import TrainConfig, make_config
from interlayer.sae.trainer import SiteTrainer

D, F, K, K_AUX, B = 6, 10, 2, 3, 8


def trainer_with_grads(architecture: str, options: dict, input_scale: float = 1.7):
    """A SiteTrainer in float64 whose optimiser step records the gradients it is handed (lr 0: no update)."""
    cfg = make_config(architecture, d_in=D, latents=F, **options)
    train = TrainConfig(tokens=64, batch_size=B, k_aux=K_AUX, dead_tokens=5, aux_alpha=0.25, lr=1e-3)
    trainer = SiteTrainer(cfg, train, input_scale, TEST_DEVICE)
    trainer.sae.double()
    trainer.optimizer = torch.optim.Adam(trainer.sae.parameters(), lr=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.6)
            if name == "log_threshold_F":
                p.fill_(-1.5)
        trainer.sae.normalise_decoder_()
    recorded: dict[str, torch.Tensor] = {}

    def record(*_a, **_k):
        recorded.update({n: p.grad.clone() for n, p in trainer.sae.named_parameters() if p.grad is not None})

    trainer.optimizer.step = record  # type: ignore[method-assign]
    return trainer, recorded


def test_topk_step_loss_aux_weight_and_projection_by_hand() -> None:
    trainer, grads = trainer_with_grads("topk", {"k": K})
    sae = trainer.sae
    dead = torch.tensor(
        [0, 1, 1, 0, 1, 0, 0, 1, 0, 0], dtype=torch.bool, device=TEST_DEVICE
    )  # 4 dead latents
    trainer.since_fired_F[dead] = 100
    x_raw = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(TEST_DEVICE)
    params = {n: p.detach().clone().requires_grad_() for n, p in sae.named_parameters()}

    # the loss, written out
    x = x_raw * 1.7
    pre = (x - params["b_dec_D"]) @ params["W_enc_FD"].T + params["b_enc_F"]
    top = pre.topk(K, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp(min=0))
    x_hat = z @ params["W_dec_FD"] + params["b_dec_D"]
    total_var = (x - x.mean(0)).pow(2).sum()
    fvu = (x - x_hat).pow(2).sum() / total_var
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    aux_top = dead_pre.topk(K_AUX, dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, aux_top.indices, aux_top.values.clamp(min=0))
    e = (x - x_hat).detach()
    aux = (z_aux @ params["W_dec_FD"] - e).pow(2).sum() / total_var
    weight = 0.25 * min(4 / K_AUX, 1.0)  # α · min(n_dead / k_aux, 1) = 0.25
    loss = fvu + weight * aux
    loss.backward()

    stats = trainer.step(x_raw.clone(), lr=0.0)
    assert stats is not None
    assert stats["fvu"] == pytest.approx(float(fvu.detach()), rel=1e-12)
    assert stats["aux_loss"] == pytest.approx(float(aux), rel=1e-12)
    assert stats["l0"] == pytest.approx(float((z > 0).sum()) / B)
    assert stats["inactive_fraction"] == pytest.approx(0.4)
    for name in ("W_enc_FD", "b_enc_F", "b_dec_D"):
        torch.testing.assert_close(grads[name], params[name].grad, rtol=1e-10, atol=1e-12)
    W = params["W_dec_FD"].detach()
    g_dec = params["W_dec_FD"].grad
    projected = g_dec - (g_dec * W).sum(1, keepdim=True) * W  # the component along each unit row removed
    torch.testing.assert_close(grads["W_dec_FD"], projected, rtol=1e-10, atol=1e-12)
    assert float((grads["W_dec_FD"] * W).sum(1).abs().max()) < 1e-12


def test_jumprelu_penalty_is_divided_by_the_batch_size() -> None:
    trainer, grads = trainer_with_grads(
        "jumprelu", {"l0_coefficient": 0.01, "bandwidth": 0.5}, input_scale=1.0
    )
    sae = trainer.sae
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(TEST_DEVICE)
    with torch.no_grad():
        pre = sae.pre_activations(x)
        theta = sae.threshold_F
        active = pre > theta
        z = pre * active
        x_hat = z @ sae.W_dec_FD + sae.b_dec_D
        fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        kernel = ((pre - theta).abs() < 0.5 / 2).double()
    stats = trainer.step(x.clone(), lr=0.0)
    assert stats is not None and stats["fvu"] == pytest.approx(fvu, rel=1e-12)
    assert stats["l0"] == pytest.approx(float(active.sum()) / B)
    # ∂L/∂log θ_f = θ_f · [ −(θ_f/ε) Σ_b g_bf K_bf  −  (λ/B)(1/ε) Σ_b K_bf ], g = ∂(FVU)/∂z
    W = sae.W_dec_FD.detach()
    total_var = (x - x.mean(0)).pow(2).sum()
    g_z = 2 * (x_hat - x) @ W.T / total_var
    want = theta * (-(theta / 0.5) * (g_z * kernel).sum(0) - (0.01 / B) / 0.5 * kernel.sum(0))
    torch.testing.assert_close(grads["log_threshold_F"], want, rtol=1e-9, atol=1e-12)
    assert float(kernel.sum()) > 0, "some pre-activations must fall inside the kernel's window"
