"""interlayer: work inside the layers of transformers.

The core (models, sites, data, activations) is shared by every capability subpackage (``interlayer.sae``
and those that follow).
"""

__version__ = "0.1.0"
