"""VARAN: input-dependent aggregation of a speech encoder's layers (arXiv 2508.12061), its baselines, and speech.

- :mod:`~interlayer.speech.aggregation`: priors over layers, the posterior network, the VARAN loss and prediction
  rule, SUPERB's weighted sum, the last layer;
- :mod:`~interlayer.speech.model`: :class:`VaranModel`, an encoder with its heads; fine-tuning modes (LoRA via peft);
- :mod:`~interlayer.speech.train`, :mod:`~interlayer.speech.workflows`, :mod:`~interlayer.speech.cli`:
  ``interlayer varan train | evaluate``;
- :mod:`~interlayer.speech.synthesis`, :mod:`~interlayer.speech.corpus`, :mod:`~interlayer.speech.datasets`:
  speech synthesised with eSpeak NG, and loaders for folders and Hugging Face datasets;
- :mod:`~interlayer.speech.metrics`: CER and WER.
"""

from interlayer.speech.model import HeadConfig, VaranModel, set_trainable

__all__ = ["HeadConfig", "VaranModel", "set_trainable"]
