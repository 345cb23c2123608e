"""LIMe's analyses: the entropy of the values each layer attends over, and what its routers read.

**Matrix-based Rényi entropy** of a value matrix Z ∈ R^{T × C} (one context's T tokens, C = R·d_head: every
kv-head's value vector of a token side by side, as the layer's attention reads them, i.e. after LIMe's mix).
With the Gram matrix G = Z Zᵀ and its eigenvalues λ_1..λ_T normalised to p_i = λ_i / tr(G) (so Σ p_i = 1),

    S_α(Z) = log(Σ_i p_i^α) / (1 − α)        (α ≠ 1),     S_1(Z) = −Σ_i p_i log p_i,

in nats, between 0 (every token's value on one line: collapse) and log(min(T, C)) (values spread evenly over
as many directions as there can be). As in the official analysis (corl-team/lime, ``entropy.py``), each feature
is first z-scored with its mean and standard deviation over all tokens of all contexts, α = 0.5 by default, and
a layer's entropy is the mean over contexts. Higher means less representation collapse (the paper's claim:
LIMe's later layers keep more entropy than Llama's).

**Router reading.** Layer r's router W_r [R, (r+1)·R] gives each source layer m ≤ r the share

    p_r(m) = Σ_{j, i} |W_r[j, m·R + i]| / Σ_{j, n} |W_r[j, n]|,

(layer 0, which has no router, reads itself: p_0(0) = 1), and the expected retrieved layer is
E_r = Σ_m m · p_r(m) (r for a router at the identity). For a dynamic router the shares use the static part
W_r; :func:`dynamic_router_shares` adds the per-token part averaged over tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from interlayer.lime.modeling import LimeForCausalLM, LimeRouter, kv_head_count


def renyi_entropy(values_TC: torch.Tensor, alpha: float = 0.5) -> float:
    """S_α of one value matrix (nats), from the eigenvalues of its normalised Gram matrix (see the module)."""
    if alpha < 0:
        raise ValueError(f"alpha must not be negative, not {alpha}")
    z = values_TC.double()
    gram = z @ z.T
    trace = torch.trace(gram)
    if trace <= 0:
        return 0.0
    p = torch.linalg.eigvalsh(gram / trace).clamp_min(0)
    p = p[p > 0]
    if abs(alpha - 1.0) < 1e-9:
        return float(-(p * p.log()).sum())
    return float(torch.log((p**alpha).sum()) / (1.0 - alpha))


def _cached_values(cache: Any, layer: int) -> torch.Tensor:
    """The value tensor [batch, R, tokens, d_head] a transformers cache holds for ``layer``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].values
    return cache.value_cache[layer]


@torch.no_grad()
def value_entropy_per_layer(
    model: PreTrainedModel,
    contexts_NT: torch.Tensor,
    alpha: float = 0.5,
    batch_size: int = 16,
    standardize: bool = True,
) -> list[float]:
    """Mean S_α of the value matrices each layer attends over, per layer, over the contexts (any decoder whose
    forward fills a KV cache: LIMe caches its mixed values, Llama its plain ones). With ``standardize`` (the
    official analysis) each of the C features is first z-scored with its mean and standard deviation over every
    token of every context, (z − μ)/(σ + 1e-5)."""
    layers = int(model.config.num_hidden_layers)
    values: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # per layer, [batch, tokens, C] pieces
    for lo in range(0, len(contexts_NT), batch_size):
        batch_BT = contexts_NT[lo : lo + batch_size].to(model.device)
        output = model(input_ids=batch_BT, use_cache=True)
        cache = output.cache if "cache" in output else output.past_key_values
        for layer in range(layers):
            values[layer].append(_cached_values(cache, layer).transpose(1, 2).flatten(2).double().cpu())
    entropies = []
    for pieces in values:
        values_NTC = torch.cat(pieces)
        if standardize:
            mean, std = values_NTC.mean(dim=(0, 1)), values_NTC.std(dim=(0, 1))
            values_NTC = (values_NTC - mean) / (std + 1e-5)
        entropies.append(sum(renyi_entropy(z_TC, alpha) for z_TC in values_NTC) / len(values_NTC))
    return entropies


def router_shares(model: LimeForCausalLM) -> torch.Tensor:
    """p_r(m) as an [L, L] matrix (row r, column m; zero above the diagonal; row 0 is [1, 0, ...])."""
    layers = int(model.config.num_hidden_layers)
    kv_heads = kv_head_count(model.config)
    shares_LL = torch.zeros(layers, layers)
    shares_LL[0, 0] = 1.0
    for router in model.routers():
        magnitude = router.weight.detach().abs().float().cpu()
        per_layer = magnitude.view(kv_heads, router.layer_idx + 1, kv_heads).sum(dim=(0, 2))
        shares_LL[router.layer_idx, : router.layer_idx + 1] = per_layer / per_layer.sum()
    return shares_LL


def expected_retrieved_layer(shares_LL: torch.Tensor) -> list[float]:
    """E_r = Σ_m m · p_r(m) for every layer r."""
    return (shares_LL @ torch.arange(shares_LL.shape[1], dtype=shares_LL.dtype)).tolist()


@torch.no_grad()
def dynamic_router_shares(
    model: LimeForCausalLM, contexts_NT: torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """p_r(m) of the full dynamic mix W_r + Δ_r(x_t), with |·| averaged over every token of the contexts."""
    routers = model.routers()
    if any(r.dynamic is None for r in routers):
        raise ValueError("the model's routers are static")
    kv_heads = kv_head_count(model.config)
    sums = {r.layer_idx: torch.zeros(kv_heads, r.sources) for r in routers}
    tokens = 0

    def record(router: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert (
            isinstance(router, LimeRouter) and router.dynamic is not None and router.dynamic_norm is not None
        )
        delta_BTRN = router.dynamic(router.dynamic_norm(args[1])).unflatten(-1, (kv_heads, router.sources))
        sums[router.layer_idx] += (router.weight + delta_BTRN).abs().float().sum(dim=(0, 1)).cpu()

    handles = [router.register_forward_pre_hook(record) for router in routers]
    try:
        for lo in range(0, len(contexts_NT), batch_size):
            batch_BT = contexts_NT[lo : lo + batch_size].to(model.device)
            model(input_ids=batch_BT)
            tokens += batch_BT.numel()
    finally:
        for handle in handles:
            handle.remove()
    layers = int(model.config.num_hidden_layers)
    shares_LL = torch.zeros(layers, layers)
    shares_LL[0, 0] = 1.0
    for layer, total in sums.items():
        per_layer = (total / tokens).view(kv_heads, layer + 1, kv_heads).sum(dim=(0, 2))
        shares_LL[layer, : layer + 1] = per_layer / per_layer.sum()
    return shares_LL
