"""DenseFormer (Pagliardini et al., 2024): a Llama whose blocks read a learned average of every earlier output.

After block i (i = 0..L−1) a depth-weighted average (DWA) replaces the residual stream by

    x'_{i+1} = Σ_{j=0}^{i+1} α_i[j] · X_j,

where X_0 is the token embedding and X_j (j ≥ 1) the output of block j−1 (computed from x'_{j−1}); α_i ∈ R^{i+2}
starts at (0, …, 0, 1), so a new DenseFormer is exactly the Llama of the same weights. It is the cheap
cross-layer baseline next to LIMe (L(L+3)/2 extra scalars, a weighted sum of hidden states per block instead of
LIMe's mix of keys and values). Registered with the Auto classes as ``model_type: denseformer``; the site
``layers.N`` is the averaged stream x'_{N+1} that block N+1 reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel


class DenseFormerConfig(LlamaConfig):
    """A Llama config whose model averages every earlier block output after each block."""

    model_type = "denseformer"

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)  # DenseFormerConfig(**llama_config.to_dict()) is a denseformer config
        super().__post_init__(**kwargs)


class DepthWeightedAverage(nn.Module):
    """α_i ∈ R^{i+2} of block i: the weights of X_0..X_{i+1} in the stream block i+1 reads."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(block + 2))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(0, …, 0, 1): the plain residual stream."""
        self.weight.zero_()
        self.weight[-1] = 1.0

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        mixed = self.weight[0].to(outputs[0].dtype) * outputs[0]
        for j in range(1, len(outputs)):
            mixed = mixed + self.weight[j].to(outputs[j].dtype) * outputs[j]
        return mixed


class DenseFormerPreTrainedModel(LlamaPreTrainedModel):
    config_class = DenseFormerConfig
    config: DenseFormerConfig
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DepthWeightedAverage) and not getattr(
            module.weight, "_is_hf_initialized", False
        ):
            module.reset_parameters()


class DenseFormerModel(DenseFormerPreTrainedModel, LlamaModel):
    """Llama's stack with a :class:`DepthWeightedAverage` after every block (applied by forward hooks on the
    blocks, so Llama's own forward, cache and generation run unchanged)."""

    def __init__(self, config: DenseFormerConfig) -> None:
        LlamaModel.__init__(self, config)
        self.dwa = nn.ModuleList([DepthWeightedAverage(i) for i in range(config.num_hidden_layers)])
        self._outputs: list[torch.Tensor] = []
        self.layers[0].register_forward_pre_hook(self._start)
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(self._averager(i))
        self.post_init()

    def _start(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self._outputs = [args[0]]  # X_0: the embeddings entering block 0

    def _averager(self, block: int) -> Any:
        def average(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            self._outputs.append(hidden)
            mixed = self.dwa[block](self._outputs)
            if block == len(self.layers) - 1:
                self._outputs = []  # nothing outlives the forward pass
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return average


class DenseFormerForCausalLM(DenseFormerPreTrainedModel, LlamaForCausalLM):
    """DenseFormer with a language-modelling head (``generate``, ``save_pretrained``, Auto classes)."""

    def __init__(self, config: DenseFormerConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = DenseFormerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def register() -> None:
    """Make ``model_type: denseformer`` open through AutoConfig / AutoModelForCausalLM (idempotent)."""
    try:
        AutoConfig.register("denseformer", DenseFormerConfig)
        AutoModelForCausalLM.register(DenseFormerConfig, DenseFormerForCausalLM)
    except ValueError:  # already registered by an earlier import
        pass
