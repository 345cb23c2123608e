"""LIMe: attention that reads keys and values mixed from every earlier layer (arXiv 2502.09245).

``LimeConfig`` / ``LimeForCausalLM`` are transformers models on Llama blocks; importing this package registers
them with the Auto classes, so ``AutoModelForCausalLM.from_pretrained(folder)`` opens a saved LIMe folder
without remote code (interlayer's ``load_model`` imports it on its own). ``DenseFormerConfig`` /
``DenseFormerForCausalLM`` are the cross-layer baseline ``lime train`` can train beside them.
"""

from interlayer import models
from interlayer.lime import denseformer
from interlayer.lime.checkpoint import check_folder
from interlayer.lime.configuration import LimeConfig
from interlayer.lime.denseformer import DenseFormerConfig, DenseFormerForCausalLM
from interlayer.lime.modeling import LimeForCausalLM, LimeModel, LimeRouter, register

register()
denseformer.register()
models.CHECKPOINT_CHECKS["lime"] = check_folder

__all__ = [
    "DenseFormerConfig",
    "DenseFormerForCausalLM",
    "LimeConfig",
    "LimeForCausalLM",
    "LimeModel",
    "LimeRouter",
]
