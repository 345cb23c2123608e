"""Features across layers: SAE Match (fold, assign, compose), feature-flow graphs and interventions.

Reads SAEs through :mod:`interlayer.sae`'s public API only.

>>> from interlayer.flow import match_features, flow_graph, parse_feature
>>> match = match_features(sae_a, sae_b, terms=("encoder", "decoder", "bias"))
>>> match.permutation[i], match.mse[i]      # feature of B matched to feature i of A, and its folded MSE
>>> graph = flow_graph(saes, parse_feature("layers.3:123", saes))
"""

from interlayer.flow.fold import FOLDS, FoldedFeatures, activation_scales, fold_features, fold_jumprelu
from interlayer.flow.graph import (
    FlowEdge,
    FlowGraph,
    FlowNode,
    flow_graph,
    parse_feature,
    persistence,
    pick_roots,
)
from interlayer.flow.interventions import (
    SCHEDULES,
    SteeringTerm,
    feature_direction,
    layer_strengths,
    rescale,
    steer,
    steering_terms,
)
from interlayer.flow.match import TERMS, FeatureMatch, match_features, match_folded, random_match
from interlayer.flow.similarity import (
    CLASSES,
    FlowThresholds,
    LayerFlow,
    classify,
    layer_flow,
    top_cosines,
    transitions,
)

__all__ = [
    "SCHEDULES",
    "SteeringTerm",
    "feature_direction",
    "layer_strengths",
    "rescale",
    "steer",
    "steering_terms",
    "CLASSES",
    "FOLDS",
    "TERMS",
    "FeatureMatch",
    "FlowEdge",
    "FlowGraph",
    "FlowNode",
    "FlowThresholds",
    "FoldedFeatures",
    "LayerFlow",
    "activation_scales",
    "classify",
    "flow_graph",
    "fold_features",
    "fold_jumprelu",
    "layer_flow",
    "match_features",
    "match_folded",
    "parse_feature",
    "persistence",
    "pick_roots",
    "random_match",
    "top_cosines",
    "transitions",
]
