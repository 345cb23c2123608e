"""LIMe (layer-integrated memory, arXiv 2502.09245) as a transformers model on Llama blocks.

At layer r, every layer m ≤ r has projected the tokens of this forward pass to pre-RoPE keys and values
KV_{m,i} = [K_{m,i} ‖ V_{m,i}] ∈ R^{2·d_head} for its kv-heads i = 0..R-1. Layer r's attention reads, for its
kv-head j,

    KV'_{r,j} = Σ_{m ≤ r} Σ_i W_r[j, m·R + i] · KV_{m,i}        (one mix shared by keys and values)

then applies RoPE to K' and attends with its own, untouched queries. W_r ∈ R^{R × (r+1)·R} is a free linear mix
(not a softmax); layer 0 has no router (its only source is itself). Initialisation as in the official code
(corl-team/lime): the block of layer r itself is the identity, the blocks of earlier layers uniform in
±sqrt(3 / fan_in) with fan_in = (r+1)·R. With the earlier blocks at zero the model is exactly Llama.

The mixing is per token, so the KV cache holds only the mixed, rotated K', V' of each layer: the same tensors,
of the same size, as Llama's cache; at a decoding step the new token's pre-RoPE K, V of every layer are
computed afresh within that step. The pre-RoPE K‖V of earlier layers travel through one forward pass in a
:class:`LayerMemory` that :class:`LimeModel` creates per call (so gradient checkpointing, which would re-run
layers and append twice, is not supported).

``lime_router = "dynamic"`` adds an input-dependent mix: W_r(x_t) = W_r + reshape(U_r · RMSNorm(x_t)), where
x_t is the layer's normalised attention input and U_r ∈ R^{R·(r+1)·R × d} starts at zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from interlayer.lime.configuration import LimeConfig


def kv_head_count(config: Any) -> int:
    """R, the key/value heads of each layer (Llama's default: as many as query heads)."""
    return int(config.num_key_value_heads or config.num_attention_heads)


class MixBuffers:
    """The tensors outside autograd that one forward pass's mixes share: every layer's pre-RoPE K‖V as rows
    m·R..(m+1)·R of ``sources_NM`` [L·R, batch·tokens·2·d_head] (written once per layer), and ``grads_NM`` of
    the same shape, in which the backward pass sums the sources' gradients (made at its first use). Holds no
    autograd tensor, so the graph nodes that keep it hold no reference cycle through the graph."""

    def __init__(self, sources_NM: torch.Tensor) -> None:
        self.sources_NM = sources_NM
        self.grads_NM: torch.Tensor | None = None

    def gradient_sums(self) -> torch.Tensor:
        if self.grads_NM is None:
            self.grads_NM = torch.zeros_like(self.sources_NM)
        return self.grads_NM


class LayerMemory:
    """The pre-RoPE K‖V of every layer run so far in one forward pass.

    Each layer's K‖V is kept twice: as the autograd tensor [R, batch, tokens, 2·d_head] (gradients flow back to
    its projections through it) and in :class:`MixBuffers` outside autograd, so that a router's mix of every
    earlier layer is one matrix product over a view of the buffer (:class:`_Mix`): no concatenation per layer,
    no O(L²) copies or saved tensors."""

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.kv_RBTC: list[torch.Tensor] = []
        self.buffers: MixBuffers | None = None

    def append(self, kv_RBTC: torch.Tensor) -> None:
        """Add one layer's K‖V [R, batch, tokens, 2·d_head]."""
        kv_heads = kv_RBTC.shape[0]
        if self.buffers is None:
            self.buffers = MixBuffers(kv_RBTC.new_empty(self.layers * kv_heads, kv_RBTC[0].numel()))
        rows = slice(len(self.kv_RBTC) * kv_heads, (len(self.kv_RBTC) + 1) * kv_heads)
        self.buffers.sources_NM[rows].view_as(kv_RBTC).copy_(kv_RBTC.detach())
        self.kv_RBTC.append(kv_RBTC)


class _Mix(torch.autograd.Function):
    """out = W_r · S with S = [KV_0; …; KV_r] stacked by rows, S read from the memory buffer.

    Backward: ∂L/∂W_r = ∂L/∂out · Sᵀ (S is the buffer view, never overwritten: later layers only write rows
    below it). The gradients of the sources, ∂L/∂KV_m = Σ_{r ≥ m} (W_{r, m-block})ᵀ · ∂L/∂out_r, are summed in
    place in one buffer G [L·R, M] of the memory: layer r adds W_rᵀ · ∂L/∂out_r into rows 0..(r+1)·R (one
    product) and hands autograd only its own rows (at r = 1 also layer 0's, which has no router), complete by
    then because every later layer's backward runs first (layer r's output feeds them all). The rows handed
    over are zeroed, so a second backward through a retained graph starts from zero. This sums the O(L²)
    per-pair gradients in place instead of materialising each one for autograd to add."""

    @staticmethod
    def forward(
        ctx: Any, weight_RN: torch.Tensor, buffers: MixBuffers, *kv_RBTC: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(weight_RN)
        # the buffers are kept as an attribute, not saved: later layers write other rows of them, which would
        # trip autograd's version check although these rows never change
        ctx.buffers = buffers
        ctx.layer = len(kv_RBTC) - 1
        ctx.kv_shape = kv_RBTC[0].shape
        return weight_RN @ buffers.sources_NM[: weight_RN.shape[1]]

    @staticmethod
    @once_differentiable  # the in-place sums are not themselves differentiable: double backward refuses
    def backward(ctx: Any, grad_RM: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (weight_RN,) = ctx.saved_tensors
        kv_heads, sources = weight_RN.shape
        buffers: MixBuffers = ctx.buffers
        grad_weight = grad_RM @ buffers.sources_NM[:sources].T if ctx.needs_input_grad[0] else None
        summed_NM = buffers.gradient_sums()
        summed_NM[:sources].addmm_(weight_RN.T, grad_RM)
        grads: list[torch.Tensor | None] = [None] * (ctx.layer + 1)
        for layer in (ctx.layer, 0) if ctx.layer == 1 else (ctx.layer,):
            rows = summed_NM[layer * kv_heads : (layer + 1) * kv_heads]
            grads[layer] = rows.clone().view(ctx.kv_shape)
            rows.zero_()
        return (grad_weight, None, *grads)


class DynamicRouterProjection(nn.Linear):
    """U_r of a dynamic router (its own class so that weight initialisation finds it and starts it at zero)."""


class LimeRouter(nn.Module):
    """Layer r's mix W_r [R, (r+1)·R] of the K‖V of kv-heads (m, i), m ≤ r, into its own R kv-heads
    (column m·R + i reads layer m's kv-head i); with ``dynamic``, plus reshape(U_r · RMSNorm(x_t))."""

    def __init__(self, layer_idx: int, kv_heads: int, hidden_size: int, dynamic: bool, eps: float) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kv_heads = kv_heads
        self.sources = (layer_idx + 1) * kv_heads
        self.weight = nn.Parameter(torch.empty(kv_heads, self.sources))
        self.dynamic: DynamicRouterProjection | None = None
        self.dynamic_norm: LlamaRMSNorm | None = None
        if dynamic:
            self.dynamic_norm = LlamaRMSNorm(hidden_size, eps=eps)
            self.dynamic = DynamicRouterProjection(hidden_size, kv_heads * self.sources, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity on the own layer's block, uniform ±sqrt(3 / fan_in) on earlier blocks; dynamic part zero."""
        self.reset_static()
        self.reset_dynamic()

    @torch.no_grad()
    def reset_static(self) -> None:
        """W_r: identity on the own layer's block, uniform ±sqrt(3 / fan_in) on earlier blocks."""
        bound = math.sqrt(3.0 / self.sources)
        self.weight.uniform_(-bound, bound)
        self.weight[:, -self.kv_heads :] = torch.eye(self.kv_heads)

    @torch.no_grad()
    def reset_dynamic(self) -> None:
        """U_r = 0 (the dynamic model starts as the static one) and its norm's gain 1."""
        if self.dynamic is not None and self.dynamic_norm is not None:
            self.dynamic.weight.zero_()
            self.dynamic_norm.weight.fill_(1.0)

    def forward(self, memory: LayerMemory, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """The mixed K‖V [R, batch, tokens, 2·d_head] of every layer so far (:class:`LayerMemory`)."""
        kv_shape = memory.kv_RBTC[0].shape
        weight = self.weight.to(memory.kv_RBTC[0].dtype)
        mixed_RM = _Mix.apply(weight, memory.buffers, *memory.kv_RBTC)
        if self.dynamic is not None and self.dynamic_norm is not None:
            delta_BTRN = self.dynamic(self.dynamic_norm(hidden_BTD)).unflatten(
                -1, (self.kv_heads, self.sources)
            )
            memory_NBTC = torch.cat(memory.kv_RBTC)
            mixed_RM = mixed_RM + torch.einsum("btjn,nbtc->jbtc", delta_BTRN, memory_NBTC).flatten(1)
        return mixed_RM.view(kv_shape)

    def extra_repr(self) -> str:
        return f"kv_heads={self.kv_heads}, sources={self.sources}, dynamic={self.dynamic is not None}"


class LimeAttention(LlamaAttention):
    """Llama attention whose keys and values are layer r's router mix of every layer's pre-RoPE K‖V."""

    def __init__(self, config: LimeConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.router: LimeRouter | None = None
        if layer_idx > 0:
            self.router = LimeRouter(
                layer_idx,
                kv_head_count(config),
                config.hidden_size,
                config.lime_router == "dynamic",
                config.rms_norm_eps,
            )

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        lime_memory: LayerMemory | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if lime_memory is None:
            raise ValueError("LimeAttention runs inside LimeModel, which hands every layer the LayerMemory")
        for older_name in ("past_key_values", "past_key_value"):  # the cache's name in older transformers
            if cache is None:  # (an empty cache is falsy: test for None, not truth)
                cache = kwargs.pop(older_name, None)
        batch, tokens = hidden_states.shape[:2]
        query_BHTC = self.q_proj(hidden_states).view(batch, tokens, -1, self.head_dim).transpose(1, 2)
        key_BTRC = self.k_proj(hidden_states).view(batch, tokens, -1, self.head_dim)
        value_BTRC = self.v_proj(hidden_states).view(batch, tokens, -1, self.head_dim)
        kv_RBTC = torch.cat([key_BTRC, value_BTRC], dim=-1).permute(2, 0, 1, 3)
        lime_memory.append(kv_RBTC)
        if self.router is not None:
            kv_RBTC = self.router(lime_memory, hidden_states)
        key_BRTC = kv_RBTC[..., : self.head_dim].transpose(0, 1)
        value_BRTC = kv_RBTC[..., self.head_dim :].transpose(0, 1)
        cos, sin = position_embeddings
        query_BHTC, key_BRTC = apply_rotary_pos_emb(query_BHTC, key_BRTC, cos, sin)
        if cache is not None:
            key_BRTC, value_BRTC = cache.update(key_BRTC, value_BRTC, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output_BTHC, weights = attention(
            self,
            query_BHTC,
            key_BRTC.contiguous(),
            value_BRTC.contiguous(),
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output_BTHC.reshape(batch, tokens, -1).contiguous()), weights


class LimeDecoderLayer(LlamaDecoderLayer):
    """A Llama block with :class:`LimeAttention`."""

    def __init__(self, config: LimeConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.self_attn = LimeAttention(config, layer_idx)


class LimePreTrainedModel(LlamaPreTrainedModel):
    """Weights initialisation and Auto-class plumbing shared by the LIMe models."""

    config_class = LimeConfig
    config: LimeConfig
    _no_split_modules = ["LimeDecoderLayer"]
    supports_gradient_checkpointing = False
    _can_compile_fullgraph = False  # the mix's autograd Function keeps the buffer outside autograd
    _can_record_outputs = {"hidden_states": LimeDecoderLayer, "attentions": LimeAttention}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DynamicRouterProjection):  # visited alone when only U_r is missing
            if not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight.zero_()
            return
        if not isinstance(module, LimeRouter):
            return
        # never over weights a checkpoint has just loaded: a static checkpoint opened with lime_router="dynamic"
        # keeps its W_r and gets U_r = 0, so it starts as the static model
        if not getattr(module.weight, "_is_hf_initialized", False):
            module.reset_static()
        if module.dynamic is not None and not getattr(module.dynamic.weight, "_is_hf_initialized", False):
            module.reset_dynamic()


class LimeModel(LimePreTrainedModel, LlamaModel):
    """The LIMe decoder stack (no LM head)."""

    def __init__(self, config: LimeConfig) -> None:
        LimePreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LimeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Llama's forward, with a fresh :class:`LayerMemory` handed to every layer's attention."""
        kwargs["lime_memory"] = LayerMemory(self.config.num_hidden_layers)
        return LlamaModel.forward(self, *args, **kwargs)


class LimeForCausalLM(LimePreTrainedModel, LlamaForCausalLM):
    """LIMe with a language-modelling head: ``generate``, ``save_pretrained`` and the Auto classes work as for
    Llama. Router parameters are ``model.layers.{r}.self_attn.router.weight`` (r ≥ 1)."""

    def __init__(self, config: LimeConfig) -> None:
        LimePreTrainedModel.__init__(self, config)
        self.model = LimeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def routers(self) -> list[LimeRouter]:
        """The routers of layers 1..L-1, in order."""
        return [layer.self_attn.router for layer in self.model.layers if layer.self_attn.router is not None]

    @classmethod
    def from_llama(cls, llama: PreTrainedModel, lime_router: str = "static") -> LimeForCausalLM:
        """A LIMe model with ``llama``'s weights and identity routers (earlier blocks zero): the same function as
        ``llama`` until its routers are trained."""
        config = LimeConfig(**{**llama.config.to_dict(), "lime_router": lime_router})
        model = cls(config)
        nn.Module.to(model, device=llama.device, dtype=llama.dtype)
        missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
        assert not unexpected and all(".router." in name for name in missing), (missing, unexpected)
        with torch.no_grad():
            for router in model.routers():
                router.weight.zero_()
                router.weight[:, -router.kv_heads :] = torch.eye(router.kv_heads)
        return model


def register() -> None:
    """Make ``model_type: lime`` open through AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    try:
        AutoConfig.register("lime", LimeConfig)
        AutoModel.register(LimeConfig, LimeModel)
        AutoModelForCausalLM.register(LimeConfig, LimeForCausalLM)
    except ValueError:  # already registered by an earlier import
        pass
