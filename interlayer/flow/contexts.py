"""Feature cards for chosen features of several SAEs: frequency, mean activation and top contexts, from one
pass over held-out text (what a flow graph's nodes show)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from interlayer.data import display_tokens
from interlayer.flow.evaluate import model_batches
from interlayer.models import LoadedModel
from interlayer.report import ContextExample, FeatureCard
from interlayer.sae import SparseAutoencoder
from interlayer.sae.features import TopContexts
from interlayer.sites import capture, resolve_sites


@torch.no_grad()
def feature_cards(
    lm: LoadedModel,
    saes: Mapping[str, SparseAutoencoder],
    features: Sequence[tuple[str, int]],
    data: str,
    tokens: int = 8_000,
    context_len: int = 64,
    batch_size: int = 16,
    examples: int = 4,
    window: tuple[int, int] = (10, 4),
) -> dict[tuple[str, int], FeatureCard]:
    """A card per (site, feature): frequency = #{t : z_f > 0} / N and mean activation over those tokens on
    about ``tokens`` kept validation tokens, and the ``examples`` top contexts (``window`` tokens before and
    after the activating one)."""
    wanted: dict[str, list[int]] = {}
    for site, feature in features:
        wanted.setdefault(site, [])
        if feature not in wanted[site]:
            wanted[site].append(feature)
    sites = resolve_sites(lm.model, list(wanted))
    top = {site: TopContexts(len(fs), examples) for site, fs in wanted.items()}
    fires = {site: torch.zeros(len(fs)) for site, fs in wanted.items()}
    sums = {site: torch.zeros(len(fs), dtype=torch.float64) for site, fs in wanted.items()}
    contexts: list[torch.Tensor] = []
    n_tokens = 0
    for batch in model_batches(lm, data, tokens, context_len, batch_size):
        with capture(lm.model, sites) as acts:
            lm.model(**batch.inputs)
        where_M2 = batch.keep_BT.nonzero().cpu()
        where_M2[:, 0] += sum(c.shape[0] for c in contexts)
        for site, fs in wanted.items():
            z_MF = saes[site].encode(acts[site][batch.keep_BT].float())[:, fs].cpu()
            top[site].update(z_MF, where_M2)
            fires[site] += (z_MF > 0).sum(0)
            sums[site] += z_MF.clamp_min(0).sum(0).double()
        contexts.append(batch.inputs["input_ids"].cpu())
        n_tokens += int(batch.keep_BT.sum())
    ids_CT = torch.cat(contexts)
    cards = {}
    before, after = window
    for site, fs in wanted.items():
        for j, feature in enumerate(fs):
            shown = []
            for value, context, position in top[site].examples(j):
                lo = max(0, position - before)
                ids = ids_CT[context, lo : position + after + 1].tolist()
                shown.append(ContextExample(display_tokens(lm.tokenizer, ids), position - lo, value))
            count = float(fires[site][j])
            cards[(site, feature)] = FeatureCard(
                site, feature, count / max(n_tokens, 1), float(sums[site][j]) / max(count, 1.0), tuple(shown)
            )
    return cards
