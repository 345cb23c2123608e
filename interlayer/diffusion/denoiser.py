"""Denoisers: ``log p_θ(x0 | x_t)`` for every position, over the absorbing [MASK] process.

A :class:`Denoiser` wraps a network whose forward gives logits over the vocabulary at every position and
applies the SUBS parameterisation (MDLM):

    log p(x0^ℓ = v | x_t) = log_softmax(logits^ℓ with the [MASK] logit set to −∞)_v   where x_t^ℓ = [MASK],
    log p(x0^ℓ = v | x_t) = 0 if v = x_t^ℓ else −∞                                    elsewhere (copied).

The networks here do not take the time t: for the absorbing process the number of masks tells it, and MDLM
found no gain from conditioning on it. ``t`` is still part of the call (``denoiser(x_t, t)``) so that a
subclass can pass it to a time-conditioned network.

Adapters (all through transformers):

- ``masked_lm`` — any ``*ForMaskedLM`` (BERT, RoBERTa, ModernBERT, and interlayer's own MDLM, ``zoo:code-mdlm``
  and what ``interlayer diffusion train`` writes): logits at position ℓ predict token ℓ.
- ``llada`` — LLaDA-style models (``GSAI-ML/LLaDA-8B-*``): a bidirectional decoder loaded with
  ``AutoModel.from_pretrained(..., trust_remote_code=True)``, logits at ℓ predict token ℓ.
- ``dream`` — Dream-style models (``Dream-org/Dream-v0-*``), adapted from an autoregressive LM: the logits at
  ℓ − 1 predict token ℓ, so they are shifted right by one (the first position keeps its own logits), as in
  Dream's own generation code.

The [MASK] id comes from the tokenizer (``mask_token_id``), else from the config (``mask_token_id``); a model
with neither cannot denoise and is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from interlayer.errors import UserError

ADAPTERS = ("masked_lm", "llada", "dream")
_REMOTE_MODEL_TYPES = {"llada": "llada", "dream": "dream"}


def subs_log_probs(logits_BLV: torch.Tensor, x_t_BL: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The SUBS log-probabilities of the module doc, float32 [B, L, V]."""
    logits_BLV = logits_BLV.float().index_fill(
        -1, torch.tensor([mask_id], device=logits_BLV.device), float("-inf")
    )
    log_p_BLV = logits_BLV.log_softmax(-1)
    copied_BL = x_t_BL != mask_id
    if copied_BL.any():
        one_hot_BLV = torch.full_like(log_p_BLV, float("-inf"))
        one_hot_BLV.scatter_(-1, x_t_BL.unsqueeze(-1), 0.0)
        log_p_BLV = torch.where(copied_BL.unsqueeze(-1), one_hot_BLV, log_p_BLV)
    return log_p_BLV


@dataclass
class Denoiser:
    """A network over token ids and how to read x0-logits from it."""

    network: Any
    """The transformers model (eval mode)."""
    mask_id: int
    """The [MASK] token id."""
    adapter: str = "masked_lm"
    """How the logits line up with positions: ``masked_lm``, ``llada`` or ``dream`` (shifted by one)."""
    name: str = ""
    """The name it was loaded by (recorded in remasker and sample folders)."""

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}")

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Columns of the logits (may exceed the tokenizer's vocabulary: padded embeddings)."""
        return int(self.network.get_output_embeddings().weight.shape[0])

    def logits(self, x_t_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        """The network's raw logits, aligned so that position ℓ predicts token ℓ."""
        kwargs: dict[str, Any] = {"input_ids": x_t_BL}
        if attention_mask_BL is not None and not bool(attention_mask_BL.all()):
            kwargs["attention_mask"] = attention_mask_BL
        logits_BLV = self.network(**kwargs).logits
        if self.adapter == "dream":
            logits_BLV = torch.cat([logits_BLV[:, :1], logits_BLV[:, :-1]], dim=1)
        return logits_BLV

    @torch.no_grad()
    def masked_log_probs(
        self, x_t_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log p_θ(x0 | x_t) as SUBS gives it at the [MASK] positions (log-softmax without the [MASK] logit),
        float32 [B, L, V]; rows at revealed positions are *not* replaced by SUBS's copy (samplers never read
        them, and building the copy costs two passes over B·L·V)."""
        logits_BLV = self.logits(x_t_BL, attention_mask_BL).float()
        logits_BLV[..., self.mask_id] = float("-inf")
        return logits_BLV.log_softmax(-1)

    @torch.no_grad()
    def __call__(
        self,
        x_t_BL: torch.Tensor,
        t_B: torch.Tensor | None = None,
        attention_mask_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log p_θ(x0 | x_t) with SUBS, float32 [B, L, V]. ``t_B`` is unused by these time-free networks."""
        return subs_log_probs(self.logits(x_t_BL, attention_mask_BL), x_t_BL, self.mask_id)

    def fingerprint(self) -> str:
        """A short hash of the network's class, config and weights (each tensor's name, shape, sum and first
        64 values, rounded to bfloat16 so that loading in another dtype keeps it; an 8B model takes a second): a remasker records the denoiser it was
        trained from by this, and is refused for any other."""
        digest = hashlib.sha256(type(self.network).__name__.encode())
        where_and_how = (
            "dtype",
            "torch_dtype",
            "_name_or_path",
            "transformers_version",
        )  # not the model itself
        config = {k: v for k, v in self.network.config.to_dict().items() if k not in where_and_how}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.network.state_dict().items()):
            flat = tensor.detach().reshape(-1)  # rounded to bfloat16 so a float32 copy and a bf16 copy agree
            flat = flat.to(torch.bfloat16).double() if flat.is_floating_point() else flat.double()
            head = flat[:64].cpu()
            digest.update(f"{name}{tuple(tensor.shape)}{flat.double().sum().item():.9e}".encode())
            digest.update(head.numpy().tobytes())
        return digest.hexdigest()[:16]


def mask_token_id(tokenizer: Any, config: Any, name: str) -> int:
    """The [MASK] id from the tokenizer, else from the config; one error line when neither has one."""
    for source in (tokenizer, config):
        mask = getattr(source, "mask_token_id", None)
        if isinstance(mask, int):
            return mask
    raise UserError(
        f"model {name!r} has no mask token (neither its tokenizer nor its config names one), so it cannot "
        "denoise; use a masked LM (*ForMaskedLM), a LLaDA/Dream checkpoint or a model from "
        "`interlayer diffusion train`"
    )


def adapter_for(config: Any) -> str:
    """``llada`` or ``dream`` for those model types, else ``masked_lm``."""
    model_type = str(getattr(config, "model_type", "")).lower()
    return _REMOTE_MODEL_TYPES.get(model_type, "masked_lm")


def load_denoiser(
    name: str,
    device: str = "cpu",
    dtype: str = "float32",
    adapter: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[Denoiser, Any]:
    """Load ``name`` (``zoo:code-mdlm``, a folder, a hub id) as a denoiser; returns it and its tokenizer.

    Masked LMs load through :func:`interlayer.models.load_model` (which learns the head kind from the config);
    LLaDA/Dream checkpoints need their own modelling code (``trust_remote_code=True``, ``--trust-remote-code``)
    and load through ``AutoModel``. A causal LM or a bare encoder is refused: it has no masked-LM head.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from interlayer.models import DTYPES, load_model, pick_device, resolve_model_source

    if adapter not in ("auto", *ADAPTERS):
        raise UserError(f"unknown adapter {adapter!r}; choose auto, {', '.join(ADAPTERS)}")
    source, local_only = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(
            source, local_files_only=local_only, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"model {name!r} could not be loaded: {first}") from None
    chosen = adapter_for(config) if adapter == "auto" else adapter
    if chosen == "masked_lm":
        loaded = load_model(name, device=device, dtype=dtype)
        if loaded.head != "masked_lm":
            raise UserError(
                f"model {name!r} is a {loaded.head.replace('_', ' ')}, not a masked LM: it cannot denoise; "
                "use a *ForMaskedLM model, a LLaDA/Dream checkpoint (with --adapter and --trust-remote-code) "
                "or train one with `interlayer diffusion train`"
            )
        network, tokenizer = loaded.model, loaded.tokenizer
    else:
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=local_only, trust_remote_code=trust_remote_code
        )
        network = AutoModel.from_pretrained(
            source,
            config=config,
            local_files_only=local_only,
            trust_remote_code=trust_remote_code,
            dtype=DTYPES[dtype],
        )
        network.to(pick_device(device))
        network.eval().requires_grad_(False)
    return Denoiser(network, mask_token_id(tokenizer, config, name), chosen, name), tokenizer
