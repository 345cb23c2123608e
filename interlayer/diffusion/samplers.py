"""One registry of samplers for masked diffusion LMs: seeded, batched, counting network evaluations.

Every sampler walks a grid of N steps (``steps``) from t = 1 (all generated positions [MASK]) to t = 0,
t_i = 1 − i/N → s_i = t_i − 1/N, and reads the mask fraction m(t) of its schedule: ``linear`` m(t) = t
(the log-linear schedule with ε = 0), or ``loop`` (G-Star's and ReMDM's): m falls linearly from 1 at t = 1 to
``loop_mask`` (0.1) at ``loop_t_on`` (0.55), stays at 0.1 on the plateau down to ``loop_t_off`` (0.05),
then falls linearly to 0 at t = 0; a step is on the plateau when t ≤ loop_t_on and s ≥ loop_t_off. The last step reaches s = 0 exactly, so every sample ends with no
[MASK] after exactly N steps (the official code stops at s = 1e-5 and spends one more, greedy, network call).
L below is the number of *generated* positions of a sample (prompts and padding are never touched).

Step kinds (u: one uniform per position, from the sample's own generator):

- ancestral (MDLM): a [MASK] is revealed with probability (m_t − m_s)/m_t, its token drawn from the proposal
  (temperature, nucleus); revealed tokens never change. The network is skipped for a row whose tokens did
  not change since its last evaluation (the cache; exact because the networks do not take t).
- remdm (ReMDM, α = 1 − m): a revealed token is remasked with probability σ_t and a [MASK] revealed with
  probability (α_s − (1 − σ_t) α_t)/(1 − α_t), with σ_max = min(1, (1 − α_s)/α_t) (1 when α_t = 0) and
  ``cap``: σ = min(η, σ_max) (η = 0.008); ``rescale``: σ = η·σ_max (η = 0.015); ``conf``: σ^ℓ =
  softmax_ℓ(−ψ^ℓ)·σ_max over revealed positions (ψ: the probability the token was drawn with), σ = 0 at
  masks; ``loop``: on the plateau σ = η (0.02) with α_t = α_s = 1 − loop_mask, ancestral steps elsewhere.
- star: propose x̂0 (every [MASK] drawn, revealed tokens kept), then mask k = ⌈m_s·L⌉ of the L generated
  positions of x̂0 — any of them, so earlier tokens can be revised. Which: ``star`` (Star+) uniformly at
  random; ``star-conf`` the top-k of −ψ/τ + Gumbel (ψ of a token kept from when it was drawn: under SUBS the
  denoiser gives a revealed token probability 1); ``gstar`` the top-k of g_φ(x̂0)/τ + Gumbel with the learned
  remasker's error logits g_φ (τ = ``remask_temperature``). With ``schedule=hybrid`` the star step is taken
  for t ≤ ``t_on`` (0.3) and ancestral steps above; ``loop``: star steps on the plateau; ``star``: every step.
- llada (LLaDA low-confidence remasking): the generated positions are cut into blocks of ``block_length``
  (0: one block), taken left to right with N / blocks steps each; a block's c masks are revealed
  ⌊c / n⌋ per step, the first c mod n steps one more, choosing the [MASK]s whose drawn tokens have the
  highest ψ; never revisited.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from interlayer.diffusion.denoiser import Denoiser
from interlayer.diffusion.engine import (
    ErrorScorer,
    RowNoise,
    State,
    gumbel,
    predict,
    propose,
    score_errors,
    top_k_positions,
)
from interlayer.errors import UserError
from interlayer.progress import progress_bar

STAR_SCHEDULES = ("hybrid", "loop", "star")


@dataclass(frozen=True)
class SamplerInfo:
    """A registry entry."""

    description: str
    kind: str
    """ancestral, remdm, star or llada."""
    strategy: str = ""
    """remdm: cap, rescale, conf, loop; star: random, conf, learned."""
    default_eta: float = 0.0


SAMPLERS: dict[str, SamplerInfo] = {
    "mdlm": SamplerInfo("MDLM ancestral sampling with the no-change cache", "ancestral"),
    "llada": SamplerInfo("LLaDA low-confidence unmasking (optionally block-wise)", "llada"),
    "remdm-cap": SamplerInfo("ReMDM, σ capped at η", "remdm", "cap", 0.008),
    "remdm-rescale": SamplerInfo("ReMDM, σ = η·σ_max", "remdm", "rescale", 0.015),
    "remdm-conf": SamplerInfo("ReMDM, σ spread by low confidence", "remdm", "conf"),
    "remdm-loop": SamplerInfo("ReMDM-loop: remasking at a 10% mask plateau", "remdm", "loop", 0.02),
    "star": SamplerInfo("Star+: star-shaped steps, random remasking", "star", "random"),
    "star-conf": SamplerInfo("star-shaped steps, low-confidence remasking", "star", "conf"),
    "gstar": SamplerInfo("G-Star: star-shaped steps, the learned remasker's errors", "star", "learned"),
}


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample; the same object feeds the CLI, the samples' ``sampling.json`` and validation."""

    sampler: str = "gstar"
    """A name of :data:`SAMPLERS`."""
    steps: int = 128
    """N: denoising steps (network evaluations of the denoiser at most N per sample)."""
    temperature: float = 1.0
    """T of the x̂0 proposal, p^(1/T) renormalised; 0 takes the most probable token."""
    top_p: float = 0.9
    """Nucleus mass of the x̂0 proposal (1: the whole distribution); the official scripts use 0.9."""
    schedule: str = "hybrid"
    """Star samplers: ``hybrid`` (ancestral above t_on), ``loop`` (star steps on the 10% plateau) or ``star``."""
    t_on: float = 0.3
    """Hybrid schedule: star steps for t ≤ t_on, in (0, 1]."""
    eta: float | None = None
    """ReMDM's η (None: 0.008 cap, 0.015 rescale, 0.02 loop)."""
    remask_temperature: float = 1.0
    """τ of the Gumbel-top-k choice of positions to remask (star-conf, gstar)."""
    block_length: int = 0
    """LLaDA: generated positions per block (0: one block)."""
    loop_t_on: float = 0.55
    """Loop schedule: where the plateau starts (from above)."""
    loop_t_off: float = 0.05
    """Loop schedule: where the plateau ends."""
    loop_mask: float = 0.1
    """Loop schedule: the mask fraction held on the plateau."""
    cache: bool = True
    """Reuse a row's denoiser output while its tokens have not changed."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.steps < 1:
            raise UserError(f"steps (--steps) must be at least 1, got {self.steps}")
        if not 0.0 < self.t_on <= 1.0:
            raise UserError(f"t_on (--t-on) must be in (0, 1], got {self.t_on}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.schedule not in STAR_SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(STAR_SCHEDULES)}, got {self.schedule!r}")
        if self.eta is not None and not 0.0 <= self.eta <= 1.0:
            raise UserError(f"eta must be in [0, 1], got {self.eta}")
        if self.remask_temperature <= 0:
            raise UserError(f"remask_temperature must be positive, got {self.remask_temperature}")
        if self.block_length < 0:
            raise UserError(f"block_length must be >= 0, got {self.block_length}")
        if not 0.0 < self.loop_t_off < self.loop_t_on < 1.0:
            raise UserError("the loop schedule needs 0 < loop_t_off < loop_t_on < 1")
        if not 0.0 < self.loop_mask < 1.0:
            raise UserError(f"loop_mask must be in (0, 1), got {self.loop_mask}")

    @property
    def info(self) -> SamplerInfo:
        return SAMPLERS[self.sampler]

    @property
    def eta_value(self) -> float:
        return self.info.default_eta if self.eta is None else self.eta

    @property
    def uses_loop(self) -> bool:
        return self.info.strategy == "loop" or (self.info.kind == "star" and self.schedule == "loop")

    def label(self) -> str:
        """A short name for tables: the sampler, and the star schedule when it is not the hybrid default."""
        if self.info.kind == "star" and self.schedule != "hybrid":
            return f"{self.sampler}-{self.schedule}"
        return self.sampler


@dataclass(frozen=True)
class Step:
    """One step of the grid: from time t to s, the mask fractions there, and the rule applied."""

    index: int
    t: float
    s: float
    m_t: float
    m_s: float
    kind: str
    """ancestral, remdm, star or llada."""


def mask_fraction(config: SamplerConfig, t: float) -> float:
    """m(t) of the config's schedule (module doc)."""
    if not config.uses_loop:
        return t
    on, off, plateau = config.loop_t_on, config.loop_t_off, config.loop_mask
    if t >= on:
        return plateau + (1.0 - plateau) * (t - on) / (1.0 - on)
    if t >= off:
        return plateau
    return plateau * t / off


def plan(config: SamplerConfig) -> list[Step]:
    """The N steps of the grid with the rule each one applies."""
    n, info = config.steps, config.info
    steps = []
    for i in range(n):
        t, s = (n - i) / n, (n - i - 1) / n
        on_plateau = config.uses_loop and s >= config.loop_t_off - 1e-12 and t <= config.loop_t_on + 1e-12
        if info.kind in ("ancestral", "llada"):
            kind = info.kind
        elif info.kind == "remdm":
            kind = "ancestral" if info.strategy == "loop" and not on_plateau else "remdm"
        elif config.schedule == "star":
            kind = "star"
        elif config.schedule == "loop":
            kind = "star" if on_plateau else "ancestral"
        else:
            kind = "star" if (n - i) <= config.t_on * n + 1e-9 else "ancestral"
        m_t, m_s = mask_fraction(config, t), mask_fraction(config, s)
        if kind == "remdm" and on_plateau:
            m_t = m_s = config.loop_mask
        steps.append(Step(i, t, s, m_t, m_s, kind))
    return steps


@dataclass
class SampleResult:
    """What :func:`sample` returns (CPU tensors)."""

    tokens_NL: torch.Tensor
    generated_NL: torch.Tensor
    """True where the sampler wrote (the template's [MASK] positions)."""
    attention_NL: torch.Tensor
    nfe_N: torch.Tensor
    """Denoiser evaluations of each sample."""
    remasker_nfe_N: torch.Tensor
    """Remasker evaluations of each sample (G-Star only)."""
    seconds: float
    """Wall time of the whole call."""
    network_seconds: float
    """Time inside the denoiser and remasker calls (CUDA-synchronised): the rest is sampling overhead."""
    config: dict[str, object] = field(default_factory=dict)


def _llada_plan(
    config: SamplerConfig, generated_BL: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, on its own (so a sample does not depend on its batch): the block of every position (−1: not
    generated), the block row b works on at step i, and k[b, i], the tokens it reveals then."""
    rank_BL = generated_BL.long().cumsum(1) - 1
    block_BL = torch.full_like(rank_BL, -1)
    active_BN = torch.zeros(len(generated_BL), config.steps, dtype=torch.long)
    k_BN = torch.zeros(len(generated_BL), config.steps, dtype=torch.long)
    for b, n_gen in enumerate(generated_BL.sum(1).tolist()):
        width = config.block_length or max(n_gen, 1)
        blocks = max(1, math.ceil(n_gen / width))
        if config.steps % blocks:
            raise UserError(
                f"--steps {config.steps} must be a multiple of the number of blocks ({n_gen} generated tokens "
                f"in blocks of --block-length {width} make {blocks})"
            )
        per_block = config.steps // blocks
        block_BL[b] = torch.where(generated_BL[b], rank_BL[b] // width, -1)
        active_BN[b] = torch.arange(config.steps) // per_block
        for block in range(blocks):
            count = int((block_BL[b] == block).sum())
            for j in range(per_block):
                k_BN[b, block * per_block + j] = count // per_block + (j < count % per_block)
    return block_BL, active_BN, k_BN


@dataclass
class _StepInputs:
    """What a step rule reads besides the state."""

    config: SamplerConfig
    log_p: Callable[[torch.Tensor], torch.Tensor]
    """log p_θ(x0 | x_t) [B, L, V], evaluated (or read from the cache) for the rows given."""
    u_tok_BL: torch.Tensor
    """Uniforms for the proposal's tokens."""
    u_aux_BL: torch.Tensor
    """Uniforms for the step's other choices (which masks to reveal, which tokens to remask)."""
    score_errors: Callable[[torch.Tensor], torch.Tensor] | None = None
    llada: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """LLaDA: :func:`_llada_plan`'s blocks, active block per step and tokens per step."""


def _ancestral(state: State, step: Step, inp: _StepInputs) -> None:
    cfg = inp.config
    masked_BL = state.masked_BL & state.generated_BL
    log_p_BLV = inp.log_p(masked_BL.any(1))
    unmask = 1.0 if step.m_s <= 0 else (step.m_t - step.m_s) / step.m_t
    reveal_BL = masked_BL & (inp.u_aux_BL < unmask) if unmask < 1.0 else masked_BL
    x0_BL, psi_BL = propose(state, log_p_BLV, reveal_BL, inp.u_tok_BL, cfg.temperature, cfg.top_p)
    state.x_BL, state.confidence_BL = x0_BL, psi_BL
    state.changed(reveal_BL.any(1))


def _sigma(cfg: SamplerConfig, step: Step, state: State, decoded_BL: torch.Tensor) -> torch.Tensor:
    """σ_t per position (module doc), float32 [B, L]."""
    alpha_t, alpha_s = 1.0 - step.m_t, 1.0 - step.m_s
    sigma_max = 1.0 if alpha_t <= 0 else min(1.0, (1.0 - alpha_s) / alpha_t)
    strategy, eta = cfg.info.strategy, cfg.eta_value
    if strategy == "conf":
        scores_BL = (-state.confidence_BL).masked_fill(~decoded_BL, float("-inf"))
        return scores_BL.softmax(-1).nan_to_num(0.0) * decoded_BL * sigma_max
    if strategy == "cap":
        sigma = eta if alpha_t <= 0 else min(eta, (1.0 - alpha_s) / alpha_t)
    else:
        sigma = eta * sigma_max if strategy == "rescale" else eta
    return torch.full(state.x_BL.shape, sigma, device=state.x_BL.device)


def _remdm(state: State, step: Step, inp: _StepInputs) -> None:
    cfg = inp.config
    masked_BL = state.masked_BL & state.generated_BL
    decoded_BL = state.generated_BL & ~masked_BL
    log_p_BLV = inp.log_p(masked_BL.any(1))
    sigma_BL = _sigma(cfg, step, state, decoded_BL)
    alpha_t, alpha_s = 1.0 - step.m_t, 1.0 - step.m_s
    unmask_BL = ((alpha_s - (1.0 - sigma_BL) * alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)
    reveal_BL = masked_BL & ((inp.u_aux_BL < unmask_BL) | (unmask_BL >= 1.0))
    remask_BL = decoded_BL & (inp.u_aux_BL < sigma_BL)
    x0_BL, psi_BL = propose(state, log_p_BLV, reveal_BL, inp.u_tok_BL, cfg.temperature, cfg.top_p)
    state.x_BL = x0_BL.masked_fill(remask_BL, state.mask_id)
    state.confidence_BL = psi_BL
    state.changed((reveal_BL | remask_BL).any(1))


def remask_count(m_s: float, generated_B: torch.Tensor) -> torch.Tensor:
    """k = ⌈m_s·L⌉ per row (L: generated positions), computed so that m_s·L a whole number is not rounded up."""
    return torch.ceil(m_s * generated_B.double() - 1e-9).long().clamp(min=0)


def _star(state: State, step: Step, inp: _StepInputs) -> None:
    cfg = inp.config
    masked_BL = state.masked_BL & state.generated_BL
    log_p_BLV = inp.log_p(masked_BL.any(1))
    x0_BL, psi_BL = propose(state, log_p_BLV, masked_BL, inp.u_tok_BL, cfg.temperature, cfg.top_p)
    k_B = remask_count(step.m_s, state.generated_BL.sum(1))
    strategy = cfg.info.strategy
    if strategy == "random":
        score_BL = inp.u_aux_BL
    elif strategy == "conf":
        score_BL = -psi_BL / cfg.remask_temperature + gumbel(inp.u_aux_BL)
    else:
        assert inp.score_errors is not None
        score_BL = inp.score_errors(x0_BL).float() / cfg.remask_temperature + gumbel(inp.u_aux_BL)
    remask_BL = top_k_positions(score_BL, state.generated_BL, k_B)
    new_x_BL = x0_BL.masked_fill(remask_BL, state.mask_id)
    state.changed((new_x_BL != state.x_BL).any(1))
    state.x_BL, state.confidence_BL = new_x_BL, psi_BL


def _llada(state: State, step: Step, inp: _StepInputs) -> None:
    cfg = inp.config
    assert inp.llada is not None
    block_BL, active_BN, k_BN = inp.llada
    candidates_BL = state.masked_BL & (block_BL == active_BN[:, step.index].unsqueeze(1))
    k_B = torch.minimum(k_BN[:, step.index], candidates_BL.sum(1))
    log_p_BLV = inp.log_p(k_B > 0)
    draw_BL = candidates_BL & (k_B > 0).unsqueeze(1)
    x0_BL, psi_BL = propose(state, log_p_BLV, draw_BL, inp.u_tok_BL, cfg.temperature, cfg.top_p)
    reveal_BL = top_k_positions(psi_BL, candidates_BL, k_B)
    state.x_BL = torch.where(reveal_BL, x0_BL, state.x_BL)
    state.confidence_BL = torch.where(reveal_BL, psi_BL, state.confidence_BL)
    state.changed(reveal_BL.any(1))


_RULES: dict[str, Callable[[State, Step, _StepInputs], None]] = {
    "ancestral": _ancestral,
    "remdm": _remdm,
    "star": _star,
    "llada": _llada,
}


def _sample_batch(
    denoiser: Denoiser,
    config: SamplerConfig,
    template_BL: torch.Tensor,
    attention_BL: torch.Tensor,
    noise: RowNoise,
    remasker: ErrorScorer | None,
    on_step: Callable[[], None],
) -> State:
    device = denoiser.device
    x_BL = template_BL.to(device)
    generated_BL = (x_BL == denoiser.mask_id) & attention_BL.to(device).bool()
    batch = len(x_BL)
    state = State(
        x_BL=x_BL,
        generated_BL=generated_BL,
        attention_BL=attention_BL.to(device),
        mask_id=denoiser.mask_id,
        confidence_BL=torch.ones(x_BL.shape, device=device),
        nfe_B=torch.zeros(batch, dtype=torch.long, device=device),
        remasker_nfe_B=torch.zeros(batch, dtype=torch.long, device=device),
    )
    llada = None
    if config.info.kind == "llada":
        block_BL, active_BN, k_BN = _llada_plan(config, generated_BL.cpu())
        llada = (block_BL.to(device), active_BN.to(device), k_BN.to(device))

    def score(x0_BL: torch.Tensor) -> torch.Tensor:
        assert remasker is not None
        return score_errors(state, remasker, x0_BL, device)

    for step in plan(config):
        u_tok_BL, u_aux_BL = noise.step()

        def log_p(need_B: torch.Tensor) -> torch.Tensor:
            if not config.cache:
                state.changed(torch.ones_like(need_B))
            return predict(state, denoiser, need_B)

        inputs = _StepInputs(config, log_p, u_tok_BL, u_aux_BL, score if remasker else None, llada)
        _RULES[step.kind](state, step, inputs)
        on_step()
    return state


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    config: SamplerConfig,
    template_NL: torch.Tensor,
    attention_NL: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
    remasker: ErrorScorer | None = None,
    progress: bool = False,
) -> SampleResult:
    """Fill the [MASK] positions of every template row; sample i uses only the generator of (seed, i)."""
    if config.info.strategy == "learned" and remasker is None:
        raise UserError(
            "gstar needs a remasker (--remasker FOLDER, from `interlayer diffusion train-remasker`)"
        )
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if attention_NL is None:
        attention_NL = torch.ones_like(template_NL)
    n, length = template_NL.shape
    started = time.perf_counter()
    outputs: list[State] = []
    with progress_bar(
        f"sampling ({config.label()}, {config.steps} steps)", n * config.steps, visible=progress
    ) as bar:
        done = 0
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            noise = RowNoise(seed, range(lo, hi), length, denoiser.device)

            def advance(rows: int = hi - lo) -> None:
                nonlocal done
                done += rows
                bar.show(done)

            outputs.append(
                _sample_batch(
                    denoiser, config, template_NL[lo:hi], attention_NL[lo:hi], noise, remasker, advance
                )
            )
    return SampleResult(
        tokens_NL=torch.cat([s.x_BL.cpu() for s in outputs]),
        generated_NL=torch.cat([s.generated_BL.cpu() for s in outputs]),
        attention_NL=attention_NL.cpu(),
        nfe_N=torch.cat([s.nfe_B.cpu() for s in outputs]),
        remasker_nfe_N=torch.cat([s.remasker_nfe_B.cpu() for s in outputs]),
        seconds=time.perf_counter() - started,
        network_seconds=sum(s.network_seconds for s in outputs),
        config=asdict(config),
    )
