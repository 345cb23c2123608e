"""TopK / BatchTopK SAEs against their defining formulas, and training through the library's trainer:
recovery of a planted dictionary, determinism, and exact resumption after an interruption."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import TEST_DEVICE

import interlayer.sae.trainer as trainer_module
from interlayer.activations import Chunk
from interlayer.sae.architectures import build_sae, make_config
from interlayer.sae.batchtopk import BatchTopKSAE
from interlayer.sae.config import SAEConfig
from interlayer.sae.io import load_sae
from interlayer.sae.topk import TopKSAE
from interlayer.sae.trainer import CHECKPOINT, CHECKPOINT_STATE, METRICS_FILE, TrainConfig, train_saes

D, F, K = 12, 48, 4


def random_sae(architecture: str = "topk", seed: int = 0, d: int = D, latents: int = F, k: int = K):
    """An SAE in float64 with every parameter random (not just the tied initialisation)."""
    sae = build_sae(make_config(architecture, d_in=d, latents=latents, k=k)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.randn(latents, d, generator=g, dtype=torch.float64) / d**0.5)
        sae.W_dec_FD.copy_(torch.randn(latents, d, generator=g, dtype=torch.float64))
        sae.normalise_decoder_()
        sae.b_enc_F.copy_(torch.randn(latents, generator=g, dtype=torch.float64) * 0.2)
        sae.b_dec_D.copy_(torch.randn(d, generator=g, dtype=torch.float64) * 0.5)
    return sae


def slow_topk_forward(sae: TopKSAE, x_BD: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z = TopK(ReLU(W_enc (x − b_dec) + b_enc)), x̂ = W_decᵀ z + b_dec, one token at a time."""
    W_enc, b_enc = sae.W_enc_FD.detach(), sae.b_enc_F.detach()
    W_dec, b_dec = sae.W_dec_FD.detach(), sae.b_dec_D.detach()
    zs, x_hats = [], []
    for x in x_BD:
        pre = W_enc @ (x - b_dec) + b_enc
        act = pre.clamp(min=0)
        order = sorted(range(len(act)), key=lambda f: float(act[f]), reverse=True)
        z = torch.zeros_like(act)
        for f in order[:k]:
            z[f] = act[f]
        zs.append(z)
        x_hats.append(W_dec.T @ z + b_dec)
    return torch.stack(zs), torch.stack(x_hats)


def test_topk_forward_equals_formula() -> None:
    sae = random_sae()
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z_ref, x_hat_ref = slow_topk_forward(sae, x, K)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), x_hat_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.encode(x), z_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat_ref, rtol=1e-12, atol=1e-12)
        # training_forward reconstructs the same way
        out = sae.training_forward(x, None, 0)
    torch.testing.assert_close(out.x_hat_BD.detach(), x_hat_ref, rtol=1e-12, atol=1e-12)
    assert out.aux_hat_BD is None
    assert out.active == float((z_ref > 0).sum())
    assert out.fired_F.tolist() == (z_ref > 0).any(0).tolist()


def test_topk_encode_with_other_k() -> None:
    sae = random_sae(seed=2)
    with torch.no_grad():
        sae.b_enc_F.add_(5.0)  # every pre-activation positive: exactly j latents survive for any j
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    previous = None
    with torch.no_grad():
        for j in (1, 2, K, K + 3, F):
            z = sae.encode(x, k=j)
            assert (z != 0).sum(1).tolist() == [j] * 10
            z_ref, _ = slow_topk_forward(sae, x, j)
            torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
            if previous is not None:  # nested: the top-j set contains the top-j' set for j' < j
                assert bool(((previous != 0) <= (z != 0)).all())
            previous = z


def test_topk_training_forward_aux() -> None:
    """The AuxK reconstruction is the decoded top-k_aux of ReLU(pre) among dead latents (no bias)."""
    sae = random_sae(seed=4)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::4] = True
    out = sae.training_forward(x, dead, 3)
    with torch.no_grad():
        pre = sae.pre_activations(x).relu().masked_fill(~dead, -1.0)
        top, where = pre.topk(3, dim=1)
        aux_ref = torch.zeros_like(pre).scatter(1, where, top) @ sae.W_dec_FD
    assert out.aux_hat_BD is not None
    torch.testing.assert_close(out.aux_hat_BD.detach(), aux_ref, rtol=1e-12, atol=1e-12)


def test_project_decoder_grad_is_orthogonal_to_rows() -> None:
    sae = random_sae(seed=6)
    g = torch.randn(F, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    sae.W_dec_FD.grad = g.clone()
    sae.project_decoder_grad_()
    W = sae.W_dec_FD.detach()
    grad = sae.W_dec_FD.grad
    assert float((grad * W).sum(1).abs().max()) < 1e-12
    # exactly the projection g − (g·w) w for unit rows w
    torch.testing.assert_close(grad, g - (g * W).sum(1, keepdim=True) * W, rtol=1e-12, atol=1e-12)
    assert float(grad.norm()) > 0.5 * float(g.norm())


def test_normalise_decoder_gives_unit_rows() -> None:
    sae = random_sae(seed=8)
    scales = torch.linspace(0.1, 7.0, F, dtype=torch.float64)[:, None]
    with torch.no_grad():
        sae.W_dec_FD.mul_(scales)
    before = sae.W_dec_FD.detach().clone()
    sae.normalise_decoder_()
    W = sae.W_dec_FD.detach()
    torch.testing.assert_close(W.norm(dim=1), torch.ones(F, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(W * before.norm(dim=1, keepdim=True), before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_fold_input_scale(architecture: str) -> None:
    """An SAE trained on c·x, applied to c·x and divided by c, equals the folded SAE applied to x."""
    c = 3.7
    sae = random_sae(architecture, seed=9)
    if architecture == "batchtopk":
        sae.threshold.fill_(0.15)  # a threshold that actually cuts some positive pre-activations
    folded = random_sae(architecture, seed=9)
    folded.load_state_dict(sae.state_dict())
    folded.fold_input_scale_(c)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), sae(c * x) / c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(folded.encode(x), sae.encode(c * x), rtol=1e-10, atol=1e-12)
        if architecture == "batchtopk":
            pre = sae.pre_activations(c * x)
            assert bool(((pre > 0) & (pre <= 0.15)).any()), "the threshold must matter in this case"
        assert not torch.allclose(folded(x), sae(x)), "folding must change the function on raw x"


def test_batchtopk_training_keeps_k_times_batch() -> None:
    sae = random_sae("batchtopk", seed=11)
    with torch.no_grad():
        sae.b_enc_F.add_(0.3)
    B = 24
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    assert isinstance(sae, BatchTopKSAE)
    assert float(sae.threshold) == -1.0, "unset until the first batch"
    out = sae.training_forward(x, None, 0)
    pre = sae.pre_activations(x).detach().relu()
    assert int((pre > 0).sum()) > K * B
    # the k·B largest entries over the whole batch, found by sorting every entry
    kth = pre.flatten().sort(descending=True).values[K * B - 1]
    z_ref = pre * (pre >= kth)
    x_hat_ref = z_ref @ sae.W_dec_FD.detach() + sae.b_dec_D.detach()
    torch.testing.assert_close(out.x_hat_BD.detach(), x_hat_ref, rtol=1e-12, atol=1e-12)
    assert int((z_ref > 0).sum()) == K * B
    assert out.active == K * B
    assert out.fired_F.tolist() == (z_ref > 0).any(0).tolist()
    # per-token counts vary (that is the point of BatchTopK) while the batch total is exact
    assert len(set((z_ref > 0).sum(1).tolist())) > 1
    # the first batch sets θ to its smallest kept value; later ones move it: θ ← 0.99 θ + 0.01 · (smallest kept)
    assert float(sae.threshold) == pytest.approx(float(kth), rel=1e-12)
    x2 = 2 * torch.randn(B, D, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    pre2 = sae.pre_activations(x2).detach().relu()
    kth2 = float(pre2.flatten().sort(descending=True).values[K * B - 1])
    assert kth2 != pytest.approx(float(kth))
    sae.training_forward(x2, None, 0)
    assert float(sae.threshold) == pytest.approx(0.99 * float(kth) + 0.01 * kth2, rel=1e-12)


def test_batchtopk_inference_uses_threshold() -> None:
    sae = random_sae("batchtopk", seed=13)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    with torch.no_grad():
        pre = sae.pre_activations(x)
        theta = float(pre.flatten().sort().values[int(0.8 * pre.numel())])  # exactly one of the pre-acts
        sae.threshold.fill_(theta)
        z = sae.encode(x)
        x_hat = sae(x)
    assert bool((pre == theta).any())
    assert bool((z[pre <= theta] == 0).all()), "pre ≤ θ must give 0 (including pre == θ)"
    torch.testing.assert_close(z[pre > theta], pre[pre > theta], rtol=0, atol=0)
    torch.testing.assert_close(x_hat, z @ sae.W_dec_FD + sae.b_dec_D, rtol=1e-12, atol=1e-12)
    # slow loop reference for the reconstruction
    for b in range(3):
        ref = sae.b_dec_D.clone()
        for f in range(F):
            if pre[b, f] > theta:
                ref = ref + pre[b, f] * sae.W_dec_FD[f]
        torch.testing.assert_close(x_hat[b], ref.detach(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Training through interlayer.sae.trainer on synthetic data with a planted dictionary.


def planted_atoms(n_atoms: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    return atoms / atoms.norm(dim=1, keepdim=True)


def planted_chunks(
    atoms: torch.Tensor, active: int, chunk_tokens: int, n_chunks: int, seed: int
) -> Callable[[int], Iterator[Chunk]]:
    """Chunk i: each token a sum of ``active`` distinct atoms with coefficients U[0.5, 2], plus N(0, 0.01²).

    Chunk i depends only on (seed, i), as the trainer's resumption requires."""
    n_atoms, d = atoms.shape

    def chunks(start: int) -> Iterator[Chunk]:
        for index in range(start, n_chunks):
            g = torch.Generator().manual_seed(seed * 100_003 + index)
            which = torch.rand(chunk_tokens, n_atoms, generator=g).topk(active, dim=1).indices
            coef = 0.5 + 1.5 * torch.rand(chunk_tokens, active, generator=g)
            codes = torch.zeros(chunk_tokens, n_atoms).scatter_(1, which, coef)
            x = codes @ atoms + 0.01 * torch.randn(chunk_tokens, d, generator=g)
            yield Chunk(index, {"site": x})

    return chunks


PLANTED_OPTIONS = {
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "hierarchical": {"k": 4},
    "matryoshka": {"k": 4},
    "kron": {"k": 4, "m": 2, "n": 4},
    "jumprelu": {"l0_coefficient": 1e-2},  # one latent must buy 1% of FVU: about the 4 planted ones
    "relu": {"l1_coefficient": 1e-2},  # L1 shrinks values: bigger λ costs FVU, so L0 stays loose,
}


@pytest.mark.parametrize("architecture", list(PLANTED_OPTIONS))
def test_planted_dictionary_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, architecture: str
) -> None:
    # These training budgets recover the planted atoms from the initialisation of the run seed itself (the
    # one interlayer used for every site before sites got their own, trainer.init_seed); from other
    # initialisations JumpReLU recovers about a third of them (a known fragility, see issue 9's note).
    monkeypatch.setattr(trainer_module, "init_seed", lambda seed, _site: seed)
    d, n_atoms, active, latents = 64, 128, 4, 256
    chunk_tokens, n_chunks = 65_536, 6
    atoms = planted_atoms(n_atoms, d, seed=0)
    options = PLANTED_OPTIONS[architecture]
    sae_cfg = make_config(architecture, d_in=d, latents=latents, site="site", model="planted", **options)
    train_cfg = TrainConfig(tokens=chunk_tokens * n_chunks, batch_size=1024, seed=0, dead_tokens=100_000)
    metrics = train_saes(
        tmp_path / "run",
        planted_chunks(atoms, active, chunk_tokens, n_chunks, seed=0),
        {"site": sae_cfg},
        train_cfg,
        {"data": "planted"},
    )
    assert metrics["steps"] == chunk_tokens * n_chunks // 1024
    sae = load_sae(tmp_path / "run" / "site")
    assert sae.cfg.normalisation == "mean_squared_norm" and sae.cfg.input_scale != 1.0
    W_dec = sae.W_dec_FD / sae.W_dec_FD.norm(dim=1, keepdim=True)
    best_cos = (atoms @ W_dec.T).max(dim=1).values
    recovered = float((best_cos >= 0.9).float().mean())
    assert recovered >= 0.9, f"{architecture}: only {recovered:.1%} of the planted atoms recovered"
    # the saved (folded) SAE reads raw activations: it reconstructs fresh planted data well
    x = next(planted_chunks(atoms, active, 4096, 1, seed=99)(0)).acts["site"]
    fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.1
    l0 = float((sae.encode(x) != 0).sum(1).float().mean())
    if architecture == "relu":  # an L1 penalty leaves small activations on: only a loose bound holds
        assert 3 <= l0 <= 16
    else:
        assert 3 <= l0 <= 4  # the planted sparsity (BatchTopK, Matryoshka and JumpReLU: on average)


def small_run(
    out: Path,
    seed: int,
    architecture: str = "topk",
    fail_after: int | None = None,
    starts: list | None = None,
    aux_losses: list | None = None,
    sae_cfg: SAEConfig | None = None,
    data_seed: int = 1,
) -> dict:
    """A small training run (6 chunks of 2048 tokens, batch 256) with dead latents and AuxK in play: an SAE
    of ``architecture`` (or ``sae_cfg`` as given) on planted data drawn with ``data_seed``."""
    atoms = planted_atoms(32, 16, seed=data_seed)
    inner = planted_chunks(atoms, 3, 2048, 6, seed=data_seed)

    def chunks(start: int) -> Iterator[Chunk]:
        if starts is not None:
            starts.append(start)
        for chunk in inner(start):
            if fail_after is not None and chunk.index > fail_after:
                raise Interrupted(f"stopped before chunk {chunk.index}")
            yield chunk

    if sae_cfg is None:
        options = {"l0_coefficient": 1e-3} if architecture == "jumprelu" else {"k": 3}
        if architecture == "kron":
            options |= {"m": 2, "n": 4}
        sae_cfg = make_config(architecture, d_in=16, latents=128, site="site", **options)
    train_cfg = TrainConfig(
        tokens=6 * 2048, batch_size=256, seed=seed, dead_tokens=256, checkpoint_seconds=0, lr=3e-3
    )

    def on_step(step: int, summaries: dict) -> None:
        if aux_losses is not None:
            aux_losses.append(summaries["site"].aux_loss)

    return train_saes(
        out,
        chunks,
        {"site": sae_cfg},
        train_cfg,
        {"data": "planted-small"},
        device=str(TEST_DEVICE),
        on_step=on_step,
    )


class Interrupted(Exception):
    """Stands in for a kill or Ctrl-C in the middle of a run."""


def assert_same(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Bit for bit on the CPU. On CUDA, scatter-adds use float atomics whose order varies between runs, so
    equal up to summation order (the documented guarantee there)."""
    if TEST_DEVICE.type == "cpu":
        assert torch.equal(got, want), name
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    sae = load_sae(folder / "site")
    return {name: t.clone() for name, t in sae.state_dict().items()}


def test_same_seed_same_weights(tmp_path: Path) -> None:
    small_run(tmp_path / "a", seed=5)
    small_run(tmp_path / "b", seed=5)
    small_run(tmp_path / "c", seed=6)
    a, b, c = (saved_tensors(tmp_path / name) for name in "abc")
    assert a.keys() == b.keys()
    for name in a:
        assert_same(a[name], b[name], name)
    assert not torch.allclose(a["W_dec_FD"], c["W_dec_FD"]), "a different seed must give different weights"


@pytest.mark.parametrize(
    "architecture", ["topk", "batchtopk", "hierarchical", "matryoshka", "kron", "jumprelu"]
)
def test_interrupted_run_resumes_exactly(tmp_path: Path, architecture: str) -> None:
    aux_losses: list[float] = []
    full = small_run(tmp_path / "full", seed=3, architecture=architecture, aux_losses=aux_losses)
    assert full["steps"] == 48 and len(aux_losses) == 48
    # dead latents and AuxK must be in play after the interruption point (steps 25..48), so that the
    # resumed run depends on the restored dead-latent counters (JumpReLU has no AuxK)
    assert architecture == "jumprelu" or max(aux_losses[24:]) > 0, "dead latents and AuxK must be exercised"

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        small_run(out, seed=3, architecture=architecture, fail_after=2)
    assert (out / CHECKPOINT / CHECKPOINT_STATE).exists() and not (out / METRICS_FILE).exists()
    committed = json.loads((out / CHECKPOINT / CHECKPOINT_STATE).read_text())
    assert committed["chunk"] == 3 and committed["step"] == 24
    starts: list[int] = []
    resumed = small_run(out, seed=3, architecture=architecture, starts=starts)
    assert starts == [3]
    assert resumed["steps"] == 48
    assert not (out / CHECKPOINT).exists()

    want, got = saved_tensors(tmp_path / "full"), saved_tensors(out)
    assert want.keys() == got.keys()
    if architecture == "batchtopk":
        assert "threshold" in got and float(got["threshold"]) > 0
    for name in want:
        assert_same(want[name], got[name], name)
    assert math.isclose(resumed["sites"]["site"]["fvu"], full["sites"]["site"]["fvu"], rel_tol=0, abs_tol=0)
    # a finished run returns its summary at once, without asking for data
    starts.clear()
    again = small_run(out, seed=3, architecture=architecture, starts=starts)
    assert starts == [] and again["steps"] == 48
