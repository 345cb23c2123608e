"""Features across layers: SAE Match (fold, assign, compose), feature-flow graphs and interventions.

Reads SAEs through :mod:`interlayer.sae`'s public API only.
"""
