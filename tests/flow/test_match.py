"""SAE Match: folding keeps the function, the assignment is exact, planted permutations are found."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from interlayer.errors import UserError
from interlayer.flow.fold import activation_scales, fold_features, fold_jumprelu
from interlayer.flow.match import FeatureMatch, feature_vectors, match_features, random_match
from interlayer.sae import JumpReLUConfig, JumpReLUSAE, KronConfig, KronSAE, TopKConfig, TopKSAE

D = 24


def jumprelu(latents: int, seed: int, site: str = "layers.1", d: int = D) -> JumpReLUSAE:
    sae = JumpReLUSAE(JumpReLUConfig(d_in=d, latents=latents, site=site, model="m"))
    g = torch.Generator().manual_seed(seed)
    sae.initialise_(g)
    with torch.no_grad():
        sae.W_enc_FD.add_(0.3 * torch.randn(sae.W_enc_FD.shape, generator=g))
        sae.b_enc_F.copy_(0.1 * torch.randn(latents, generator=g))
        sae.b_dec_D.copy_(0.2 * torch.randn(d, generator=g))
        sae.log_threshold_F.copy_((0.05 + 0.3 * torch.rand(latents, generator=g)).log())
    return sae.eval()


def topk(latents: int, seed: int, site: str = "layers.1", k: int = 4, model: str = "m") -> TopKSAE:
    sae = TopKSAE(TopKConfig(d_in=D, latents=latents, k=k, site=site, model=model))
    g = torch.Generator().manual_seed(seed)
    sae.initialise_(g)
    with torch.no_grad():
        sae.W_enc_FD.add_(0.3 * torch.randn(sae.W_enc_FD.shape, generator=g))
        sae.b_enc_F.copy_(0.05 * torch.randn(latents, generator=g))
    return sae.eval()


def permuted_rescaled(
    sae: JumpReLUSAE, perm: torch.Tensor, noise: float, seed: int, site: str = "layers.2"
) -> JumpReLUSAE:
    """B with B[perm[i]] = feature i of A rescaled by c_i ∈ [0.5, 2] (θ too: the same function), then
    Gaussian noise of relative size ``noise`` on W_enc and W_dec."""
    g = torch.Generator().manual_seed(seed)
    c_F = 0.5 + 1.5 * torch.rand(sae.cfg.latents, generator=g)
    out = JumpReLUSAE(JumpReLUConfig(d_in=sae.cfg.d_in, latents=sae.cfg.latents, site=site, model="m"))
    with torch.no_grad():
        out.W_enc_FD[perm] = sae.W_enc_FD * c_F[:, None]
        out.b_enc_F[perm] = sae.b_enc_F * c_F
        out.W_dec_FD[perm] = sae.W_dec_FD / c_F[:, None]
        out.log_threshold_F[perm] = sae.log_threshold_F + c_F.log()
        out.b_dec_D.copy_(sae.b_dec_D)
        for p in (out.W_enc_FD, out.W_dec_FD):
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    return out.eval()


def test_folding_a_jumprelu_sae_keeps_its_function() -> None:
    sae = jumprelu(64, 0)
    with torch.no_grad():
        sae.log_threshold_F[3] = -math.inf  # θ = 0: a ReLU latent keeps scale 1
    folded = fold_jumprelu(sae)
    x_ND = torch.randn(200, D)
    z, z_f = sae.encode(x_ND), folded.encode(x_ND)
    assert torch.equal(z > 0, z_f > 0)
    assert torch.allclose(sae.decode(z), folded.decode(z_f), atol=1e-5)
    assert torch.allclose(sae(x_ND), folded(x_ND), atol=1e-5)
    theta_F = folded.threshold_F.detach()
    assert torch.allclose(theta_F[torch.arange(64) != 3], torch.ones(63))
    assert float(theta_F[3]) == 0
    assert float((z > 0).float().mean()) > 0.05  # the check above compared real activity


def test_folded_parameters_follow_the_formula() -> None:
    sae = jumprelu(16, 1)
    folded = fold_features(sae, "threshold")
    theta_F = sae.threshold_F.detach()
    c_F = sae.b_enc_F.detach() - sae.W_enc_FD.detach() @ sae.b_dec_D.detach()
    assert torch.allclose(folded.W_enc_FD, sae.W_enc_FD.detach() / theta_F[:, None])
    assert torch.allclose(folded.W_dec_FD, sae.W_dec_FD.detach() * theta_F[:, None])
    assert torch.allclose(folded.bias_F, c_F / theta_F, atol=1e-6)
    # the folded bias is the input-independent one: pre = W_enc' x + c' for the folded SAE
    x_D = torch.randn(D)
    pre_F = sae.W_enc_FD.detach() @ (x_D - sae.b_dec_D.detach()) + sae.b_enc_F.detach()
    assert torch.allclose(folded.W_enc_FD @ x_D + folded.bias_F, pre_F / theta_F, atol=1e-5)


def test_activation_scales_are_mean_activation_when_active() -> None:
    sae = topk(32, 2)
    with torch.no_grad():
        sae.b_enc_F[:3] = -100.0  # three latents that never fire
    x_ND = torch.randn(300, D)
    with torch.no_grad():
        z_NF = sae.encode(x_ND)
    want = []
    for f in range(32):
        active = z_NF[:, f][z_NF[:, f] > 0]
        want.append(float(active.mean()) if active.numel() else math.nan)
    want_F = torch.tensor(want)
    fired_F = ~want_F.isnan()
    assert bool(fired_F.any()) and not bool(fired_F.all())  # both cases exercised
    want_F[~fired_F] = want_F[fired_F].median()
    assert torch.allclose(activation_scales(sae, x_ND, batch_size=64), want_F, atol=1e-5)


@pytest.mark.parametrize("terms", [("encoder", "decoder", "bias"), ("decoder",), ("encoder", "bias")])
def test_assignment_is_the_brute_force_optimum(terms: tuple[str, ...]) -> None:
    a, b = jumprelu(6, 3), jumprelu(6, 4, site="layers.2")
    u_a = feature_vectors(fold_features(a, "threshold"), terms)
    u_b = feature_vectors(fold_features(b, "threshold"), terms)

    def total(perm: tuple[int, ...]) -> float:
        return sum(float((u_a[i] - u_b[j]).pow(2).mean()) for i, j in enumerate(perm))

    best = min(itertools.permutations(range(6)), key=total)
    match = match_features(a, b, terms, fold="threshold")
    assert match.permutation.tolist() == list(best)
    slow_F = torch.tensor([float((u_a[i] - u_b[j]).pow(2).mean()) for i, j in enumerate(best)])
    assert torch.allclose(match.mse, slow_F, rtol=1e-4)


def test_permuted_rescaled_sae_is_matched_back_exactly() -> None:
    a = jumprelu(256, 5)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    b = permuted_rescaled(a, perm, noise=0.0, seed=1)
    x_ND = torch.randn(50, D)
    assert torch.allclose(a(x_ND), b(x_ND), atol=1e-5)  # the rescaling kept the function
    match = match_features(a, b)
    assert match.fold == "threshold"
    assert torch.equal(match.permutation, perm)
    assert float(match.mse.max()) < 1e-10


def test_small_noise_keeps_at_least_99_percent() -> None:
    a = jumprelu(512, 6)
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(1))
    b = permuted_rescaled(a, perm, noise=0.2, seed=2)
    folded = match_features(a, b)
    assert float((folded.permutation == perm).float().mean()) >= 0.99
    assert float(folded.mse.median()) < 0.1 * float(random_pairs_mse(a, b))


def random_pairs_mse(a: JumpReLUSAE, b: JumpReLUSAE) -> float:
    """The mean folded MSE of feature i of A with feature i of B: unrelated pairs."""
    u_a = feature_vectors(fold_features(a, "threshold"), ("encoder", "decoder", "bias"))
    u_b = feature_vectors(fold_features(b, "threshold"), ("encoder", "decoder", "bias"))
    return float((u_a - u_b).pow(2).mean())


def test_composition_of_two_known_permutations() -> None:
    g = torch.Generator().manual_seed(3)
    p_ab, p_bc = torch.randperm(128, generator=g), torch.randperm(128, generator=g)
    a = jumprelu(128, 7, site="layers.1")
    b = permuted_rescaled(a, p_ab, 0.0, 4, site="layers.2")
    c = permuted_rescaled(b, p_bc, 0.0, 5, site="layers.3")
    ab, bc = match_features(a, b), match_features(b, c)
    ac = ab.compose(bc)
    assert torch.equal(ac.permutation, torch.tensor([int(p_bc[p_ab[i]]) for i in range(128)]))
    assert torch.equal(ac.permutation, match_features(a, c).permutation)
    assert (ac.site_a, ac.site_b) == ("layers.1", "layers.3")
    with pytest.raises(UserError, match="cannot compose"):
        bc.compose(ab)


def test_save_and_load_round_trip(tmp_path) -> None:
    a = jumprelu(32, 8)
    match = match_features(a, permuted_rescaled(a, torch.randperm(32), 0.1, 6))
    loaded = FeatureMatch.load(match.save(tmp_path / "m"))
    assert torch.equal(loaded.permutation, match.permutation) and torch.equal(loaded.mse, match.mse)
    assert (loaded.terms, loaded.site_a, loaded.site_b, loaded.fold) == (
        match.terms,
        match.site_a,
        match.site_b,
        match.fold,
    )
    from interlayer.atomic import write_tensors

    write_tensors(
        tmp_path / "m" / "match.safetensors",
        {"permutation": torch.zeros(32, dtype=torch.int64), "mse": match.mse},
    )
    with pytest.raises(UserError, match="not a permutation"):
        FeatureMatch.load(tmp_path / "m")


def test_random_match_is_a_permutation_with_nan_mse() -> None:
    a = jumprelu(64, 9)
    rand = random_match(match_features(a, jumprelu(64, 10, site="layers.2")), seed=3)
    assert torch.equal(rand.permutation.sort().values, torch.arange(64))
    assert bool(rand.mse.isnan().all())


def test_bad_input_is_one_clear_error() -> None:
    a = topk(32, 0)
    with pytest.raises(UserError, match="different dictionary sizes"):
        match_features(a, topk(64, 1, site="layers.2"))
    with pytest.raises(UserError, match="trained on different models"):
        match_features(a, topk(32, 1, site="layers.2", model="other"))
    wide = TopKSAE(TopKConfig(d_in=D + 1, latents=32, k=4, site="layers.2", model="m"))
    with pytest.raises(UserError, match="different widths"):
        match_features(a, wide)
    with pytest.raises(UserError, match="no thresholds to fold"):
        match_features(a, topk(32, 1, site="layers.2"), fold="threshold")
    with pytest.raises(UserError, match="needs activations"):
        match_features(a, topk(32, 1, site="layers.2"), fold="data")
    with pytest.raises(UserError, match="terms must be"):
        match_features(a, topk(32, 1, site="layers.2"), terms=("decoder", "weights"))
    kron = KronSAE(KronConfig(d_in=D, latents=32, k=4, heads=4, site="layers.2", model="m"))
    kron.initialise_(torch.Generator().manual_seed(0))
    broken = KronSAE(kron.cfg)
    broken.load_state_dict(kron.state_dict())
    with torch.no_grad():
        broken.W_dec_FD[5, 0] = math.nan
    with pytest.raises(UserError, match="non-finite"):
        match_features(kron, broken, terms=("decoder",))
    with pytest.raises(UserError, match="dense encoder"):
        match_features(kron, kron)
    assert match_features(kron, kron, terms=("decoder",)).permutation.tolist() == list(range(32))
