"""VARAN: input-dependent aggregation of a speech encoder's layers (arXiv 2508.12061), and its baselines.

This package holds, so far, the aggregation math (:mod:`interlayer.speech.aggregation`): priors over layers,
the posterior network, the VARAN loss and prediction rule, the SUPERB weighted sum and the last layer. Speech
data, fine-tuning and the ``interlayer varan`` commands follow (issue 13).
"""
