"""Samplers against an oracle denoiser (known x0) and a perfect remasker: exact answers, exact counts."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import MASK, PerfectRemasker, oracle_case

from interlayer.diffusion.denoiser import Denoiser
from interlayer.diffusion.engine import draw_tokens, top_k_positions
from interlayer.diffusion.samplers import (
    SAMPLERS,
    SamplerConfig,
    State,
    Step,
    _sigma,
    mask_fraction,
    plan,
    remask_count,
    sample,
)
from interlayer.errors import UserError

CONFIGS = [
    SamplerConfig(sampler=name, steps=16, schedule=schedule)
    for name, info in SAMPLERS.items()
    for schedule in (("hybrid", "loop", "star") if info.kind == "star" else ("hybrid",))
] + [
    SamplerConfig(sampler="llada", steps=16, block_length=3),
    SamplerConfig(sampler="mdlm", steps=16, cache=False),
]


def _truth(targets: dict[int, torch.Tensor], n: int) -> torch.Tensor:
    return torch.stack([targets[k] for k in range(n)])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.label()}-b{c.block_length}-c{int(c.cache)}")
def test_every_sampler_reproduces_x0_with_exact_nfe(config: SamplerConfig) -> None:
    denoiser, oracle, template, targets = oracle_case(5, 13)
    result = sample(denoiser, config, template, seed=3, batch_size=2, remasker=PerfectRemasker(targets))
    assert torch.equal(result.tokens_NL, _truth(targets, 5))
    assert result.nfe_N.tolist() == [oracle.calls[k] for k in range(5)]
    assert int(result.nfe_N.max()) <= config.steps
    star_steps = sum(step.kind == "star" for step in plan(config))
    expected_remasker = star_steps if config.info.strategy == "learned" else 0
    assert result.remasker_nfe_N.tolist() == [expected_remasker] * 5


def test_uncached_mdlm_evaluates_every_step_with_a_mask_and_the_cache_skips_unchanged_rows() -> None:
    denoiser, oracle, template, _ = oracle_case(4, 5)
    uncached = sample(denoiser, SamplerConfig(sampler="mdlm", steps=64, cache=False), template, seed=0)
    cached = sample(denoiser, SamplerConfig(sampler="mdlm", steps=64), template, seed=0)
    assert torch.equal(uncached.tokens_NL, cached.tokens_NL)
    # 4 generated positions over 64 steps: the cached sampler evaluates once plus once per step after a
    # change, at most 4 + 1 times; the uncached one once per step while a mask is left.
    assert int(cached.nfe_N.max()) <= 5 and int(uncached.nfe_N.min()) > 5


def test_star_step_masks_exactly_ceil_of_m_s_times_l() -> None:
    length = 23  # 22 generated positions after the key
    config = SamplerConfig(sampler="star", steps=10, schedule="star", cache=False)
    denoiser, oracle, template, _ = oracle_case(3, length)
    sample(denoiser, config, template, seed=1)
    steps = plan(config)
    masks_seen = [int((x == MASK).sum(1).max()) for x in oracle.inputs]
    masks_seen_min = [int((x == MASK).sum(1).min()) for x in oracle.inputs]
    expected = [22] + [math.ceil(step.s * 22 - 1e-9) for step in steps[:-1]]
    assert masks_seen == expected == masks_seen_min
    assert expected[1:] == [20, 18, 16, 14, 11, 9, 7, 5, 3]  # ⌈0.9·22⌉ = 20, ⌈0.5·22⌉ = 11, ...


def test_remask_count_does_not_round_up_whole_numbers() -> None:
    assert remask_count(0.3, torch.tensor([10, 11, 100])).tolist() == [3, 4, 30]
    assert remask_count(0.0, torch.tensor([7])).tolist() == [0]


@pytest.mark.parametrize("name", ["remdm-cap", "remdm-rescale", "remdm-conf", "remdm-loop"])
@pytest.mark.parametrize("steps", [1, 7, 64])
def test_remdm_sigma_never_exceeds_its_bound(name: str, steps: int) -> None:
    config = SamplerConfig(sampler=name, steps=steps)
    generator = torch.Generator().manual_seed(0)
    x_BL = torch.randint(0, 5, (3, 17), generator=generator)
    x_BL[:, ::3] = MASK
    decoded_BL = x_BL != MASK
    state = State(
        x_BL=x_BL,
        generated_BL=torch.ones_like(decoded_BL),
        attention_BL=torch.ones_like(x_BL),
        mask_id=MASK,
        confidence_BL=torch.rand(3, 17, generator=generator),
        nfe_B=torch.zeros(3, dtype=torch.long),
        remasker_nfe_B=torch.zeros(3, dtype=torch.long),
    )
    remdm_steps = [step for step in plan(config) if step.kind == "remdm"]
    assert remdm_steps or (name == "remdm-loop" and steps == 1)  # one step: only the final reveal
    for step in remdm_steps:
        alpha_t, alpha_s = 1 - step.m_t, 1 - step.m_s
        bound = 1.0 if alpha_t <= 0 else min(1.0, (1 - alpha_s) / alpha_t)
        sigma_BL = _sigma(config, step, state, decoded_BL)
        assert float(sigma_BL.max()) <= bound + 1e-7
        unmask_BL = (alpha_s - (1 - sigma_BL) * alpha_t) / (1 - alpha_t)
        assert float(unmask_BL.min()) >= -1e-7 and float(unmask_BL.max()) <= 1 + 1e-7
        if name == "remdm-conf":  # the revealed positions share σ_max, the lower ψ the larger
            assert torch.allclose(sigma_BL.sum(1), torch.full((3,), bound))
            assert float(sigma_BL[~decoded_BL].abs().max()) == 0.0


def test_loop_schedule_and_plateau_steps() -> None:
    config = SamplerConfig(sampler="remdm-loop", steps=20)
    assert [mask_fraction(config, t) for t in (1.0, 0.55, 0.3, 0.05, 0.025, 0.0)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.1, 0.05, 0.0]
    )
    kinds = [step.kind for step in plan(config)]
    # t = 1, 0.95, ..., 0.6 ancestral (9 steps); plateau while t ≤ 0.55 and s ≥ 0.05 (10 steps); last to 0.
    assert kinds == ["ancestral"] * 9 + ["remdm"] * 10 + ["ancestral"]
    hybrid = [step.kind for step in plan(SamplerConfig(sampler="gstar", steps=10, t_on=0.3))]
    assert hybrid == ["ancestral"] * 7 + ["star"] * 3


def test_same_seed_same_samples_across_batch_sizes_and_positions() -> None:
    denoiser, _, template, _ = oracle_case(6, 11)
    config = SamplerConfig(sampler="star", steps=8, schedule="star")
    whole = sample(denoiser, config, template, seed=5, batch_size=6)
    # a noisy denoiser so that the samples depend on the random draws, not only on x0
    noisy = Denoiser(_Noisy(), MASK)
    a = sample(noisy, config, template, seed=5, batch_size=1)
    b = sample(noisy, config, template, seed=5, batch_size=4)
    c = sample(noisy, config, template, seed=6, batch_size=4)
    assert torch.equal(a.tokens_NL, b.tokens_NL) and torch.equal(a.nfe_N, b.nfe_N)
    assert not torch.equal(a.tokens_NL, c.tokens_NL)
    assert torch.equal(whole.tokens_NL, sample(denoiser, config, template, seed=5, batch_size=4).tokens_NL)


class _Noisy(torch.nn.Module):
    """Uniform logits over the first 8 tokens: samples are pure noise draws."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(1, MASK + 1, bias=False)
        self.config = type("C", (), {"to_dict": lambda self: {"name": "noisy"}})()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> object:
        logits = torch.full((*input_ids.shape, MASK + 1), -30.0)
        logits[..., :8] = 0.0
        return type("O", (), {"logits": logits})()


def test_prompts_and_padding_are_never_touched() -> None:
    denoiser, _, _, targets = oracle_case(2, 10)
    template = torch.tensor(
        [[0, 3, 4, MASK, MASK, MASK, 1, 1, 1, 1], [1, MASK, MASK, MASK, MASK, 7, 7, 7, 7, 7]]
    )
    attention = torch.tensor([[1] * 6 + [0] * 4, [1] * 10])
    for config in CONFIGS:
        result = sample(denoiser, config, template, attention, remasker=PerfectRemasker(targets))
        fixed = ~(template == MASK)
        assert torch.equal(result.tokens_NL[fixed], template[fixed]), config.label()
        truth = _truth(targets, 2)
        assert torch.equal(result.tokens_NL[~fixed], truth[~fixed]), config.label()


def test_draw_tokens_nucleus_and_temperature_against_a_reference() -> None:
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    log_p = p.log()
    # nucleus 0.9 keeps {0.5, 0.3, 0.15} (mass before the 4th is 0.95 ≥ 0.9), renormalised by 0.95
    edges = torch.tensor([0.5, 0.8, 0.95]) / 0.95
    for u, want in [(0.0, 0), (edges[0] - 1e-4, 0), (edges[0] + 1e-4, 1), (edges[1] + 1e-4, 2), (0.9999, 2)]:
        token, psi = draw_tokens(log_p, torch.tensor([float(u)]), 1.0, 0.9)
        assert int(token) == want
        assert float(psi) == pytest.approx(float(p[0, want]) / 0.95, rel=1e-5)
    token, psi = draw_tokens(log_p, torch.tensor([0.99]), 0.0, 1.0)
    assert int(token) == 0 and float(psi) == pytest.approx(0.5)
    # temperature 0.5 squares the probabilities before renormalising
    q = p**2 / (p**2).sum()
    token, psi = draw_tokens(log_p, torch.tensor([float(q[0, 0]) + 1e-4]), 0.5, 1.0)
    assert int(token) == 1 and float(psi) == pytest.approx(float(q[0, 1]), rel=1e-5)


def test_top_k_positions_respects_eligibility_and_per_row_k() -> None:
    score = torch.tensor([[5.0, 1.0, 4.0, 3.0], [0.0, 9.0, 8.0, 7.0]])
    eligible = torch.tensor([[True, True, False, True], [True, True, True, True]])
    chosen = top_k_positions(score, eligible, torch.tensor([2, 0]))
    assert chosen.tolist() == [[True, False, False, True], [False, False, False, False]]


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="steps"):
        SamplerConfig(steps=0)
    for t_on in (0.0, 1.5):
        with pytest.raises(UserError, match="t_on"):
            SamplerConfig(t_on=t_on)
    denoiser, _, template, _ = oracle_case(1, 6)
    with pytest.raises(UserError, match="remasker"):
        sample(denoiser, SamplerConfig(sampler="gstar", steps=4), template)
    with pytest.raises(UserError, match="multiple of the number of blocks"):
        sample(denoiser, SamplerConfig(sampler="llada", steps=5, block_length=2), template)


def test_step_record_is_the_grid() -> None:
    steps = plan(SamplerConfig(sampler="mdlm", steps=4))
    assert steps[0] == Step(0, 1.0, 0.75, 1.0, 0.75, "ancestral") and steps[-1].s == 0.0


def test_nucleus_draws_equal_a_full_sort_reference_on_peaked_and_flat_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([8.0] * 50 + [0.3] * 50).unsqueeze(1)  # nuclei of a few tokens and of hundreds
    log_p = (torch.randn(100, 500, generator=generator) * scale).log_softmax(-1)
    u = torch.rand(100, generator=generator)
    tokens, psi = draw_tokens(log_p, u, 1.0, 0.9)
    sizes = []
    for row in range(100):
        p = log_p[row].exp()
        order = sorted(range(500), key=lambda v: -float(p[v]))
        kept, mass = set(), 0.0
        for v in order:  # the most probable tokens until their mass reaches 0.9
            if mass >= 0.9 * float(p.sum()):
                break
            kept.add(v)
            mass += float(p[v])
        sizes.append(len(kept))
        total = sum(float(p[v]) for v in kept)
        running, want = 0.0, max(kept)
        for v in sorted(kept):  # inverse CDF in vocabulary order
            running += float(p[v]) / total
            if float(u[row]) <= running:
                want = v
                break
        assert int(tokens[row]) == want
        assert float(psi[row]) == pytest.approx(float(p[want]) / total, rel=1e-4)
    assert min(sizes) < 10 and max(sizes) > 200


def _state(x_BL: torch.Tensor, confidence_BL: torch.Tensor | None = None) -> State:
    return State(
        x_BL=x_BL.clone(),
        generated_BL=torch.ones_like(x_BL, dtype=torch.bool),
        attention_BL=torch.ones_like(x_BL),
        mask_id=MASK,
        confidence_BL=torch.ones(x_BL.shape) if confidence_BL is None else confidence_BL,
        nfe_B=torch.zeros(len(x_BL), dtype=torch.long),
        remasker_nfe_B=torch.zeros(len(x_BL), dtype=torch.long),
    )


def _inputs(config: SamplerConfig, log_p_BLV: torch.Tensor, u_aux: torch.Tensor, **extra: object) -> object:
    from interlayer.diffusion.samplers import _StepInputs

    u_tok = torch.full(u_aux.shape, 0.5)
    return _StepInputs(config, lambda need: log_p_BLV, u_tok, u_aux, **extra)  # type: ignore[arg-type]


def _peaked(x0_BL: torch.Tensor, psi_BL: torch.Tensor) -> torch.Tensor:
    """log p with mass ψ on x0's token and the rest spread evenly over the other real tokens."""
    p = ((1 - psi_BL) / (MASK - 1)).unsqueeze(-1).expand(*x0_BL.shape, MASK + 1).clone()
    p.scatter_(-1, x0_BL.unsqueeze(-1), psi_BL.unsqueeze(-1))
    p[..., MASK] = 0
    return p.log()


def test_gstar_remasks_the_positions_its_remasker_calls_errors() -> None:
    from interlayer.diffusion.samplers import _star

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, MASK, (4, 20), generator=generator)
    errors = torch.zeros(4, 20, dtype=torch.bool)
    errors[:, [2, 5, 11, 17]] = True  # k = ⌈0.2 · 20⌉ = 4 positions per row
    step = Step(0, 0.25, 0.2, 0.25, 0.2, "star")
    config = SamplerConfig(sampler="gstar", steps=4)
    state = _state(torch.full_like(x0, MASK))
    inputs = _inputs(config, _peaked(x0, torch.full(x0.shape, 0.99)), torch.rand(4, 20, generator=generator),
                     score_errors=lambda x: torch.where(errors, 50.0, -50.0))  # fmt: skip
    _star(state, step, inputs)  # type: ignore[arg-type]
    assert torch.equal(state.x_BL == MASK, errors)
    assert torch.equal(state.x_BL[~errors], x0[~errors])


def test_star_conf_remasks_the_least_confident_and_llada_commits_the_most_confident() -> None:
    from interlayer.diffusion.samplers import _llada, _star

    x0 = torch.arange(1, 11).unsqueeze(0) % MASK
    psi = torch.tensor([[0.99, 0.98, 0.02, 0.97, 0.96, 0.01, 0.95, 0.94, 0.93, 0.92]])
    u_aux = torch.full((1, 10), 0.5)  # the same Gumbel noise everywhere: the order is ψ's
    state = _state(torch.full_like(x0, MASK))
    _star(
        state,
        Step(0, 0.3, 0.2, 0.3, 0.2, "star"),
        _inputs(SamplerConfig(sampler="star-conf"), _peaked(x0, psi), u_aux),
    )  # type: ignore[arg-type]
    assert (state.x_BL == MASK).nonzero()[:, 1].tolist() == [2, 5]
    state = _state(torch.full_like(x0, MASK))
    plan_ = (torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), torch.tensor([[3]]))
    _llada(
        state,
        Step(0, 1.0, 0.0, 1.0, 0.0, "llada"),
        _inputs(SamplerConfig(sampler="llada", steps=1), _peaked(x0, psi), u_aux, llada=plan_),
    )  # type: ignore[arg-type]
    assert (state.x_BL != MASK).nonzero()[:, 1].tolist() == [0, 1, 3]


@pytest.mark.parametrize("name", ["remdm-cap", "remdm-rescale", "remdm-conf"])
def test_remdm_remasks_and_reveals_at_the_posterior_rates(name: str) -> None:
    from interlayer.diffusion.samplers import _remdm

    rows, length = 4000, 10
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, MASK, (rows, length), generator=generator)
    x[:, :5] = MASK  # 5 masks, 5 revealed tokens per row
    psi = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.9, 0.9]).expand(rows, length).clone()
    config = SamplerConfig(sampler=name, steps=10, eta=0.3 if name != "remdm-conf" else None)
    step = Step(5, 0.5, 0.4, 0.5, 0.4, "remdm")
    state = _state(x, psi)
    sigma = _sigma(config, step, state, x != MASK)
    _remdm(
        state,
        step,
        _inputs(
            config,
            _peaked(x.clamp(max=MASK - 1), torch.full(x.shape, 0.9)),
            torch.rand(rows, length, generator=generator),
        ),
    )  # type: ignore[arg-type]
    remasked = (state.x_BL[:, 5:] == MASK).float().mean(0)
    revealed = (state.x_BL[:, :5] != MASK).float().mean()
    assert torch.allclose(remasked, sigma[0, 5:], atol=0.025)
    alpha_t, alpha_s = 0.5, 0.6
    expected_reveal = (alpha_s - (1 - sigma[0, 0]) * alpha_t) / (1 - alpha_t)
    assert float(revealed) == pytest.approx(float(expected_reveal), abs=0.02)
    if name == "remdm-conf":  # the token drawn with ψ = 0.1 is remasked most
        assert int(remasked.argmax()) == 2 and float(sigma[0, :5].abs().max()) == 0.0
    else:
        assert float(remasked.mean()) > 0.05


class _Recording(torch.nn.Module):
    """Logits +40 on token (position mod 5), recording the attention masks it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(1, MASK + 1, bias=False)
        self.config = type("C", (), {"to_dict": lambda self: {"name": "recording"}})()
        self.masks: list[torch.Tensor | None] = []

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> object:
        self.masks.append(attention_mask)
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids) % 5
        return type("O", (), {"logits": torch.nn.functional.one_hot(positions, MASK + 1).float() * 40})()


def test_padding_reaches_the_network_as_an_attention_mask() -> None:
    network = _Recording()
    template = torch.tensor([[0, MASK, MASK, 1, 1], [0, MASK, MASK, MASK, MASK]])
    attention = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    sample(Denoiser(network, MASK), SamplerConfig(sampler="mdlm", steps=2, cache=False), template, attention)
    first = network.masks[0]
    assert first is not None and torch.equal(first, attention)


@pytest.mark.parametrize("name", ["llada", "gstar", "remdm-conf"])
def test_rows_of_different_lengths_sample_the_same_alone_or_together(name: str) -> None:
    """Block plans, masks counts and noise are per row: a row's sample does not depend on its batch-mates."""
    noisy = Denoiser(_Noisy(), MASK)
    template = torch.full((3, 12), MASK)
    template[:, 0] = torch.tensor([0, 1, 2])
    attention = torch.ones_like(template)
    attention[0, 8:] = 0  # row 0: 7 generated positions; row 1 and 2: 11
    template[0, 8:] = 1
    config = SamplerConfig(sampler=name, steps=6, block_length=4 if name == "llada" else 0)  # 2 and 3 blocks
    remasker = (lambda x0, mask: (x0 % 3).float()) if name == "gstar" else None
    together = sample(noisy, config, template, attention, seed=2, batch_size=3, remasker=remasker)
    alone = sample(noisy, config, template, attention, seed=2, batch_size=1, remasker=remasker)
    assert torch.equal(together.tokens_NL, alone.tokens_NL) and torch.equal(together.nfe_N, alone.nfe_N)
