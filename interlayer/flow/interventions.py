"""Feature interventions for feature flow (arXiv:2502.03032): rescaling a feature at its site, and steering the
residual stream along feature directions spread over layers.

The math, with h [batch, tokens, d] the value at a site:

- **Rescaling** feature f of the SAE at a site by r: h ← h + (r − 1)·a·v, where a = ``sae.encode(h)[..., f]`` is
  the feature's activation at each token and v = ``sae.W_dec_FD[f]`` its raw decoder row, so that a·v is the
  feature's contribution to the SAE's reconstruction. r = 0 removes that contribution (deactivation), r = 2
  doubles it, and r = 1 leaves h unchanged exactly (no hook is registered).
- **Steering** with strength s along feature f: h ← h + s·v̂ at every token (special tokens included), with
  v̂ = W_dec[f] / ‖W_dec[f]‖ the unit decoder direction. Several terms at one site add up.
- **Schedules** spread a strength s over the layers l_start..l_end of the steered features
  (:func:`layer_strengths`): ``constant`` s_l = s; ``linear`` s_l = s + (e − s)·(l − l_start)/(l_end − l_start),
  from s at l_start to e = ``end_strength`` (1 by default) at l_end, and s for a single layer; ``exponential``
  s_l = s·exp(α·(l − l_start)), α = −0.05 by default. With ``total=True`` the s_l are multiplied by
  s / Σ_l s_l so that they sum to s, which compares single- and multi-layer steering at equal total strength.

Interventions are site hooks (:func:`interlayer.sites.hooks`), so they act in every forward pass run inside
their ``with`` block, and are removed on exit, also when the block raises. Inside ``model.generate(...)``
with the KV cache, the prefill pass runs the hooks on the whole prompt, so the prompt's cached keys and
values are those of the steered (or rescaled) prompt, and every later step runs them on the new token only.
Both interventions act on each token independently, so this is exactly what a full forward of the whole
sequence at every step would compute: the prompt is steered once, during prefill, and each generated token
as it is produced.

>>> terms = steering_terms(saes, [("layers.2", 7), ("layers.3", 11)], strength=8.0, schedule="linear")
>>> with steer(model, terms):
...     out = model.generate(input_ids, max_new_tokens=20, do_sample=False)
>>> with rescale(model, saes["layers.2"], "layers.2", 7, 0.0):  # deactivate layers.2:7
...     logits = model(input_ids).logits
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.flow.graph import site_layer
from interlayer.sae import SparseAutoencoder
from interlayer.sites import Site, hooks, model_sites

SCHEDULES = ("constant", "linear", "exponential")
"""How :func:`layer_strengths` spreads a strength over layers."""


@dataclass(frozen=True)
class SteeringTerm:
    """One vector s·v̂ added at every token of a site."""

    site: str
    """The site it is added at (``layers.3``, ``layers.3.mlp``, ``layers.3.attn``, ``embed``)."""
    direction_D: torch.Tensor
    """The direction v̂ [d] (unit norm when it comes from :func:`feature_direction`); moved to the site's
    device and dtype when added."""
    strength: float
    """The factor s."""


def layer_strengths(
    strength: float,
    layers: Sequence[int],
    schedule: str = "constant",
    alpha: float = -0.05,
    end_strength: float = 1.0,
    total: bool = False,
) -> list[float]:
    """The strength s_l of each of ``layers`` (in order from l_start = ``layers[0]`` up to l_end =
    ``layers[-1]``; a layer may repeat) under ``schedule``, with the formulas of the module docstring.
    ``alpha`` is the exponential's rate, ``end_strength`` the linear schedule's value at l_end, and ``total``
    rescales the s_l to sum to ``strength``."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if not layers:
        raise UserError("no layers to spread the strength over")
    if any(b < a for a, b in zip(layers, layers[1:], strict=False)):
        raise UserError(f"the layers must go up from l_start to l_end, got {list(layers)}")
    start, end = layers[0], layers[-1]
    if schedule == "constant":
        raw = [strength for _ in layers]
    elif schedule == "linear":
        span = (end - start) or 1  # a single layer is l_start, where s_l = s
        raw = [strength + (end_strength - strength) * (layer - start) / span for layer in layers]
    else:
        raw = [strength * math.exp(alpha * (layer - start)) for layer in layers]
    return _to_total(raw, strength) if total else raw


def _to_total(raw: list[float], strength: float) -> list[float]:
    """``raw`` multiplied by strength / Σ raw, so that it sums to ``strength``."""
    raw_sum = math.fsum(raw)
    if raw_sum == strength:
        return raw
    if raw_sum == 0:
        raise UserError(f"the layer strengths {raw} sum to 0 and cannot be rescaled to a total of {strength}")
    return [s * strength / raw_sum for s in raw]


def _check_feature(sae: SparseAutoencoder, feature: int, site: str) -> None:
    latents = sae.cfg.latents
    if not 0 <= feature < latents:
        where = f"the SAE at {site}" if site else "the SAE"
        raise UserError(f"feature {feature} is out of range for {where} (it has {latents} features)")


def feature_direction(sae: SparseAutoencoder, feature: int, site: str | None = None) -> torch.Tensor:
    """v̂ = W_dec[f] / ‖W_dec[f]‖ [d], detached, in the SAE's dtype and on its device. ``site`` names the SAE
    in the error for an index out of [0, F) (default: ``sae.cfg.site``)."""
    _check_feature(sae, feature, sae.cfg.site if site is None else site)
    row_D = sae.W_dec_FD[feature].detach()
    return row_D / row_D.norm().clamp_min(1e-12)


def steering_terms(
    saes_by_site: Mapping[str, SparseAutoencoder],
    features: Sequence[tuple[str, int]],
    strength: float,
    schedule: str = "constant",
    alpha: float = -0.05,
    end_strength: float = 1.0,
    total: bool = False,
) -> list[SteeringTerm]:
    """One :class:`SteeringTerm` per (site, feature) of ``features`` (e.g. the residual chain of a flow graph,
    in layer order), along the feature's unit decoder direction in the SAE of its site, with ``strength``
    spread over the features' layers by :func:`layer_strengths`."""
    for site, _ in features:
        if site not in saes_by_site:
            raise UserError(f"no SAE for site {site}; there are SAEs for: {', '.join(saes_by_site)}")
    layers = [site_layer(site)[0] for site, _ in features]
    strengths = layer_strengths(strength, layers, schedule, alpha, end_strength, total)
    return [
        SteeringTerm(site, feature_direction(saes_by_site[site], feature, site), s)
        for (site, feature), s in zip(features, strengths, strict=True)
    ]


def _site(model: nn.Module, name: str) -> Site:
    """The site of ``model`` named exactly ``name`` (no globs)."""
    sites = model_sites(model)
    if name not in sites:
        raise UserError(f"unknown site {name!r}; valid sites: {', '.join(sites)}")
    return sites[name]


def _add(delta_D: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A site function returning value + delta (delta moved to the value's device and dtype)."""

    def add(value_BTD: torch.Tensor) -> torch.Tensor:
        return value_BTD + delta_D.to(device=value_BTD.device, dtype=value_BTD.dtype)

    return add


@contextmanager
def steer(model: nn.Module, terms: Sequence[SteeringTerm]) -> Iterator[None]:
    """Add s·v̂ at every token of each term's site in the forward passes (and ``generate`` steps) run inside the
    block; the terms of one site are summed first. Hooks are removed on exit, also on error."""
    deltas: dict[Site, torch.Tensor] = {}
    for term in terms:
        site = _site(model, term.site)
        if tuple(term.direction_D.shape) != (site.width,):
            raise UserError(
                f"the steering direction for {site.name} has shape {tuple(term.direction_D.shape)}, "
                f"but the site has width {site.width}"
            )
        vector_D = term.strength * term.direction_D.detach()
        deltas[site] = deltas[site] + vector_D if site in deltas else vector_D
    with hooks(model, {site: _add(delta_D) for site, delta_D in deltas.items()}):
        yield


def _rescaled(sae: SparseAutoencoder, feature: int, r: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A site function h ↦ h + (r − 1)·a·v, with a = sae.encode(h)[..., f] and v = W_dec[f]."""

    def rescale_fn(h_BTD: torch.Tensor) -> torch.Tensor:
        a_BT = sae.encode(h_BTD)[..., feature]
        v_D = sae.W_dec_FD[feature].to(device=h_BTD.device, dtype=h_BTD.dtype)
        return h_BTD + (r - 1) * a_BT.unsqueeze(-1) * v_D

    return rescale_fn


@contextmanager
def rescale(model: nn.Module, sae: SparseAutoencoder, site: str, feature: int, r: float) -> Iterator[None]:
    """Multiply feature ``feature`` of ``sae``'s contribution at ``site`` by ``r`` (h ← h + (r − 1)·a·v at every
    token) in the forward passes run inside the block; r = 0 deactivates it, r = 1 hooks nothing. Hooks are
    removed on exit, also on error."""
    target = _site(model, site)
    _check_feature(sae, feature, site)
    if sae.cfg.d_in != target.width:
        raise UserError(f"the SAE reads width {sae.cfg.d_in} but {site} has width {target.width}")
    with hooks(model, {} if r == 1 else {target: _rescaled(sae, feature, r)}):
        yield
