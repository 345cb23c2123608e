"""What steering vectors do inside the model (arXiv:2509.06608): logit lens, persistence, token substitution,
path patching.

Notation: the vectors' model has L blocks; h_m[b, t] ∈ R^d is the residual stream after block m (site
``layers.m``); W_U ∈ R^{V×d} is the unembedding (``model.get_output_embeddings().weight``); a batch is
``input_ids`` [B, T] with ``attention_mask`` [B, T], and a *real* token is one with mask 1. "Vanilla" is the
model without vectors; "steered" is the model with one vector s (at one site σ of layer ℓ) added, alone, at
every position (:meth:`SteeringVectors.only` then :meth:`SteeringVectors.applied`). Every cosine is
cos(a, b) = a·b / (‖a‖·‖b‖), defined as 0 when a or b is zero. Each function returns a frozen dataclass of
plain Python numbers, strings, lists and dicts, so ``dataclasses.asdict`` gives JSON-ready data.

- :func:`logit_lens`, per site σ: c_v = cos(s_σ, W_U[v]) for every token v; the ``top`` tokens with the
  largest c_v and the ``top`` with the smallest, and ‖s_σ‖. The final norm is not applied.
- :func:`persistence`, per site σ of layer ℓ: Δh_m = h_m(steered) − h_m(vanilla) for each residual site
  ``layers.m`` with m ≥ ℓ; over the N real tokens (all rows of the batch together),

      cos_s(m)    = (1/N)·Σ_t cos(Δh_m[t], s_σ)
      cos_mean(m) = (1/N)·Σ_t cos(Δh_m[t], μ_m),   μ_m = (1/N)·Σ_t Δh_m[t]
      norm(m)     = (1/N)·Σ_t ‖Δh_m[t]‖

  At the insertion site itself (σ = ``layers.ℓ``) Δh_ℓ = s_σ at every token, so cos_s(ℓ) = cos_mean(ℓ) = 1.
- :func:`token_substitution`: each row b holds a prompt followed by a completion that starts at index
  c_b = ``completion_start[b]``. Logits row t predicts the token at index t + 1, so the completion token at
  index t (c_b ≤ t, mask 1) is predicted by logits row t − 1: the *first generated position* is the
  completion token at index c_b, predicted by logits row c_b − 1 (the last prompt token); *the rest* are the
  indices t > c_b. At each such position, with P = softmax of that logits row,

      Δp = P_steered − P_vanilla ∈ R^V,   rise = max_v Δp[v],   risen = argmax_v Δp[v],
      TV = ½·Σ_v |Δp[v]|

  aggregated into counts of ``risen`` (all positions, first, rest), the mean rise and mean TV of the first
  positions and of the rest, and mean_b Δp over the first positions for the tokens where it is largest.
- :func:`path_patching`: the vector at σ alone (default ``layers.{L−2}``) and block k after it (default
  L − 1). a_v, a_s: block k's attention output (site ``layers.k.attn``) in the vanilla and steered runs; the
  *MLP input* is the input of the module hooked by site ``layers.k.mlp``. Runs, all but vanilla with the
  vector on:

      none:     the steered run, unpatched;
      both:     the attention site's value replaced by a_v (residual and MLP both see a_v);
      mlp:      the MLP input replaced by the one recorded in ``both`` (the MLP reads as if the attention
                output were a_v; the residual stream carries a_s);
      residual: ``both`` with the MLP input replaced by the one recorded in ``none`` (the residual stream
                carries a_v; the MLP reads as if it were a_s).

  Each run is scored by the per-token KL(P_vanilla ‖ P_run) = Σ_v P_vanilla[v]·(log P_vanilla[v] −
  log P_run[v]) of the next-token distributions at the real tokens: its mean over them, its mean over the
  batch at each position index, and for the patches the fraction of the steering KL removed,
  1 − KL(patch)/KL(none). In a parallel block (GPT-J, Falcon) the MLP reads the residual before the
  attention, so ``mlp`` equals ``none`` and ``residual`` equals ``both`` (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.sites import Site, capture, hooks, model_sites, resolve_sites, splice
from interlayer.steering.vectors import SteeringVectors

VARIANTS = ("none", "mlp", "residual", "both")
"""The path-patching runs, in the order of :attr:`PathPatching.variants`."""


@dataclass(frozen=True)
class LensResult:
    """The logit lens of one site's vector."""

    site: str
    """The vector's site, e.g. ``layers.5``."""
    norm: float
    """‖s‖."""
    top_tokens: list[str]
    """The decoded tokens with the largest cosine, largest first."""
    top_ids: list[int]
    """Their token ids."""
    top_cosines: list[float]
    """Their cosines with s."""
    bottom_tokens: list[str]
    """The decoded tokens with the smallest cosine, smallest first."""
    bottom_ids: list[int]
    """Their token ids."""
    bottom_cosines: list[float]
    """Their cosines with s."""


@dataclass(frozen=True)
class PersistenceCurve:
    """How one vector, inserted alone, shows in the residual stream of its own and every later layer."""

    site: str
    """The vector's site."""
    layer: int
    """Its layer ℓ."""
    vector_norm: float
    """‖s‖."""
    layers: list[int]
    """The residual layers m ≥ ℓ, in order; the other lists are indexed like this one."""
    cos_with_vector: list[float]
    """Mean over real tokens of cos(Δh_m[t], s)."""
    cos_with_mean: list[float]
    """Mean over real tokens of cos(Δh_m[t], μ_m), μ_m the mean of Δh_m over real tokens."""
    delta_norm: list[float]
    """Mean over real tokens of ‖Δh_m[t]‖."""


@dataclass(frozen=True)
class TokenCount:
    """How often one token was the most-risen one."""

    token: str
    """The decoded token."""
    token_id: int
    """Its id."""
    count: int
    """The number of positions where its probability rose most."""


@dataclass(frozen=True)
class TokenRise:
    """One token's mean probability change over a set of positions."""

    token: str
    """The decoded token."""
    token_id: int
    """Its id."""
    rise: float
    """Mean of Δp[token] over the positions."""


@dataclass(frozen=True)
class PositionRise:
    """The probability change at one completion position."""

    row: int
    """The batch row b."""
    position: int
    """Index t of the completion token predicted here (its distribution is logits row t − 1)."""
    first: bool
    """True at the first generated position, t = completion_start[b]."""
    token: str
    """The decoded token whose probability rose most."""
    token_id: int
    """Its id."""
    rise: float
    """max_v Δp[v]."""
    total_variation: float
    """½·Σ_v |Δp[v]|."""


@dataclass(frozen=True)
class TokenSubstitution:
    """Which tokens a vector makes likelier along teacher-forced completions, first position vs the rest."""

    site: str
    """The vector's site."""
    num_first: int
    """The number of first generated positions (one per row)."""
    num_rest: int
    """The number of later completion positions."""
    counts_all: list[TokenCount]
    """The most frequent most-risen tokens over all positions, most frequent first (ties by id)."""
    counts_first: list[TokenCount]
    """The same over the first positions."""
    counts_rest: list[TokenCount]
    """The same over the rest."""
    mean_rise_first: float
    """Mean of max_v Δp[v] over the first positions."""
    mean_rise_rest: float | None
    """The same over the rest (None when there is none)."""
    mean_tv_first: float
    """Mean total variation ½·Σ_v |Δp[v]| over the first positions."""
    mean_tv_rest: float | None
    """The same over the rest (None when there is none)."""
    first_mean_rise: list[TokenRise]
    """The tokens with the largest mean Δp over the first positions, largest first."""
    per_position: list[PositionRise]
    """Every completion position, by row then position."""


@dataclass(frozen=True)
class PathPatching:
    """KL(vanilla ‖ run) of the steered run and of the three patched routings of one block's attention."""

    vector_site: str
    """The site of the vector, applied alone."""
    block: int
    """The block k whose attention output is patched."""
    variants: list[str]
    """``none``, ``mlp``, ``residual``, ``both`` (see the module docstring)."""
    mean_kl: dict[str, float]
    """Per variant, the mean over real tokens of KL(P_vanilla ‖ P_run)."""
    positions: list[int]
    """The position indices with at least one real token; the curves are indexed like this list."""
    kl_by_position: dict[str, list[float]]
    """Per variant, the mean over the batch rows real there of the KL at each position index."""
    fraction_removed: dict[str, float | None]
    """Per patch (``mlp``, ``residual``, ``both``), 1 − KL(patch)/KL(none); None when KL(none) = 0."""


def _cosines(a_ND: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """Row-wise cos(a, b) [N], 0 where a row of either is zero."""
    den_N = a_ND.norm(dim=-1) * b_ND.norm(dim=-1)
    dots_N = (a_ND * b_ND).sum(dim=-1)
    return torch.where(den_N > 0, dots_N / den_N.clamp_min(torch.finfo(den_N.dtype).tiny), 0.0)


def _decode(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id]))


def _batch(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch on the model's device, checked: [B, T] ids and mask of the same shape, some real token."""
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise UserError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both "
            "be [batch, tokens]"
        )
    if not bool(attention_mask.bool().any()):
        raise UserError("the batch has no real token (attention_mask is all 0)")
    device = next(model.parameters()).device
    return input_ids.to(device), attention_mask.to(device)


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The float32 logits [B, T, V] of one forward pass."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()


def _vector_site(sites: dict[str, Site], name: str) -> Site:
    """The site ``name`` among the vectors' ``sites``; one line if they have no vector there."""
    if name not in sites:
        raise UserError(f"no steering vector at site {name!r}; the vectors have {', '.join(sites)}")
    return sites[name]


def logit_lens(model: nn.Module, tokenizer: Any, vectors: SteeringVectors, top: int = 10) -> list[LensResult]:
    """Per site of ``vectors``: the ``top`` tokens whose unembedding rows have the largest and the smallest
    cosine with the site's vector (module docstring)."""
    vectors.check_model(model)
    if top < 1:
        raise UserError(f"top must be >= 1, got {top}")
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None:
        raise UserError(f"{type(model).__name__} has no unembedding; the logit lens needs a causal LM")
    W_U_VD = head.weight.detach().float()
    if W_U_VD.shape[1] != vectors.meta.d_model:
        raise UserError(
            f"the unembedding has width {W_U_VD.shape[1]}, the vectors {vectors.meta.d_model}: no logit lens"
        )
    k = min(top, W_U_VD.shape[0])
    results = []
    for site, s_D in vectors.by_site().items():
        s_D = s_D.float().to(W_U_VD.device)
        cos_V = _cosines(W_U_VD, s_D.expand_as(W_U_VD))
        high, low = cos_V.topk(k), cos_V.topk(k, largest=False)
        results.append(
            LensResult(
                site=site,
                norm=float(s_D.norm()),
                top_tokens=[_decode(tokenizer, i) for i in high.indices.tolist()],
                top_ids=high.indices.tolist(),
                top_cosines=high.values.tolist(),
                bottom_tokens=[_decode(tokenizer, i) for i in low.indices.tolist()],
                bottom_ids=low.indices.tolist(),
                bottom_cosines=low.values.tolist(),
            )
        )
    return results


@torch.no_grad()
def persistence(
    model: nn.Module, vectors: SteeringVectors, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[PersistenceCurve]:
    """Per site of ``vectors``, that vector alone: cos(Δh_m, s), cos(Δh_m, mean Δh_m) and ‖Δh_m‖ at its own
    and every later residual layer m, averaged over the real tokens (module docstring). One vanilla pass and
    one steered pass per site, each over the whole batch."""
    sites = vectors.check_model(model)
    input_ids, attention_mask = _batch(model, input_ids, attention_mask)
    real_BT = attention_mask.bool()
    residual = resolve_sites(model, "layers.*")
    with capture(model, residual) as vanilla:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    by_site = vectors.by_site()
    curves = []
    for name, site in sites.items():
        later = [r for r in residual if r.layer >= site.layer]
        with vectors.only(name).applied(model), capture(model, later) as steered:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        s_D = by_site[name].float().to(input_ids.device)
        cos_s, cos_mean, norms = [], [], []
        for r in later:
            delta_ND = (steered[r.name].float() - vanilla[r.name].float())[real_BT]
            cos_s.append(float(_cosines(delta_ND, s_D.expand_as(delta_ND)).mean()))
            cos_mean.append(float(_cosines(delta_ND, delta_ND.mean(dim=0).expand_as(delta_ND)).mean()))
            norms.append(float(delta_ND.norm(dim=-1).mean()))
        curves.append(
            PersistenceCurve(
                site=name,
                layer=site.layer,
                vector_norm=float(s_D.norm()),
                layers=[r.layer for r in later],
                cos_with_vector=cos_s,
                cos_with_mean=cos_mean,
                delta_norm=norms,
            )
        )
    return curves


def _token_counts(tokenizer: Any, ids_N: torch.Tensor, top: int) -> list[TokenCount]:
    ids, counts = ids_N.unique(return_counts=True)
    ranked = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))[:top]
    return [TokenCount(_decode(tokenizer, i), i, c) for i, c in ranked]


def _mean(values_N: torch.Tensor) -> float | None:
    return float(values_N.mean()) if values_N.numel() else None


@torch.no_grad()
def token_substitution(
    model: nn.Module,
    tokenizer: Any,
    vectors: SteeringVectors,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_start: Sequence[int],
    site: str | None = None,
    top: int = 20,
) -> TokenSubstitution:
    """Teacher-force the batch with and without the vector at ``site`` (default: the one of the highest layer)
    and compare the next-token distributions at the completion positions (module docstring: the first
    generated token, at index ``completion_start[b]``, is predicted by logits row ``completion_start[b] − 1``)."""
    sites = vectors.check_model(model)
    name = site if site is not None else max(reversed(list(sites)), key=lambda n: sites[n].layer)
    _vector_site(sites, name)
    if top < 1:
        raise UserError(f"top must be >= 1, got {top}")
    input_ids, attention_mask = _batch(model, input_ids, attention_mask)
    batch, tokens = input_ids.shape
    if len(completion_start) != batch:
        raise UserError(f"completion_start has {len(completion_start)} entries for a batch of {batch} rows")
    real_BT = attention_mask.bool()
    for b, start in enumerate(completion_start):
        if not (1 <= start < tokens and real_BT[b, start - 1] and real_BT[b, start]):
            raise UserError(
                f"row {b}: completion_start {start} must index a real completion token after a real prompt token"
            )
    vanilla_BTV = _logits(model, input_ids, attention_mask)
    with vectors.only(name).applied(model):
        steered_BTV = _logits(model, input_ids, attention_mask)

    start_B = torch.tensor(list(completion_start), device=input_ids.device)
    index_T = torch.arange(tokens, device=input_ids.device)
    rows_N, positions_N = (real_BT & (index_T[None, :] >= start_B[:, None])).nonzero(as_tuple=True)
    predictor_N = positions_N - 1  # the logits row that predicts completion token t
    delta_NV = steered_BTV[rows_N, predictor_N].softmax(-1) - vanilla_BTV[rows_N, predictor_N].softmax(-1)
    rise_N, risen_N = delta_NV.max(dim=-1)
    tv_N = 0.5 * delta_NV.abs().sum(dim=-1)
    first_N = positions_N == start_B[rows_N]
    first_rise = delta_NV[first_N].mean(dim=0).topk(min(top, delta_NV.shape[1]))

    per_position = [
        PositionRise(b, t, f, _decode(tokenizer, v), v, r, tv)
        for b, t, f, v, r, tv in zip(
            rows_N.tolist(),
            positions_N.tolist(),
            first_N.tolist(),
            risen_N.tolist(),
            rise_N.tolist(),
            tv_N.tolist(),
            strict=True,
        )
    ]
    return TokenSubstitution(
        site=name,
        num_first=int(first_N.sum()),
        num_rest=int((~first_N).sum()),
        counts_all=_token_counts(tokenizer, risen_N, top),
        counts_first=_token_counts(tokenizer, risen_N[first_N], top),
        counts_rest=_token_counts(tokenizer, risen_N[~first_N], top),
        mean_rise_first=float(rise_N[first_N].mean()),
        mean_rise_rest=_mean(rise_N[~first_N]),
        mean_tv_first=float(tv_N[first_N].mean()),
        mean_tv_rest=_mean(tv_N[~first_N]),
        first_mean_rise=[
            TokenRise(_decode(tokenizer, i), i, r)
            for i, r in zip(first_rise.indices.tolist(), first_rise.values.tolist(), strict=True)
        ],
        per_position=per_position,
    )


@contextmanager
def _module_input(
    model: nn.Module, module_path: str, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> Iterator[None]:
    """Pass the first input of the module at ``module_path`` through ``fn`` in every forward pass run inside
    the block; a tensor ``fn`` returns replaces that input."""
    module = model.get_submodule(module_path)

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        new = fn(args[0] if args else kwargs["hidden_states"])
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _recorder(store: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
    """A hook function that keeps a copy of the value it sees in ``store``."""

    def record(value: torch.Tensor) -> None:
        store[:] = [value.detach().clone()]

    return record


def _replacer(store: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook function that replaces the value by a copy of the one in ``store`` (a copy, so that a model that
    updates it in place never changes the stored tensor)."""

    def replace(_value: torch.Tensor) -> torch.Tensor:
        return store[0].clone()

    return replace


def _patching_sites(
    model: nn.Module, vectors: SteeringVectors, vector_site: str | None, block: int | None
) -> tuple[str, int, Site, Site]:
    """The vector's site and the block, with their defaults, and that block's attention and MLP sites."""
    depth = vectors.meta.num_layers
    name = vector_site if vector_site is not None else f"layers.{depth - 2}"
    site = _vector_site(vectors.check_model(model), name)
    block = block if block is not None else site.layer + 1
    if not site.layer < block < depth:
        raise UserError(
            f"block must come after the vector's layer {site.layer} and be < {depth}, got {block}"
        )
    sites = model_sites(model)
    attn, mlp = sites.get(f"layers.{block}.attn"), sites.get(f"layers.{block}.mlp")
    if attn is None or mlp is None:
        raise UserError(f"block {block} has no attention or no MLP site; path patching needs both")
    return name, block, attn, mlp


def _patching_runs(
    model: nn.Module,
    vectors: SteeringVectors,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    name: str,
    attn: Site,
    mlp: Site,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(run, float32 logits) for ``vanilla``, ``none``, ``both``, ``mlp``, ``residual``, one forward pass each
    (in this order: each patch uses what an earlier run recorded). No hook is in place between runs."""
    steer = vectors.only(name)
    a_v: list[torch.Tensor] = []
    mlp_in_steered: list[torch.Tensor] = []
    mlp_in_both: list[torch.Tensor] = []

    def run(*contexts: AbstractContextManager[Any]) -> torch.Tensor:
        with ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            return _logits(model, input_ids, attention_mask)

    def mlp_input(fn: Callable[[torch.Tensor], torch.Tensor | None]) -> AbstractContextManager[None]:
        return _module_input(model, mlp.module_path, fn)

    yield "vanilla", run(hooks(model, {attn: _recorder(a_v)}))
    yield "none", run(steer.applied(model), mlp_input(_recorder(mlp_in_steered)))
    yield (
        "both",
        run(steer.applied(model), splice(model, {attn: _replacer(a_v)}), mlp_input(_recorder(mlp_in_both))),
    )
    yield "mlp", run(steer.applied(model), mlp_input(_replacer(mlp_in_both)))
    yield (
        "residual",
        run(
            steer.applied(model), splice(model, {attn: _replacer(a_v)}), mlp_input(_replacer(mlp_in_steered))
        ),
    )


@torch.no_grad()
def path_patching_logits(
    model: nn.Module,
    vectors: SteeringVectors,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vector_site: str | None = None,
    block: int | None = None,
) -> dict[str, torch.Tensor]:
    """The float32 logits [B, T, V] of the ``vanilla`` run and of each of the :data:`VARIANTS` (module
    docstring), all held at once; the defaults are those of :func:`path_patching`."""
    name, _, attn, mlp = _patching_sites(model, vectors, vector_site, block)
    input_ids, attention_mask = _batch(model, input_ids, attention_mask)
    return dict(_patching_runs(model, vectors, input_ids, attention_mask, name, attn, mlp))


@torch.no_grad()
def path_patching(
    model: nn.Module,
    vectors: SteeringVectors,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vector_site: str | None = None,
    block: int | None = None,
) -> PathPatching:
    """Route block ``block``'s vanilla attention output into its MLP only, the residual stream only, or both,
    with the vector at ``vector_site`` on (defaults: ``layers.{L−2}`` and the block after it), and score each
    run by KL(vanilla ‖ run) per token (module docstring). Holds one run's logits at a time beside vanilla's."""
    name, block, attn, mlp = _patching_sites(model, vectors, vector_site, block)
    input_ids, attention_mask = _batch(model, input_ids, attention_mask)
    real_BT = attention_mask.bool()
    runs = _patching_runs(model, vectors, input_ids, attention_mask, name, attn, mlp)
    _, vanilla_BTV = next(runs)
    logp_vanilla_BTV = vanilla_BTV.log_softmax(-1)
    del vanilla_BTV
    weight_BT = real_BT.float()
    per_position_T = weight_BT.sum(dim=0)
    positions_T = per_position_T > 0
    mean_kl, curves = {}, {}
    for variant, logits_BTV in runs:
        kl_BT = torch.nn.functional.kl_div(
            logits_BTV.log_softmax(-1), logp_vanilla_BTV, reduction="none", log_target=True
        ).sum(-1)
        kl_BT = kl_BT.masked_fill(~real_BT, 0.0)
        mean_kl[variant] = float(kl_BT.sum() / weight_BT.sum())
        curves[variant] = (kl_BT.sum(dim=0)[positions_T] / per_position_T[positions_T]).tolist()
        del logits_BTV
    none = mean_kl["none"]
    return PathPatching(
        vector_site=name,
        block=block,
        variants=list(VARIANTS),
        mean_kl={v: mean_kl[v] for v in VARIANTS},
        positions=positions_T.nonzero().flatten().tolist(),
        kl_by_position={v: curves[v] for v in VARIANTS},
        fraction_removed={v: 1.0 - mean_kl[v] / none if none > 0 else None for v in VARIANTS[1:]},
    )
