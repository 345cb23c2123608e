"""Multi-layer flow graphs (arXiv:2502.03032): a feature's ancestors and descendants through the residual
stream, with the MLP and attention features that write into them.

Starting from a root feature of the residual SAE at layer L (``layers.L:f``), with top-1 (or top-k) decoder
cosines (:mod:`interlayer.flow.similarity`) and thresholds τ_R, τ_M:

- backward: the best matches of f in the residual SAE at L−1 with cosine ≥ τ_R become its predecessors, and
  the walk continues from them; below τ_R the graph is cut there (s(R) < 0.5 in the paper);
- forward: the features g of the residual SAE at L+1 whose best matches at L (their predecessors, as the
  classes define them) include f with cosine ≥ τ_R become its successors, and the walk continues from them
  (so f → g exactly when walking back from g would reach f, and a feature that splits finds all its heirs);
- at every residual node of layer l, the best matches in the MLP-output and attention-output SAEs of layer l
  with cosine ≥ τ_M are attached as module nodes (edges module → residual); they are leaves.

A root at a module site (``layers.L.mlp:f``) starts forward: its best matches in the residual SAE at L with
cosine ≥ τ_M, then forward as above. Edges carry the cosine. ``layers_back``/``layers_forward`` bound the walk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from interlayer.errors import UserError
from interlayer.flow.similarity import CLASSES, FlowThresholds, layer_flow, top_cosines
from interlayer.sae import SparseAutoencoder

_RESIDUAL = re.compile(r"layers\.(\d+)")
_MODULE = re.compile(r"layers\.(\d+)\.(mlp|attn)")


@dataclass(frozen=True)
class FlowNode:
    """One feature of one SAE."""

    site: str
    """The SAE's site (``layers.3``, ``layers.3.mlp``, ``layers.3.attn``, ``embed``)."""
    feature: int
    """The feature's index in that SAE."""

    @property
    def id(self) -> str:
        return f"{self.site}:{self.feature}"

    @property
    def layer(self) -> int:
        return site_layer(self.site)[0]

    @property
    def kind(self) -> str:
        return site_layer(self.site)[1]


@dataclass(frozen=True)
class FlowEdge:
    """Feature ``source`` flows into feature ``target`` (node ids), with their decoder cosine."""

    source: str
    target: str
    similarity: float


@dataclass
class FlowGraph:
    """A root feature and the features connected to it across layers."""

    root: str
    """The root's node id."""
    nodes: dict[str, FlowNode] = field(default_factory=dict)
    """Node id → node."""
    edges: list[FlowEdge] = field(default_factory=list)
    """Edges, each from the earlier feature to the later one."""

    def add(self, source: FlowNode, target: FlowNode, similarity: float) -> None:
        """Add the edge (and its nodes); an edge already there is not added twice."""
        self.nodes.setdefault(source.id, source)
        self.nodes.setdefault(target.id, target)
        if not any(e.source == source.id and e.target == target.id for e in self.edges):
            self.edges.append(FlowEdge(source.id, target.id, similarity))

    def residual_chain(self) -> list[FlowNode]:
        """The residual nodes ordered by layer (several per layer when top-k > 1)."""
        nodes = [n for n in self.nodes.values() if n.kind == "residual"]
        return sorted(nodes, key=lambda n: (n.layer, n.feature))

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "nodes": [
                {"id": n.id, "site": n.site, "feature": n.feature, "layer": n.layer, "kind": n.kind}
                for n in self.nodes.values()
            ],
            "edges": [
                {"source": e.source, "target": e.target, "similarity": e.similarity} for e in self.edges
            ],
        }


def site_layer(site: str) -> tuple[int, str]:
    """(layer, kind) of a site name: ``layers.3`` → (3, residual), ``layers.3.mlp`` → (3, mlp), ``embed`` → (−1,
    residual)."""
    if site == "embed":
        return -1, "residual"
    if m := _RESIDUAL.fullmatch(site):
        return int(m.group(1)), "residual"
    if m := _MODULE.fullmatch(site):
        return int(m.group(1)), m.group(2)
    raise UserError(
        f"{site!r} is not a residual, MLP or attention site (embed, layers.N, layers.N.mlp, layers.N.attn)"
    )


def residual_site(layer: int) -> str:
    return "embed" if layer < 0 else f"layers.{layer}"


def parse_feature(text: str, saes: Mapping[str, SparseAutoencoder]) -> FlowNode:
    """``site:index`` → a node, checked against the SAEs: the site must have one and the index be in range."""
    site, sep, index = text.rpartition(":")
    if not sep or not re.fullmatch(r"[0-9]+", index):
        raise UserError(f"a feature is written SITE:INDEX, e.g. layers.3:123; got {text!r}")
    if site not in saes:
        raise UserError(f"no SAE for site {site} in the folder; it has: {', '.join(saes)}")
    latents = saes[site].cfg.latents
    if int(index) >= latents:
        raise UserError(f"feature {index} is out of range for the SAE at {site} (it has {latents} features)")
    site_layer(site)
    return FlowNode(site, int(index))


def _best(
    saes: Mapping[str, SparseAutoencoder], node: FlowNode, site: str, k: int
) -> list[tuple[int, float]]:
    """The top-k matches of ``node``'s decoder row in the SAE at ``site``: (feature, cosine), best first."""
    values, indices = top_cosines(
        saes[node.site].W_dec_FD[node.feature : node.feature + 1], saes[site].W_dec_FD, k
    )
    return list(zip(indices[0].tolist(), values[0].tolist(), strict=True))


def _successors(
    saes: Mapping[str, SparseAutoencoder],
    node: FlowNode,
    site: str,
    k: int,
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[int, float]]:
    """The features g of the SAE at ``site`` whose top-k matches in ``node``'s SAE include ``node``: (g, cosine)."""
    if site not in cache:  # every feature's top-k predecessors, once per layer
        values, indices = top_cosines(saes[site].W_dec_FD, saes[node.site].W_dec_FD, k)
        cache[site] = (values.cpu(), indices.cpu())
    values_GK, indices_GK = cache[site]
    hits_GK = indices_GK == node.feature
    features = hits_GK.any(1).nonzero().squeeze(1)
    return [(int(g), float(values_GK[g][hits_GK[g]].max())) for g in features]


def _attach_modules(
    graph: FlowGraph, saes: Mapping[str, SparseAutoencoder], node: FlowNode, t: FlowThresholds, k: int
) -> None:
    for kind in ("attn", "mlp"):
        site = f"layers.{node.layer}.{kind}"
        if site in saes and node.layer >= 0:
            for feature, cos in _best(saes, node, site, k):
                if cos >= t.module:
                    graph.add(FlowNode(site, feature), node, cos)


def flow_graph(
    saes: Mapping[str, SparseAutoencoder],
    root: FlowNode,
    thresholds: FlowThresholds = FlowThresholds(),
    top_k: int = 1,
    layers_back: int | None = None,
    layers_forward: int | None = None,
) -> FlowGraph:
    """The flow graph of ``root`` (see the module docstring); ``top_k`` matches per step (1: the paper's
    top-1 cosine)."""
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    graph = FlowGraph(root.id, {root.id: root})
    starts = [root]
    if root.kind != "residual":
        target = residual_site(root.layer)
        if target not in saes:
            raise UserError(f"no SAE at {target} to continue {root.id} into")
        starts = []
        for feature, cos in _best(saes, root, target, top_k):
            if cos >= thresholds.module:
                starts.append(FlowNode(target, feature))
                graph.add(root, starts[-1], cos)
    attached: set[str] = set()
    predecessors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for direction, bound in ((-1, layers_back), (+1, layers_forward)):
        if direction < 0 and root.kind != "residual":
            continue
        frontier, steps = list(starts), 0
        while frontier and (bound is None or steps < bound):
            steps += 1
            nxt: list[FlowNode] = []
            for node in frontier:
                if node.id not in attached:
                    attached.add(node.id)
                    _attach_modules(graph, saes, node, thresholds, top_k)
                layer = node.layer + direction
                if layer < -1 or residual_site(layer) not in saes:
                    continue
                found = (
                    _best(saes, node, residual_site(layer), top_k)
                    if direction < 0
                    else _successors(saes, node, residual_site(layer), top_k, predecessors)
                )
                for feature, cos in found:
                    other = FlowNode(residual_site(layer), feature)
                    if cos < thresholds.residual:
                        continue
                    if other.id not in graph.nodes:
                        nxt.append(other)
                    graph.add(*((other, node) if direction < 0 else (node, other)), cos)
            frontier = nxt
        for node in frontier:  # the last nodes reached get their module inputs too
            if node.id not in attached:
                attached.add(node.id)
                _attach_modules(graph, saes, node, thresholds, top_k)
    return graph


def persistence(
    saes: Mapping[str, SparseAutoencoder], start: int, thresholds: FlowThresholds = FlowThresholds()
) -> list[float]:
    """Entry Δ: the fraction of the features of residual layer ``start`` with a chain of successors (features of
    the next layer whose best residual match is the current one, cosine ≥ τ_R; the strongest when several)
    that lasts Δ layers (entry 0 is 1); as long as there are SAEs."""
    if residual_site(start) not in saes:
        raise UserError(f"no SAE at {residual_site(start)}; the folder has {', '.join(saes)}")
    chain_F = torch.arange(saes[residual_site(start)].cfg.latents)  # −1 once a chain has ended
    curve = [1.0]
    layer = start
    while residual_site(layer + 1) in saes:
        here, after = saes[residual_site(layer)], saes[residual_site(layer + 1)]
        values_G, pred_G = (t[:, 0].cpu() for t in top_cosines(after.W_dec_FD, here.W_dec_FD))
        ok_G = values_G >= thresholds.residual
        best_F = torch.full((here.cfg.latents,), -math.inf).scatter_reduce(
            0, pred_G[ok_G], values_G[ok_G], "amax"
        )
        heir_F = torch.full((here.cfg.latents,), -1, dtype=torch.int64)
        g_ok = ok_G.nonzero().squeeze(1)
        strongest = values_G[g_ok] == best_F[pred_G[g_ok]]
        heir_F[pred_G[g_ok][strongest]] = g_ok[strongest]
        alive_F = chain_F >= 0
        chain_F[alive_F] = heir_F[chain_F[alive_F]]
        curve.append(float((chain_F >= 0).float().mean()))
        layer += 1
    return curve


def pick_roots(saes: Mapping[str, SparseAutoencoder], thresholds: FlowThresholds, n: int) -> list[FlowNode]:
    """Up to ``n`` distinct features of the last residual layer worth drawing: the n−1 with the highest
    residual cosine s(R) (the most persistent) and the feature born in a module with the highest module cosine
    (when one is born)."""
    layers = sorted(
        layer
        for layer, kind in map(site_layer, saes)
        if kind == "residual" and layer >= 0 and residual_site(layer - 1) in saes
    )
    if not layers or n < 1:
        return []
    flow = layer_flow(saes, layers[-1], thresholds)
    site = residual_site(layers[-1])
    roots = [
        FlowNode(site, int(f)) for f in flow.scores["residual"].argsort(descending=True)[: max(n - 1, 1)]
    ]
    module_F = torch.stack(
        [flow.scores.get(k, torch.zeros_like(flow.classes, dtype=torch.float)) for k in ("mlp", "attn")]
    ).amax(0)
    born_F = flow.classes == CLASSES.index("born")
    if n > 1 and bool(born_F.any()):
        born = FlowNode(site, int(torch.where(born_F, module_F, -1.0).argmax()))
        if born not in roots:
            roots.append(born)
    return roots
