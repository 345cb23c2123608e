"""Evaluate SAEs on held-out text: reconstruction, downstream effect of splicing, top contexts per latent.

One clean forward pass per batch serves every SAE; each SAE then costs one zero-ablated pass and one spliced
pass per budget k asked for.
The formulas are in :mod:`interlayer.sae.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from interlayer.activations import check_outlier_norm, inlier_mask
from interlayer.data import iter_documents, token_batches
from interlayer.errors import UserError
from interlayer.models import LoadedModel
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.features import TopContexts
from interlayer.sae.metrics import (
    ReconstructionMetrics,
    cosine_sum,
    kl_sum,
    next_token_ce_sum,
    pooled_embedding,
)
from interlayer.sites import Site, capture, replace_kept, resolve_sites, splice


@dataclass
class SiteEvaluation:
    """Everything measured for the SAE at one site."""

    reconstruction: ReconstructionMetrics
    contexts: TopContexts
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value


@dataclass
class Evaluation:
    """The result of :func:`evaluate_saes`: per-site metrics and the evaluated token ids (for contexts)."""

    sites: dict[str, SiteEvaluation]
    input_ids_CT: torch.Tensor
    is_causal_lm: bool

    def metrics(self, site: str) -> dict[str, float]:
        ev = self.sites[site]
        out: dict[str, float] = dict(ev.reconstruction.result())
        s = ev.sums
        if self.is_causal_lm:
            n = s["targets"]
            clean, sae, zero = s["ce_clean"] / n, s["ce_sae"] / n, s["ce_zero"] / n
            out |= {
                "ce_clean": clean,
                "ce_sae": sae,
                "ce_zero": zero,
                "delta_ce": sae - clean,
                "frac_recovered": (zero - sae) / (zero - clean) if zero != clean else float("nan"),
                "kl_clean_sae": s["kl"] / n,
            }
        else:
            out |= {
                "pooled_cosine_sae": s["cos_sae"] / s["contexts"],
                "pooled_cosine_zero": s["cos_zero"] / s["contexts"],
            }
        return out


def check_sae_fits(sae: SparseAutoencoder, site: Site, source: str) -> None:
    if sae.cfg.d_in != site.width:
        raise UserError(
            f"SAE {source} has d_in {sae.cfg.d_in} but site {site.name} has width {site.width}; wrong model or site"
        )


@torch.no_grad()
def evaluate_saes(
    lm: LoadedModel,
    saes: Mapping[str, SparseAutoencoder],
    data: str,
    tokens: int,
    context_len: int = 128,
    batch_size: int = 16,
    split: str = "validation",
    on_batch: Callable[[int], None] | None = None,
    outlier_norm: float = 0.0,
    k: int | None = None,
) -> Evaluation:
    """Evaluate each SAE (keyed by site name) on about ``tokens`` kept tokens of ``data``'s ``split``.

    With ``outlier_norm`` > 0, tokens whose norm at a site exceeds that multiple of the median norm of the
    batch's kept tokens there are left out of that SAE's reconstruction metrics and are not spliced (CE and
    KL still cover every kept target, as the clean model sees it). With ``k``, every SAE keeps its top k
    latents per token (architectures with a k; see :meth:`SparseAutoencoder.check_k`). The SAE's own forward
    (:meth:`SparseAutoencoder.reconstruct`) gives both x̂ and the codes.
    """
    return evaluate_at_budgets(
        lm, saes, data, tokens, [k], context_len, batch_size, split, on_batch, outlier_norm
    )[k]


@torch.no_grad()
def evaluate_at_budgets(
    lm: LoadedModel,
    saes: Mapping[str, SparseAutoencoder],
    data: str,
    tokens: int,
    ks: Sequence[int | None],
    context_len: int = 128,
    batch_size: int = 16,
    split: str = "validation",
    on_batch: Callable[[int], None] | None = None,
    outlier_norm: float = 0.0,
) -> dict[int | None, Evaluation]:
    """:func:`evaluate_saes` at each budget of ``ks`` (None: the SAE's own), on the same tokens: the clean and
    the zero-ablated forward passes run once per batch (per site) for all budgets, the spliced one per budget."""
    check_outlier_norm(outlier_norm)
    ks = list(dict.fromkeys(ks))  # a budget asked for twice is evaluated once
    sites = {site.name: site for site in resolve_sites(lm.model, list(saes))}
    for name, sae in saes.items():
        check_sae_fits(sae, sites[name], name)
        for k in ks:
            sae.check_k(k)
    results = {
        k: {
            name: SiteEvaluation(ReconstructionMetrics(sae.cfg.latents), TopContexts(sae.cfg.latents))
            for name, sae in saes.items()
        }
        for k in ks
    }
    contexts: list[torch.Tensor] = []
    seen = n_contexts = 0
    for batch in token_batches(lm.tokenizer, iter_documents(data, split=split), context_len, batch_size):
        inputs = {
            "input_ids": batch.input_ids_BT.to(lm.device),
            "attention_mask": batch.attention_mask_BT.to(lm.device),
        }
        keep_BT = batch.keep_BT.to(lm.device)
        with capture(lm.model, list(sites.values())) as acts:
            clean = _output(lm, lm.model(**inputs))
        where_M2 = keep_BT.nonzero().cpu()
        where_M2[:, 0] += n_contexts
        downstream = _downstream(lm, clean, inputs, keep_BT)
        for name, sae in saes.items():
            kept_MD = acts[name][keep_BT].float()
            inlier_M = inlier_mask(kept_MD, outlier_norm)
            site_keep_BT = keep_BT.clone()
            site_keep_BT[keep_BT] = inlier_M
            x_MD = kept_MD[inlier_M]
            with splice(lm.model, {sites[name]: replace_kept(site_keep_BT, torch.zeros_like)}):
                zeroed = _output(lm, lm.model(**inputs))
            for k in ks:
                result = results[k][name]
                x_hat_MD, z_MF = sae.reconstruct(x_MD, k)
                result.reconstruction.update(x_MD, x_hat_MD, z_MF)
                result.contexts.update(z_MF, where_M2[inlier_M.cpu()])
                with splice(lm.model, {sites[name]: replace_kept(site_keep_BT, partial(sae, k=k))}):
                    spliced = _output(lm, lm.model(**inputs))
                for key, value in downstream(spliced, zeroed).items():
                    result.add(key, value)
        contexts.append(batch.input_ids_BT)
        n_contexts += batch.input_ids_BT.shape[0]
        seen += int(batch.keep_BT.sum())
        if on_batch is not None:
            on_batch(int(batch.keep_BT.sum()))
        if seen >= tokens:
            break
    if not contexts:
        raise UserError(f"data {data} gave no evaluation tokens in split {split!r}")
    ids_CT = torch.cat(contexts)
    return {k: Evaluation(results[k], ids_CT, lm.is_causal_lm) for k in ks}


def _downstream(
    lm: LoadedModel, clean: torch.Tensor, inputs: dict[str, torch.Tensor], keep_BT: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], dict[str, float]]:
    """The per-batch sums of the downstream metrics of a (spliced, zeroed) pair of outputs against ``clean``."""
    if lm.is_causal_lm:
        ce_clean, count = next_token_ce_sum(clean, inputs["input_ids"], keep_BT)

        def causal(spliced: torch.Tensor, zeroed: torch.Tensor) -> dict[str, float]:
            return {
                "ce_clean": ce_clean,
                "ce_sae": next_token_ce_sum(spliced, inputs["input_ids"], keep_BT)[0],
                "ce_zero": next_token_ce_sum(zeroed, inputs["input_ids"], keep_BT)[0],
                "targets": count,
                "kl": kl_sum(clean, spliced, keep_BT),
            }

        return causal
    mask = inputs["attention_mask"]
    u_clean = pooled_embedding(clean, mask)

    def encoder(spliced: torch.Tensor, zeroed: torch.Tensor) -> dict[str, float]:
        return {
            "cos_sae": cosine_sum(u_clean, pooled_embedding(spliced, mask)),
            "cos_zero": cosine_sum(u_clean, pooled_embedding(zeroed, mask)),
            "contexts": clean.shape[0],
        }

    return encoder


def _output(lm: LoadedModel, out: object) -> torch.Tensor:
    """Logits of a causal LM, else the last hidden state."""
    return out.logits if lm.is_causal_lm else out.last_hidden_state  # type: ignore[attr-defined]


@torch.no_grad()
def reconstruction_sweep(
    sae: SparseAutoencoder, x_ND: torch.Tensor, ks: list[int]
) -> list[tuple[float, float]]:
    """(L0, pooled EV) of ``sae`` keeping its top k latents, for each k in ``ks``, on the activations ``x_ND``."""
    points = []
    for k in ks:
        metrics = ReconstructionMetrics(sae.cfg.latents)
        x_hat, z = sae.reconstruct(x_ND, k)
        metrics.update(x_ND, x_hat, z)
        result = metrics.result()
        points.append((result["l0"], result["explained_variance"]))
    return points
