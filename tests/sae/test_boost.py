"""SAE Boost: a frozen base SAE plus residual TopK SAEs trained on its error, against slow explicit references
(the stitched forward, codes and dictionary, the training forward, the fold), training through the library's
trainer on a planted domain, exact resumption, stacking, and the ``sae boost`` / ``sae stack`` commands."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE
from test_architectures import randomise_
from test_topk import Interrupted, assert_same, planted_atoms, planted_chunks, small_run

import interlayer.sae.trainer as trainer_module
from interlayer.activations import Chunk
from interlayer.errors import UserError
from interlayer.sae import build_sae, load_sae, make_config, save_sae
from interlayer.sae.architectures import config_from_json
from interlayer.sae.boosted import BoostedConfig, BoostedSAE, boost_config, stack_boosted
from interlayer.sae.trainer import (
    CHECKPOINT,
    CHECKPOINT_STATE,
    METRICS_FILE,
    SiteTrainer,
    TrainConfig,
    train_saes,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_cli import assert_user_error, run_cli  # noqa: E402

D = 12
BASE_F, BASE_K = 24, 3
RESIDUALS = ((6, 2), (10, 3))  # (F_i, k_i)


def random_base(architecture: str = "topk", seed: int = 0, d: int = D, site: str = "layers.1"):
    """A base SAE in float64 with every parameter random (a JumpReLU's θ small and positive)."""
    options = {"k": BASE_K} if architecture != "jumprelu" else {}
    sae = build_sae(
        make_config(architecture, d_in=d, latents=BASE_F, site=site, model="m", **options)
    ).double()
    return randomise_(sae, seed)


def random_boosted(
    seed: int = 0, base=None, residuals: tuple[tuple[int, int], ...] = RESIDUALS, input_scale: float = 1.0
) -> BoostedSAE:
    """A boosted SAE (float64, on the test device) over ``base`` (default a random TopK SAE) with random
    residuals whose decoder rows are not unit norm (nothing may rely on that)."""
    base = random_base(seed=seed) if base is None else base
    cfg = BoostedConfig(
        d_in=base.cfg.d_in,
        latents=base.cfg.latents + sum(f for f, _ in residuals),
        site=base.cfg.site,
        model=base.cfg.model,
        input_scale=input_scale,
        base=base.cfg.to_json(),
        residual_latents=tuple(f for f, _ in residuals),
        residual_k=tuple(k for _, k in residuals),
        residual_data=tuple(f"domain{i}" for i in range(len(residuals))),
    )
    sae = BoostedSAE(cfg).double()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        sae.base.load_state_dict(base.state_dict())
        for r in sae.residuals:
            for param in r.parameters():
                param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64) * 0.5)
    return sae.to(TEST_DEVICE)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        TEST_DEVICE
    )


def slow_residual(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, k: int, x_BD: torch.Tensor):
    """ê = W_decᵀ TopK_k(ReLU(W_enc x + b_enc)), one token at a time, by sorting: (codes [B, F_i], ê [B, d])."""
    zs, e_hats = [], []
    for x in x_BD:
        act = (W_enc @ x + b_enc).clamp(min=0)
        order = sorted(range(len(act)), key=lambda f: float(act[f]), reverse=True)
        z = torch.zeros_like(act)
        for f in order[:k]:
            z[f] = act[f]
        zs.append(z)
        e_hats.append(W_dec.T @ z)
    return torch.stack(zs), torch.stack(e_hats)


def slow_boosted(sae: BoostedSAE, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, x̂) of x̂ = x̂_base + Σ_i ê_i, the base through its own (separately tested) forward."""
    with torch.no_grad():
        codes, x_hat = [sae.base.encode(x_BD)], sae.base(x_BD)
        for r in sae.residuals:
            z, e_hat = slow_residual(r.W_enc_FD, r.b_enc_F, r.W_dec_FD, r.k, x_BD)
            codes.append(z)
            x_hat = x_hat + e_hat
    return torch.cat(codes, dim=1), x_hat


# ---- the stitched SAE ---------------------------------------------------------------------------------
@pytest.mark.parametrize("base_architecture", ["topk", "jumprelu"])
def test_boosted_sae_is_the_base_plus_every_residual(base_architecture: str, tmp_path: Path) -> None:
    sae = random_boosted(seed=3, base=random_base(base_architecture, seed=3))
    F_total = BASE_F + 6 + 10
    x = rand(20, D, seed=1)
    z_ref, x_hat_ref = slow_boosted(sae, x)
    assert int((z_ref[:, BASE_F:] != 0).sum()) > 0, "the residuals must fire"
    with torch.no_grad():
        torch.testing.assert_close(sae(x), x_hat_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.encode(x), z_ref, rtol=0, atol=1e-12)
        # the stitched dictionary: base rows, then each residual's; decode(encode(x)) is the forward
        assert sae.W_dec_FD.shape == (F_total, D)
        torch.testing.assert_close(sae.W_dec_FD[:BASE_F], sae.base.W_dec_FD, rtol=0, atol=0)
        torch.testing.assert_close(sae.W_dec_FD[BASE_F + 6 :], sae.residuals[1].W_dec_FD, rtol=0, atol=0)
        torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z_ref @ sae.W_dec_FD + sae.b_dec_D, x_hat_ref, rtol=1e-12, atol=1e-12)
        x_hat, z = sae.reconstruct(x)
        torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
        # any leading shape; float32 in, float32 out
        x_BTD = x.reshape(4, 5, D)
        torch.testing.assert_close(sae(x_BTD), x_hat_ref.reshape(4, 5, D), rtol=1e-12, atol=1e-12)
        assert sae.encode(x_BTD).shape == (4, 5, F_total)
        assert sae(x_BTD.float()).dtype == torch.float32
    with pytest.raises(UserError, match="a boosted SAE has no k"):
        sae.encode(x, k=2)
    # the file: the base's tensors under base., each residual's under residual.<i>.
    names = set(sae.file_tensors())
    base_names = {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"threshold"} if base_architecture == "jumprelu" else set()
    )
    want = {f"base.{n}" for n in base_names} | {
        f"residual.{i}.{n}" for i in (0, 1) for n in ("W_enc", "b_enc", "W_dec")
    }
    assert names == want
    save_sae(sae, tmp_path / "b")
    loaded = load_sae(tmp_path / "b", device=TEST_DEVICE)  # float32, as every SAE loads
    assert isinstance(loaded, BoostedSAE) and loaded.cfg == sae.cfg
    for name, tensor in sae.file_tensors().items():  # a JumpReLU θ is stored as θ, held as log θ
        torch.testing.assert_close(loaded.file_tensors()[name], tensor.float(), rtol=1e-6, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), x_hat_ref, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    assert cfg["architecture"] == "boosted" and cfg["residual_latents"] == [6, 10]
    assert cfg["base"]["architecture"] == base_architecture and cfg["base"]["latents"] == BASE_F


def test_boosted_file_with_a_wrong_shape_is_one_line(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_sae(random_boosted(seed=1), tmp_path / "b")
    stored = load_file(str(tmp_path / "b" / "sae.safetensors"))
    stored["residual.1.W_dec"] = stored["residual.1.W_dec"][:9]
    save_file(stored, str(tmp_path / "b" / "sae.safetensors"))
    with pytest.raises(
        UserError, match=r"tensor 'residual.1.W_dec' has shape \(9, 12\) but cfg.json implies \(10, 12\)"
    ):
        load_sae(tmp_path / "b")


def test_boosted_config_validation_and_json_round_trip() -> None:
    base = random_base()
    good = random_boosted(base=base).cfg
    again = config_from_json(json.loads(json.dumps(good.to_json())))
    assert (
        again == good and isinstance(again.residual_latents, tuple) and isinstance(again.residual_data, tuple)
    )
    assert good.k_max is None and good.trained_latents == 10 and base.cfg.trained_latents == BASE_F
    cases = [
        ({"latents": good.latents + 1}, "latents must be the base's 24 plus the residuals' 16 = 40, got 41"),
        ({"d_in": D + 1, "latents": good.latents}, "a residual for a base of another width: d_in is 13"),
        ({"residual_k": (2, 11)}, "residual 1: k (11) must be at least 1 and not exceed latents (10)"),
        ({"residual_data": ("only one",)}, "one entry per residual"),
        ({"base": good.to_json()}, "cannot itself be boosted"),
        ({"base": {**base.cfg.to_json(), "k": BASE_F + 1}}, "k (25) must not exceed latents (24)"),
    ]
    for change, needle in cases:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            replace(good, **change)
    with pytest.raises(UserError, match="lacks the field"):
        config_from_json({k: v for k, v in good.to_json().items() if k != "residual_k"})


def test_training_forward_trains_the_last_residual_on_the_frozen_error() -> None:
    """On x scaled by c: x̂ = c·x̂_frozen(x/c) + ê_R(x), loss Σ‖x − x̂‖², AuxK from residual R's dead latents,
    frozen latents reported as fired, gradients for residual R only."""
    c = 2.5
    sae = random_boosted(seed=5, input_scale=c)
    F_total, start = sae.cfg.latents, BASE_F + 6
    x = rand(16, D, seed=6) * c
    dead = torch.zeros(F_total, dtype=torch.bool, device=TEST_DEVICE)
    dead[start::3] = True
    dead[:start:2] = True  # a frozen latent flagged dead is never used by AuxK
    out = sae.training_forward(x, dead, 2)
    frozen = sae.base(x / c) + slow_residual(*_weights(sae, 0), x / c)[1]
    last = sae.residuals[1]
    z_last, e_last = slow_residual(*_weights(sae, 1), x)
    want = c * frozen.detach() + e_last
    torch.testing.assert_close(out.x_hat_BD.detach(), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.recon_loss.detach(), (x - want).pow(2).sum(), rtol=1e-12, atol=1e-12)
    pre = torch.addmm(last.b_enc_F, x, last.W_enc_FD.T).detach().relu().masked_fill(~dead[start:], -1.0)
    top, where = pre.topk(2, dim=1)
    aux_ref = torch.zeros_like(pre).scatter(1, where, top) @ last.W_dec_FD.detach()
    assert out.aux_hat_BD is not None
    torch.testing.assert_close(out.aux_hat_BD.detach(), aux_ref, rtol=1e-12, atol=1e-12)
    assert out.fired_F[:start].all() and out.fired_F[start:].tolist() == (z_last > 0).any(0).tolist()
    assert out.active == float((z_last > 0).sum())
    out.recon_loss.backward()
    trainable = {n for n, p in sae.named_parameters() if p.grad is not None}
    assert trainable == {"residuals.1.W_enc_FD", "residuals.1.b_enc_F", "residuals.1.W_dec_FD"}
    assert {n for n, p in sae.named_parameters() if p.requires_grad} == trainable


def _weights(sae: BoostedSAE, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    r = sae.residuals[i]
    return r.W_enc_FD.detach(), r.b_enc_F.detach(), r.W_dec_FD.detach(), r.k


def test_fold_rescales_the_trained_residual_only() -> None:
    """A boosted SAE trained on c·x (frozen parts in raw space), its training reconstruction divided by c,
    equals the folded SAE applied to x; codes: the frozen ones of x, the trained residual's of c·x."""
    c = 3.7
    sae = random_boosted(seed=9, input_scale=c)
    folded = random_boosted(seed=9, input_scale=c)
    folded.load_state_dict(sae.state_dict())
    folded.fold_input_scale_(c)
    x = rand(30, D, seed=10)
    start = BASE_F + 6
    with torch.no_grad():
        trained = sae.training_forward(c * x, None, 0).x_hat_BD
        torch.testing.assert_close(folded(x), trained / c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(folded.encode(x)[:, :start], sae.encode(x)[:, :start], rtol=0, atol=0)
        torch.testing.assert_close(
            folded.encode(x)[:, start:], sae.encode(c * x)[:, start:], rtol=1e-10, atol=1e-12
        )
        assert int((folded.encode(x)[:, start:] != 0).sum()) > 0
    for name, tensor in sae.state_dict().items():
        if not name.startswith("residuals.1."):
            assert torch.equal(folded.state_dict()[name], tensor), name


def test_decoder_hygiene_touches_the_trained_residual_only() -> None:
    sae = random_boosted(seed=11)
    before = {n: t.clone() for n, t in sae.state_dict().items()}
    with torch.no_grad():
        sae.base.W_dec_FD.mul_(2.0)  # an imported base need not have unit rows: they must stay as they are
    before["base.W_dec_FD"] = sae.base.W_dec_FD.clone()
    last = sae.residuals[1]
    g = rand(10, D, seed=12)
    last.W_dec_FD.grad = g.clone()
    sae.project_decoder_grad_()
    W = last.W_dec_FD.detach()
    torch.testing.assert_close(
        last.W_dec_FD.grad, g - (g * W).sum(1, keepdim=True) * W, rtol=1e-12, atol=1e-12
    )
    sae.normalise_decoder_()
    torch.testing.assert_close(
        last.W_dec_FD.norm(dim=1), torch.ones(10, dtype=torch.float64, device=TEST_DEVICE)
    )
    for name, tensor in sae.state_dict().items():
        if name != "residuals.1.W_dec_FD":
            assert torch.equal(tensor, before[name]), name


def test_learning_rate_follows_the_trained_residual() -> None:
    cfg = random_boosted().cfg
    trainer = SiteTrainer(cfg, TrainConfig(tokens=64, batch_size=32), 1.0, torch.device("cpu"))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * (10 / 2**14) ** -0.25)


# ---- training through the trainer ----------------------------------------------------------------------
def domain_chunks(A: torch.Tensor, B: torch.Tensor, chunk_tokens: int, n_chunks: int, seed: int):
    """Chunk i: each token 2 distinct atoms of A and 1 of B, coefficients U[0.5, 2], plus N(0, 0.01²)."""
    d = A.shape[1]

    def chunks(start: int) -> Iterator[Chunk]:
        for index in range(start, n_chunks):
            g = torch.Generator().manual_seed(seed * 100_003 + index)
            which_a = torch.rand(chunk_tokens, A.shape[0], generator=g).topk(2, dim=1).indices
            which_b = torch.randint(B.shape[0], (chunk_tokens,), generator=g)
            coef = 0.5 + 1.5 * torch.rand(chunk_tokens, 3, generator=g)
            x = (coef[:, :2, None] * A[which_a]).sum(1) + coef[:, 2:] * B[which_b]
            yield Chunk(index, {"site": x + 0.01 * torch.randn(chunk_tokens, d, generator=g)})

    return chunks


def fvu(sae, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_residual_learns_the_new_domain_and_the_base_stays_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base: TopK on planted atoms A (a 48-dim subspace of R^64). Domain: 2 atoms of A and 1 of 12 new atoms B
    (in the other 16 dims) per token. The residual brings the domain FVU from the base's ≥ 0.3 to < 0.15,
    learns the B atoms, and leaves the base's weights bit-identical and its general-domain FVU nearly so."""
    # These training budgets recover the planted atoms from the initialisation of the run seed itself (the
    # one interlayer used for every site before sites got their own, trainer.init_seed); from other
    # initialisations JumpReLU recovers about a third of them (a known fragility, see issue 9's note).
    monkeypatch.setattr(trainer_module, "init_seed", lambda seed, _site: seed)
    d, new = 64, 16
    A = torch.nn.functional.pad(planted_atoms(64, d - new, seed=0), (0, new))
    B = torch.nn.functional.pad(planted_atoms(12, new, seed=1), (d - new, 0))
    chunk_tokens, n_chunks = 16_384, 6
    train_cfg = TrainConfig(tokens=chunk_tokens * n_chunks, batch_size=512, seed=0, dead_tokens=20_000)
    base_cfg = make_config("topk", d_in=d, latents=128, k=3, site="site", model="planted")
    general = planted_chunks(A, 3, chunk_tokens, n_chunks, seed=0)
    train_saes(
        tmp_path / "base", general, {"site": base_cfg}, train_cfg, {"data": "A"}, device=str(TEST_DEVICE)
    )
    base = load_sae(tmp_path / "base" / "site")
    template = boost_config(base, tmp_path / "base" / "site", latents=24, k=2, data="B")
    assert template.latents == 152 and template.base_folder == str((tmp_path / "base" / "site").resolve())
    metrics = train_saes(
        tmp_path / "boost",
        domain_chunks(A, B, chunk_tokens, n_chunks, seed=1),
        {"site": template},
        train_cfg,
        {"data": "B"},
        device=str(TEST_DEVICE),
    )
    assert metrics["steps"] == chunk_tokens * n_chunks // 512
    sae = load_sae(tmp_path / "boost" / "site")
    assert isinstance(sae, BoostedSAE) and sae.cfg.input_scale != 1.0
    for name, tensor in base.file_tensors().items():  # the base is frozen: bit for bit
        assert torch.equal(sae.file_tensors()[f"base.{name}"], tensor), name
    x_domain = next(domain_chunks(A, B, 4096, 1, seed=99)(0)).acts["site"]
    x_general = next(planted_chunks(A, 3, 4096, 1, seed=99)(0)).acts["site"]
    base_domain, boosted_domain = fvu(base, x_domain), fvu(sae, x_domain)
    assert base_domain > 0.3 and boosted_domain < 0.15, (base_domain, boosted_domain)
    assert fvu(sae, x_general) < fvu(base, x_general) + 0.01
    # the residual's dictionary holds the B atoms: most outright; within the new dims, every one
    W = sae.residuals[0].W_dec_FD
    best = (B @ (W / W.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert float((best >= 0.9).float().mean()) >= 0.75, best
    W_new = W[:, d - new :] / W[:, d - new :].norm(dim=1, keepdim=True)
    assert float((B[:, d - new :] @ W_new.T).max(dim=1).values.min()) >= 0.9
    # the residual keeps k = 2 per token: the total L0 is the base's plus at most 2
    with torch.no_grad():
        z = sae.encode(x_domain)
    assert float((z[:, 128:] != 0).sum(1).max()) <= 2 and float((z[:, 128:] != 0).sum(1).float().mean()) > 1


def small_boost(
    out: Path,
    base_folder: Path,
    seed: int,
    data_seed: int = 1,
    fail_after: int | None = None,
    starts: list | None = None,
    aux_losses: list | None = None,
) -> dict:
    """``test_topk.small_run`` (6 chunks of 2048 planted tokens, batch 256, dead latents and AuxK in play)
    training a residual of 64 latents, k = 3, over the SAE in ``base_folder``."""
    template = boost_config(load_sae(base_folder), base_folder, latents=64, k=3, data=f"planted-{data_seed}")
    return small_run(
        out,
        seed,
        fail_after=fail_after,
        starts=starts,
        aux_losses=aux_losses,
        sae_cfg=template,
        data_seed=data_seed,
    )


def saved_base(folder: Path, seed: int = 0, d: int = 16, site: str = "site") -> Path:
    sae = build_sae(make_config("topk", d_in=d, latents=32, k=3, site=site, model="planted"))
    sae.initialise_(torch.Generator().manual_seed(seed))
    return save_sae(sae, folder)


def test_interrupted_boost_resumes_exactly(tmp_path: Path) -> None:
    base = saved_base(tmp_path / "base")
    aux_losses: list[float] = []
    full = small_boost(tmp_path / "full", base, seed=3, aux_losses=aux_losses)
    assert full["steps"] == 48 and max(aux_losses[24:]) > 0, "dead latents and AuxK must be exercised"
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        small_boost(out, base, seed=3, fail_after=2)
    committed = json.loads((out / CHECKPOINT / CHECKPOINT_STATE).read_text())
    assert committed["chunk"] == 3 and committed["step"] == 24 and not (out / METRICS_FILE).exists()
    starts: list[int] = []
    resumed = small_boost(out, base, seed=3, starts=starts)
    assert starts == [3] and resumed["steps"] == 48 and not (out / CHECKPOINT).exists()
    want, got = load_sae(tmp_path / "full" / "site").state_dict(), load_sae(out / "site").state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert_same(got[name], want[name], name)
    assert math.isclose(resumed["sites"]["site"]["fvu"], full["sites"]["site"]["fvu"], rel_tol=0, abs_tol=0)
    starts.clear()
    again = small_boost(out, base, seed=3, starts=starts)
    assert starts == [] and again == resumed


def test_boosting_a_boosted_sae_stacks_a_second_residual(tmp_path: Path) -> None:
    base = saved_base(tmp_path / "base")
    small_boost(tmp_path / "first", base, seed=0, data_seed=1)
    first = load_sae(tmp_path / "first" / "site")
    small_boost(tmp_path / "second", tmp_path / "first" / "site", seed=0, data_seed=2)
    second = load_sae(tmp_path / "second" / "site")
    assert isinstance(second, BoostedSAE) and isinstance(first, BoostedSAE)
    assert second.cfg.residual_latents == (64, 64) and second.cfg.residual_data == ("planted-1", "planted-2")
    assert second.cfg.latents == 32 + 128 and second.cfg.base == first.cfg.base
    assert second.cfg.base_folder == str((tmp_path / "first" / "site").resolve())
    for name, tensor in first.file_tensors().items():  # base and first residual frozen, bit for bit
        assert torch.equal(second.file_tensors()[name], tensor), name
    x2 = next(planted_chunks(planted_atoms(32, 16, seed=2), 3, 2048, 1, seed=77)(0)).acts["site"]
    assert fvu(second, x2) < 0.8 * fvu(first, x2), "the second residual must learn the second domain"


# ---- stacking residuals that share a base -----------------------------------------------------------------
def test_stack_sums_residuals_over_the_identical_base() -> None:
    base = random_base(seed=4)
    a = random_boosted(seed=4, base=base, residuals=((6, 2),))
    b = random_boosted(seed=5, base=base, residuals=((10, 3), (4, 1)))
    stacked = stack_boosted(a, b)
    assert stacked.cfg.residual_latents == (6, 10, 4) and stacked.cfg.residual_k == (2, 3, 1)
    assert stacked.cfg.residual_data == ("domain0", "domain0", "domain1")
    assert stacked.cfg.latents == BASE_F + 20
    x = rand(25, D, seed=13)
    with torch.no_grad():
        want = base.to(TEST_DEVICE)(x)
        for r in [*a.residuals, *b.residuals]:
            want = want + slow_residual(r.W_enc_FD, r.b_enc_F, r.W_dec_FD, r.k, x)[1]
        torch.testing.assert_close(stacked(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stacked(x), a(x) + b(x) - base.to(TEST_DEVICE)(x), rtol=1e-12, atol=1e-12)
    other_weights = random_boosted(seed=6, base=random_base(seed=7))
    with pytest.raises(
        UserError, match="a residual for a base of another width or site .*other base weights"
    ):
        stack_boosted(a, other_weights)
    wider = random_boosted(seed=6, base=random_base(seed=4, d=D + 2))
    with pytest.raises(UserError, match=r"another width or site than the first \(d_in 12 vs 14\)"):
        stack_boosted(a, wider)
    elsewhere = random_boosted(seed=6, base=random_base(seed=4, site="layers.2"))
    with pytest.raises(UserError, match="site layers.1 vs layers.2"):
        stack_boosted(a, elsewhere)
    with pytest.raises(UserError, match="the second SAE is a topk SAE, not a boosted one"):
        stack_boosted(a, base)


# ---- the command line -----------------------------------------------------------------------------------
@pytest.fixture()
def domain_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "domain"
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(
            f"Ticket {i}: the scheduler retries job {i} after a timeout. " * 20
        )
    return folder


def boost_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sae", "boost", "--base", str(base), "--data", str(data), "--out", str(out), "--latents", "16", "--k", "2",
        "--tokens", "512", "--batch-size", "128", "--context-len", "32", "--model-batch-size", "8",
        "--chunk-batches", "2", *extra,
    ]  # fmt: skip


def test_boost_command_end_to_end(
    tiny_models: dict[str, Path], domain_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_models["llama"]
    base_sae = build_sae(make_config("topk", d_in=32, latents=64, k=4, site="layers.1", model=str(model)))
    base_sae.initialise_(torch.Generator().manual_seed(0))
    save_sae(base_sae, tmp_path / "base")
    out = tmp_path / "boost"
    code, stdout, err = run_cli([*boost_args(tmp_path / "base", domain_corpus, out), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["out"] == str(out)
    sae = load_sae(out / "layers.1")
    assert isinstance(sae, BoostedSAE) and sae.cfg.residual_latents == (16,) and sae.cfg.residual_k == (2,)
    assert sae.cfg.residual_data == (str(domain_corpus),) and sae.cfg.model == str(model)
    assert sae.cfg.base_folder == str((tmp_path / "base").resolve())
    for name, tensor in base_sae.file_tensors().items():
        assert torch.equal(sae.file_tensors()[f"base.{name}"], tensor), name
    # a finished run returns its summary at once (the same seconds: read back, not retrained)
    code, again, err = run_cli([*boost_args(tmp_path / "base", domain_corpus, out), "--json"], capsys)
    assert code == 0 and json.loads(again.strip().splitlines()[-1]) == summary, err
    # evaluation takes it like any other SAE
    evaluation = {}
    for name, folder in (("base", tmp_path / "base"), ("boosted", out)):
        code, stdout, err = run_cli(
            [
                "sae",
                "eval",
                "--sae",
                str(folder),
                "--tokens",
                "200",
                "--data",
                str(domain_corpus),
                "--context-len",
                "32",
                "--json",
            ],
            capsys,
        )
        assert code == 0, err
        evaluation[name] = json.loads(stdout.strip().splitlines()[-1])["sites"]["layers.1"]
    assert evaluation["base"]["l0"] < evaluation["boosted"]["l0"] <= evaluation["base"]["l0"] + 2
    assert evaluation["boosted"]["explained_variance"] > evaluation["base"]["explained_variance"]
    # boosting the boosted SAE stacks a second residual; `sae stack` sums two residuals over one base
    code, _, err = run_cli(
        boost_args(out / "layers.1", domain_corpus, tmp_path / "again", "--seed", "1"), capsys
    )
    assert code == 0, err
    assert load_sae(tmp_path / "again" / "layers.1").cfg.residual_latents == (16, 16)
    code, stdout, err = run_cli(
        ["sae", "stack", str(out), str(out), "--out", str(tmp_path / "stacked"), "--json"], capsys
    )
    assert code == 0, err
    stacked = load_sae(tmp_path / "stacked")
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(stacked(x), 2 * sae(x) - sae.base(x), rtol=1e-5, atol=1e-5)
    assert json.loads(stdout.strip().splitlines()[-1])["residual_latents"] == [16, 16]


def test_boost_command_errors_are_one_line(
    tiny_models: dict[str, Path], domain_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(tiny_models["llama"])
    saved_base(tmp_path / "base", d=32, site="layers.1")
    (tmp_path / "base" / "cfg.json").write_text(
        json.dumps({**json.loads((tmp_path / "base" / "cfg.json").read_text()), "model": model})
    )
    args = boost_args(tmp_path / "base", domain_corpus, tmp_path / "r")
    assert_user_error(
        run_cli([*args, "--site", "layers.2"], capsys),
        "the base SAE was trained on site layers.1, not layers.2",
    )
    saved_base(tmp_path / "narrow", d=16, site="layers.1")
    narrow = boost_args(tmp_path / "narrow", domain_corpus, tmp_path / "r", "--model", model)
    assert_user_error(
        run_cli(narrow, capsys), "a residual for a base of another width", "width 16", "width 32"
    )
    assert_user_error(
        run_cli([*args, "--k", "17"], capsys), "k (17) must be at least 1 and not exceed latents (16)"
    )
    assert not (tmp_path / "r").exists()
    train = ["sae", "train", "--latents", "64", "--out", str(tmp_path / "t"), "--architecture", "boosted"]
    assert_user_error(run_cli(train, capsys), "not trained with `sae train`: use `interlayer sae boost`")
    assert_user_error(
        run_cli(
            ["sae", "stack", str(tmp_path / "base"), str(tmp_path / "base"), "--out", str(tmp_path / "s")],
            capsys,
        ),
        "the first SAE is a topk SAE, not a boosted one",
    )


def test_an_imported_base_is_boosted_like_any_other(tmp_path: Path) -> None:
    """A base read from another library's files (here a SAELens folder) is frozen and stitched the same way."""
    from interlayer.sae.formats import write_as

    sae = build_sae(make_config("topk", d_in=16, latents=32, k=3, site="layers.1", model="planted"))
    sae.initialise_(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec_FD.mul_(
            torch.linspace(0.5, 3.0, 32)[:, None]
        )  # rows need not be unit norm in a peer's file
    write_as(sae, "saelens", tmp_path / "peer")
    small_boost(tmp_path / "run", tmp_path / "peer", seed=0)
    boosted = load_sae(tmp_path / "run" / "site")
    assert isinstance(boosted, BoostedSAE) and boosted.cfg.base["source_format"] == "saelens"
    for name, tensor in load_sae(tmp_path / "peer").file_tensors().items():
        assert torch.equal(boosted.file_tensors()[f"base.{name}"], tensor), name
    torch.testing.assert_close(boosted.base.W_dec_FD, sae.W_dec_FD.detach(), rtol=1e-6, atol=1e-6)


def test_boost_has_every_training_flag_with_its_default() -> None:
    import inspect

    from interlayer.sae.cli import sae_boost

    params = inspect.signature(sae_boost).parameters
    for f in fields(TrainConfig):
        assert params[f.name].default == f.default, f"--{f.name.replace('_', '-')}"
    assert params["latents"].default == 1024 and params["k"].default == 5  # the paper's residual defaults


def test_boost_from_an_activation_cache_equals_boost_from_the_model(
    tiny_models: dict[str, Path], domain_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--activations`` trains on a cache of the domain; its chunks mix as the model's do, so the residual is
    the one the model run trains, and the cache names the model and the text."""
    model = tiny_models["llama"]
    base_sae = build_sae(make_config("topk", d_in=32, latents=64, k=4, site="layers.1", model=str(model)))
    base_sae.initialise_(torch.Generator().manual_seed(0))
    save_sae(base_sae, tmp_path / "base")
    code, _out, err = run_cli(boost_args(tmp_path / "base", domain_corpus, tmp_path / "from-model"), capsys)
    assert code == 0, err
    cache = [
        "activations", "cache", "--model", str(model), "--sites", "layers.1", "--data", str(domain_corpus),
        "--tokens", "4000", "--context-len", "32", "--model-batch-size", "8", "--chunk-batches", "2",
        "--out", str(tmp_path / "cache"),
    ]  # fmt: skip
    code, _out, err = run_cli(cache, capsys)
    assert code == 0, err
    args = boost_args(tmp_path / "base", domain_corpus, tmp_path / "from-cache")
    args = args[: args.index("--data")] + args[args.index("--data") + 2 :]  # the cache names its text
    code, _out, err = run_cli([*args, "--activations", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    want, got = load_sae(tmp_path / "from-model" / "layers.1"), load_sae(tmp_path / "from-cache" / "layers.1")
    assert got.cfg.residual_data == (str(domain_corpus),) and got.cfg.model == str(model)
    for name, tensor in want.file_tensors().items():
        torch.testing.assert_close(got.file_tensors()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    code, _out, err = run_cli(
        args[:2] + ["--base", str(tmp_path / "base"), "--out", str(tmp_path / "x")], capsys
    )
    assert code == 2 and "pass --data" in err
