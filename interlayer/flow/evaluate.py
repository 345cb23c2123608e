"""Evaluations of SAE Match on real tokens: the matching score and layer skipping (arXiv:2410.07656).

Matching score. On N tokens with codes z^A at site A and z^B at site B (the same tokens), for every feature i
of A that fires on at least ``min_fires`` tokens,

    score_i = #{t : z^A_ti > 0 and z^B_t,π(i) > 0} / #{t : z^A_ti > 0},

the fraction of i's firings on which its match fires too; the reported score is the mean over those features,
beside the same mean for a uniformly random permutation (the chance level).

Layer skipping (residual sites t and t+1). The hidden state after block t+1 is replaced, at kept tokens, by an
approximation computed from the hidden state h_t after block t, and the forward continues from block t+2:

    permuted     ĥ = W_dec^Bᵀ z̃ + b_dec^B,  z̃_π(i) = z^A_i(h_t) · θ^B_π(i) / θ^A_i
                 (encode at t, permute, decode with t+1's decoder; θ the folding scales, 1 without folding)
    drop_layer   ĥ = h_t                     (block t+1 removed; in a residual stream this is also "reuse the
                                              previous hidden state", so the two baselines coincide)
    sae_at_t     ĥ = SAE_A(h_t)              (the SAE of layer t reconstructing its own input: what the
                                              permutation adds on top of a lossy encode–decode)

Each is scored by EV = 1 − Σ‖h_{t+1} − ĥ‖² / Σ‖h_{t+1} − h̄_{t+1}‖² over kept tokens (pooled), and downstream
by ΔCE = CE − CE_clean (causal LMs, next-token CE at kept targets) or by the mean cosine of the pooled output
with the clean one (encoders; masked mean pooling), as in :mod:`interlayer.sae.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from interlayer.data import iter_documents, token_batches
from interlayer.errors import UserError
from interlayer.flow.graph import site_layer
from interlayer.flow.match import FeatureMatch, random_match
from interlayer.models import LoadedModel
from interlayer.sae import SparseAutoencoder
from interlayer.sae.metrics import cosine_sum, next_token_ce_sum, pooled_embedding
from interlayer.sites import Site, capture, hooks, replace_kept, resolve_sites


@dataclass(frozen=True)
class TokenBatch:
    """One model batch and the bool mask of its kept (non-special) tokens."""

    inputs: dict[str, torch.Tensor]
    keep_BT: torch.Tensor


def model_batches(
    lm: LoadedModel,
    data: str,
    tokens: int,
    context_len: int = 128,
    batch_size: int = 16,
    split: str = "validation",
) -> Iterator[TokenBatch]:
    """Batches of ``data``'s ``split`` until about ``tokens`` kept tokens have been given."""
    seen = 0
    for batch in token_batches(lm.tokenizer, iter_documents(data, split=split), context_len, batch_size):
        inputs = {
            "input_ids": batch.input_ids_BT.to(lm.device),
            "attention_mask": batch.attention_mask_BT.to(lm.device),
        }
        yield TokenBatch(inputs, batch.keep_BT.to(lm.device))
        seen += int(batch.keep_BT.sum())
        if seen >= tokens:
            return


@torch.no_grad()
def site_activations(
    lm: LoadedModel,
    sites: Sequence[str],
    data: str,
    tokens: int,
    context_len: int = 128,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Activations [N, d] at each site on the same N kept tokens of ``data``'s validation split."""
    resolved = resolve_sites(lm.model, list(sites))
    parts: dict[str, list[torch.Tensor]] = {site.name: [] for site in resolved}
    for batch in model_batches(lm, data, tokens, context_len, batch_size):
        with capture(lm.model, resolved) as acts:
            lm.model(**batch.inputs)
        for name in parts:
            parts[name].append(acts[name][batch.keep_BT].float().cpu())
    if not next(iter(parts.values()), []):
        raise UserError(f"data {data} gave no validation tokens")
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


@torch.no_grad()
def fire_masks(sae: SparseAutoencoder, x_ND: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Bool [N, F]: z_tf > 0."""
    return torch.cat([sae.encode(x_ND[s : s + batch_size]) > 0 for s in range(0, x_ND.shape[0], batch_size)])


def co_firing(
    fires_a_NF: torch.Tensor, fires_b_NF: torch.Tensor, permutation: torch.Tensor, min_fires: int
) -> float:
    """Mean over features i of A firing ≥ ``min_fires`` times of P(B's π(i) fires | A's i fires); NaN if none."""
    count_F = fires_a_NF.sum(0)
    both_F = (fires_a_NF & fires_b_NF[:, permutation]).sum(0)
    scored_F = count_F >= min_fires
    if not bool(scored_F.any()):
        return float("nan")
    return float((both_F[scored_F].double() / count_F[scored_F]).mean())


@torch.no_grad()
def matching_score(
    sae_a: SparseAutoencoder,
    sae_b: SparseAutoencoder,
    match: FeatureMatch,
    x_a_ND: torch.Tensor,
    x_b_ND: torch.Tensor,
    min_fires: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """The matching score of ``match`` and of a random permutation on the same tokens (module docstring)."""
    if x_a_ND.shape[0] != x_b_ND.shape[0]:
        raise UserError(
            f"the two sites' activations cover different tokens ({x_a_ND.shape[0]} and {x_b_ND.shape[0]})"
        )
    return scores_from_fires(fire_masks(sae_a, x_a_ND), fire_masks(sae_b, x_b_ND), match, min_fires, seed)


def scores_from_fires(
    fires_a: torch.Tensor, fires_b: torch.Tensor, match: FeatureMatch, min_fires: int = 5, seed: int = 0
) -> dict[str, float]:
    """:func:`matching_score` from the firing masks [N, F] of the two SAEs (computed once per site when
    many permutations are scored on the same tokens)."""
    return {
        "matching_score": co_firing(fires_a, fires_b, match.permutation, min_fires),
        "random_score": co_firing(fires_a, fires_b, random_match(match, seed).permutation, min_fires),
        "features_scored": float(int((fires_a.sum(0) >= min_fires).sum())),
    }


def transfer_codes(z_a_NF: torch.Tensor, permutation: torch.Tensor, ratio_F: torch.Tensor) -> torch.Tensor:
    """z̃ with z̃[:, π(i)] = z^A[:, i] · ratio_i (ratio_i = θ^B_π(i) / θ^A_i)."""
    z_b_NF = torch.zeros_like(z_a_NF)
    z_b_NF[:, permutation.to(z_a_NF.device)] = z_a_NF * ratio_F.to(z_a_NF)
    return z_b_NF


def skip_functions(
    sae_a: SparseAutoencoder, sae_b: SparseAutoencoder, match: FeatureMatch, ratio_F: torch.Tensor
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each variant of layer skipping (``permuted``, ``drop_layer``, ``sae_at_t``) as a map h_t [n, d] →
    ĥ_{t+1} [n, d]."""
    return {
        "permuted": lambda h: sae_b.decode(transfer_codes(sae_a.encode(h), match.permutation, ratio_F)),
        "drop_layer": lambda h: h,
        "sae_at_t": lambda h: sae_a(h),
    }


class _Pooled:
    """Σ‖h − ĥ‖², Σ‖h‖², Σh, n: the pieces of the pooled EV, in float64."""

    def __init__(self) -> None:
        self.err = self.sq = 0.0
        self.sum_D: torch.Tensor | None = None
        self.n = 0

    def update(self, h_ND: torch.Tensor, h_hat_ND: torch.Tensor) -> None:
        h, h_hat = h_ND.double(), h_hat_ND.double()
        self.err += float((h - h_hat).pow(2).sum())
        self.sq += float(h.pow(2).sum())
        self.sum_D = h.sum(0) if self.sum_D is None else self.sum_D + h.sum(0)
        self.n += h.shape[0]

    def ev(self) -> float:
        assert self.sum_D is not None
        return 1 - self.err / (self.sq - float(self.sum_D.pow(2).sum()) / self.n)


@torch.no_grad()
def layer_skipping(
    lm: LoadedModel,
    sae_a: SparseAutoencoder,
    sae_b: SparseAutoencoder,
    match: FeatureMatch,
    batches: Sequence[TokenBatch],
    ratio_F: torch.Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Variant → {"ev", and "delta_ce" (causal LMs) or "pooled_cosine" (encoders)} for replacing the hidden
    state after block t+1 (SAE B's site) by each variant computed from block t's (SAE A's site)."""
    site_a, site_b = _consecutive_residual_sites(lm, sae_a.cfg.site, sae_b.cfg.site)
    ratio_F = torch.ones(sae_a.cfg.latents) if ratio_F is None else ratio_F
    functions = skip_functions(sae_a, sae_b, match, ratio_F)
    pooled = {name: _Pooled() for name in functions}
    downstream = {name: 0.0 for name in functions}
    clean_total, count = 0.0, 0
    for batch in batches:
        with capture(lm.model, [site_b]) as acts:
            clean = _output(lm, lm.model(**batch.inputs))
        h_true_ND = acts[site_b.name][batch.keep_BT].float()
        if lm.is_causal_lm:
            ce, targets = next_token_ce_sum(clean, batch.inputs["input_ids"], batch.keep_BT)
            clean_total, count = clean_total + ce, count + targets
        else:
            u_clean = pooled_embedding(clean, batch.inputs["attention_mask"])
            count += clean.shape[0]
        for name, fn in functions.items():
            out, h_hat_ND = _skipped_forward(lm, batch, site_a, site_b, fn)
            pooled[name].update(h_true_ND, h_hat_ND)
            if lm.is_causal_lm:
                downstream[name] += next_token_ce_sum(out, batch.inputs["input_ids"], batch.keep_BT)[0]
            else:
                downstream[name] += cosine_sum(u_clean, pooled_embedding(out, batch.inputs["attention_mask"]))
    if count == 0:
        raise UserError("layer skipping got no tokens to evaluate")
    key = "delta_ce" if lm.is_causal_lm else "pooled_cosine"
    offset = clean_total / count if lm.is_causal_lm else 0.0
    return {name: {"ev": pooled[name].ev(), key: downstream[name] / count - offset} for name in functions}


def _skipped_forward(
    lm: LoadedModel, batch: TokenBatch, site_a: Site, site_b: Site, fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward with site B's kept tokens replaced by ``fn`` of site A's value; (output, ĥ at kept tokens)."""
    recorded: dict[str, torch.Tensor] = {}
    made: list[torch.Tensor] = []

    def record(h_BTD: torch.Tensor) -> None:
        recorded["h"] = h_BTD.detach().clone()

    def replacement(_kept_ND: torch.Tensor) -> torch.Tensor:
        h_hat_ND = fn(recorded["h"][batch.keep_BT].float())
        made.append(h_hat_ND)
        return h_hat_ND

    with hooks(lm.model, {site_a: record, site_b: replace_kept(batch.keep_BT, replacement)}):
        out = _output(lm, lm.model(**batch.inputs))
    return out, made[0]


def _consecutive_residual_sites(lm: LoadedModel, a: str, b: str) -> tuple[Site, Site]:
    sites = {s.name: s for s in resolve_sites(lm.model, [a, b])}
    site_a, site_b = sites[a], sites[b]
    if not (a.count(".") == b.count(".") == 1 and site_b.layer == site_a.layer + 1) and not (
        a == "embed" and b == "layers.0"
    ):
        raise UserError(
            f"layer skipping needs consecutive residual sites (layers.t, layers.t+1); got {a} and {b}"
        )
    return site_a, site_b


def _output(lm: LoadedModel, out: object) -> torch.Tensor:
    return out.logits if lm.is_causal_lm else out.last_hidden_state  # type: ignore[attr-defined]


def scale_ratio(scale_a_F: torch.Tensor, scale_b_F: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """ratio_i = θ^B_π(i) / θ^A_i, for :func:`transfer_codes`."""
    return scale_b_F.cpu()[permutation] / scale_a_F.cpu()


def consecutive_pairs(sites: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of sites of the same kind (residual, attn, mlp) in consecutive layers, in layer order."""
    by_kind: dict[str, list[tuple[int, str]]] = {}
    for site in sites:
        layer, kind = site_layer(site)
        by_kind.setdefault(kind, []).append((layer, site))
    pairs = []
    for kind in ("residual", "attn", "mlp"):
        ordered = sorted(by_kind.get(kind, []))
        pairs += [(a, b) for (la, a), (lb, b) in zip(ordered, ordered[1:], strict=False) if lb == la + 1]
    return pairs
