"""A speech encoder with heads over its layers: last layer, SUPERB's weighted sum, or VARAN (one head per layer).

The encoder is any transformers speech encoder (Wav2Vec2, HuBERT, WavLM, Data2VecAudio: ``input_values`` in,
``hidden_states`` out); its N transformer layers' outputs ``hidden_states[1:]`` feed the heads
(:mod:`interlayer.speech.aggregation`). Heads:

- classification: the masked time-mean of the features, then Linear(d, 256) → Linear(256, C) (the official
  head: two linear maps, no non-linearity between);
- CTC: Linear(d, V) on every frame (V = the vocabulary with the blank at index 0).

``last`` puts one head on h_N, ``weighted`` one head on Σ_ℓ softmax(w)_ℓ h_ℓ, ``varan`` one head per layer (all
starting as copies of the first, as the official code) and the posterior network. Every task's per-sample loss
is the cross-entropy, or the CTC loss divided by the sample's encoder frames (the official VARAN CTC
normalisation, used for the baselines too so that only the aggregation differs). Prediction:

- classification: argmax_c of log softmax(logits)_c (baselines) or Σ_ℓ q(ℓ|x)·log softmax(logits_ℓ)_c (VARAN,
  the paper's rule);
- CTC (our rule, the paper gives none): the frame scores log softmax(logits)_t, or for VARAN the q-weighted
  Σ_ℓ q(ℓ|x)·log softmax(logits_ℓ,t) (the classification rule applied per frame), decoded greedily: the
  argmax per frame, repeats merged, blanks dropped.

Fine-tuning modes: ``frozen`` (heads and posterior only), ``full`` (the whole encoder but its convolutional
feature encoder, frozen as in the official code), ``lora`` (``peft`` LoRA adapters on the feed-forward layers
``intermediate_dense`` and ``output_dense``, rank 16, α = rank, no dropout: the official settings; the encoder's
own weights frozen).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from interlayer.audio import frame_lengths
from interlayer.errors import UserError
from interlayer.speech.aggregation import (
    KL_DIRECTIONS,
    PRIORS,
    LayerPosterior,
    WeightedLayerSum,
    ctc_layer_losses,
    layer_prior,
    masked_time_mean,
    varan_class_log_probs,
    varan_loss,
)

TASKS = ("classification", "ctc")
AGGREGATIONS = ("last", "weighted", "varan")
MODES = ("frozen", "full", "lora")
LORA_TARGETS = ("intermediate_dense", "output_dense")
BLANK = 0


@dataclass(frozen=True)
class HeadConfig:
    """What sits on top of the encoder, and VARAN's settings."""

    task: str = "classification"
    """``classification`` (one label per clip) or ``ctc`` (a transcript)."""
    aggregation: str = "varan"
    """``last`` (the last layer), ``weighted`` (SUPERB's weighted sum) or ``varan``."""
    outputs: int = 2
    """Classes, or the CTC vocabulary size including the blank."""
    head_width: int = 256
    """Hidden width of the classification head."""
    posterior_heads: int = 16
    """Attention heads of VARAN's posterior network (must divide the encoder width)."""
    prior: str = "chi2_reversed"
    """VARAN's prior over layers (:data:`interlayer.speech.aggregation.PRIORS`)."""
    prior_df: float = 2.0
    """Degrees of freedom of the χ² prior (official default 2; RAVDESS config 35)."""
    prior_nc: float = 10.0
    """Non-centrality of the χ² prior."""
    prior_p: float = 0.45
    """p of the geometric prior."""
    beta: float = 0.05
    """Weight of the KL term."""
    kl_direction: str = "prior_q"
    """``prior_q``: KL(prior ‖ q), the official code's; ``q_prior``: the ELBO's KL(q ‖ prior)."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("task", TASKS),
            ("aggregation", AGGREGATIONS),
            ("prior", PRIORS),
            ("kl_direction", KL_DIRECTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(allowed)}")
        if self.outputs < 2:
            raise UserError(f"a head needs at least 2 outputs (classes or CTC symbols), not {self.outputs}")
        if self.head_width < 1 or self.posterior_heads < 1:
            raise UserError("head_width and posterior_heads must be at least 1")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise UserError(f"beta must be a non-negative number, not {self.beta}")
        try:
            layer_prior(self.prior, 2, self.prior_p, self.prior_df, self.prior_nc)
        except ValueError as error:
            raise UserError(str(error)) from None


@dataclass
class HeadOutput:
    """What the heads give for a batch: logits with a layer axis (1 for the baselines) and VARAN's posterior."""

    logits: torch.Tensor
    """[batch, heads, classes] or [batch, heads, frames, vocabulary]."""
    posterior_logits_BN: torch.Tensor | None
    """VARAN's posterior logits over the layers, None for the baselines."""
    frame_mask_BT: torch.Tensor
    """True on the valid encoder frames."""

    @property
    def head_weights_BN(self) -> torch.Tensor:
        """q(ℓ | x) for VARAN, 1 for a baseline's single head."""
        if self.posterior_logits_BN is None:
            return torch.ones(self.logits.shape[:2], device=self.logits.device)
        return self.posterior_logits_BN.softmax(dim=-1)


def is_speech_encoder(model: nn.Module) -> bool:
    """True for a transformers model that reads raw audio (``input_values``) through a convolutional feature
    encoder: the wav2vec2 family."""
    return getattr(model, "main_input_name", "") == "input_values" and hasattr(
        model, "_get_feat_extract_output_lengths"
    )


def _classifier(width: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.Linear(hidden, classes))


class VaranModel(nn.Module):
    """A speech encoder and its heads (see the module docstring). ``forward(input_values, attention_mask)``
    gives a :class:`HeadOutput`."""

    def __init__(self, encoder: nn.Module, cfg: HeadConfig, pass_attention_mask: bool = True) -> None:
        super().__init__()
        if not is_speech_encoder(encoder):
            raise UserError(
                f"{type(encoder).__name__} is not a speech encoder; VARAN needs one whose input is audio "
                "(Wav2Vec2, HuBERT, WavLM, Data2VecAudio)"
            )
        self.encoder = encoder
        config: Any = encoder.config
        # LayerDrop (wav2vec2's default 0.1 in training) skips whole layers: every head needs its layer's output.
        # SpecAugment draws its masks from numpy's global generator (not seeded per step: no exact resume) and
        # masks at least two spans of every clip; the official VARAN code turns it off too.
        config.layerdrop = 0.0
        config.apply_spec_augment = False
        self.frozen_encoder = False
        """True in ``frozen`` mode: the encoder then stays in eval mode (no dropout) while the heads train."""
        self.cfg = cfg
        self.pass_attention_mask = pass_attention_mask
        self.layers = int(config.num_hidden_layers)
        width = int(config.hidden_size)
        heads = self.layers if cfg.aggregation == "varan" else 1
        if cfg.task == "classification":
            first = _classifier(width, cfg.head_width, cfg.outputs)
        else:
            first = nn.Linear(width, cfg.outputs)
        self.heads = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(heads - 1)])
        self.weighted = WeightedLayerSum(self.layers) if cfg.aggregation == "weighted" else None
        self.posterior: LayerPosterior | None = None
        if cfg.aggregation == "varan":
            if width % cfg.posterior_heads:
                raise UserError(
                    f"the posterior's {cfg.posterior_heads} attention heads must divide the encoder width "
                    f"{width}; pass --posterior-heads"
                )
            self.posterior = LayerPosterior(width, cfg.posterior_heads)
        self.register_buffer(
            "prior_N",
            layer_prior(cfg.prior, self.layers, cfg.prior_p, cfg.prior_df, cfg.prior_nc).float(),
            persistent=False,
        )

    def train(self, mode: bool = True) -> VaranModel:
        """Train mode for the heads; for the encoder too, unless it is frozen."""
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()
        return self

    def frame_mask(self, attention_mask_BS: torch.Tensor, frames: int) -> torch.Tensor:
        """True on each clip's valid encoder frames (the feature encoder's output lengths)."""
        lengths_B = frame_lengths(self.encoder, attention_mask_BS.sum(-1))
        return torch.arange(frames, device=attention_mask_BS.device)[None] < lengths_B[:, None]

    def layer_states(
        self, input_values_BS: torch.Tensor, attention_mask_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [batch, N, frames, width] (``hidden_states[1:]``) and the frame mask [batch, frames]."""
        mask = attention_mask_BS if self.pass_attention_mask else None
        out = self.encoder(input_values_BS, attention_mask=mask, output_hidden_states=True)
        h_BNTD = torch.stack(out.hidden_states[1:], dim=1)
        return h_BNTD, self.frame_mask(attention_mask_BS, h_BNTD.shape[2])

    def forward(self, input_values_BS: torch.Tensor, attention_mask_BS: torch.Tensor) -> HeadOutput:
        h_BNTD, mask_BT = self.layer_states(input_values_BS, attention_mask_BS)
        if self.cfg.aggregation == "last":
            features_BNTD = h_BNTD[:, -1:]
        elif self.weighted is not None:
            features_BNTD = self.weighted(h_BNTD)[:, None]
        else:
            features_BNTD = h_BNTD
        if self.cfg.task == "classification":
            pooled_BND = masked_time_mean(features_BNTD, mask_BT)
            logits = torch.stack([head(pooled_BND[:, i]) for i, head in enumerate(self.heads)], dim=1)
        else:
            logits = torch.stack([head(features_BNTD[:, i]) for i, head in enumerate(self.heads)], dim=1)
        posterior = None
        if self.posterior is not None:
            posterior = self.posterior(masked_time_mean(h_BNTD, mask_BT))
        return HeadOutput(logits, posterior, mask_BT)

    def loss(
        self,
        output: HeadOutput,
        labels_B: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        target_lengths_B: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss and the per-sample, per-head losses [batch, heads]: class ``labels_B``, or CTC
        ``targets`` (concatenated, no blanks) with their lengths."""
        if self.cfg.task == "classification":
            assert labels_B is not None
            batch, heads, classes = output.logits.shape
            losses_BN = F.cross_entropy(
                output.logits.reshape(-1, classes), labels_B.repeat_interleave(heads), reduction="none"
            ).view(batch, heads)
        else:
            assert targets is not None and target_lengths_B is not None
            log_probs_NBTV = output.logits.float().log_softmax(dim=-1).transpose(0, 1)
            losses_BN = ctc_layer_losses(
                log_probs_NBTV, targets, output.frame_mask_BT.sum(-1), target_lengths_B, BLANK
            )
        if output.posterior_logits_BN is None:
            return losses_BN[:, 0].mean(), losses_BN
        prior_N: torch.Tensor = self.prior_N  # type: ignore[assignment]
        total = varan_loss(
            losses_BN, output.posterior_logits_BN, prior_N, self.cfg.beta, self.cfg.kl_direction
        )
        return total, losses_BN

    def scores(self, output: HeadOutput) -> torch.Tensor:
        """The prediction scores: class scores [batch, classes], or CTC frame scores [batch, frames, vocab]."""
        if output.posterior_logits_BN is None:
            return output.logits[:, 0].float().log_softmax(dim=-1)
        if self.cfg.task == "classification":
            return varan_class_log_probs(output.posterior_logits_BN.float(), output.logits.float())
        q = output.posterior_logits_BN.float().softmax(dim=-1)[:, :, None, None]
        return (q * output.logits.float().log_softmax(dim=-1)).sum(dim=1)


def greedy_ctc_decode(frame_scores_BTV: torch.Tensor, frame_mask_BT: torch.Tensor) -> list[list[int]]:
    """Best path per clip: the argmax symbol of each valid frame, runs of one symbol merged, blanks dropped."""
    best_BT = frame_scores_BTV.argmax(dim=-1)
    decoded = []
    for row, mask in zip(best_BT.tolist(), frame_mask_BT.tolist(), strict=True):
        symbols, previous = [], None
        for symbol, valid in zip(row, mask, strict=True):
            if not valid:
                break
            if symbol != previous and symbol != BLANK:
                symbols.append(symbol)
            previous = symbol
        decoded.append(symbols)
    return decoded


def add_lora(encoder: nn.Module, rank: int = 16, alpha: int | None = None) -> nn.Module:
    """Freeze ``encoder`` and put LoRA adapters (``peft``) on its feed-forward layers; returns it."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise UserError(f"lora rank must be at least 1, not {rank}")
    encoder.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
    )
    return inject_adapter_in_model(config, encoder)


def set_trainable(model: VaranModel, mode: str, lora_rank: int = 16) -> None:
    """Put ``model`` in fine-tuning ``mode`` (:data:`MODES`): heads, posterior and the weighted sum always
    train; the encoder not at all (``frozen``), but its feature encoder (``full``), or through LoRA only."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    model.requires_grad_(True)
    encoder = model.encoder
    model.frozen_encoder = mode == "frozen"
    # the convolutional feature encoder never trains; its freeze also stops it from making its input require a
    # gradient (which it does for gradient checkpointing), or every step would backpropagate through it
    for module in encoder.modules():  # the wav2vec2 family's feature encoders (also inside a *ForCTC wrapper)
        freeze: Any = getattr(module, "_freeze_parameters", None)
        if freeze is not None:
            freeze()
    if mode == "frozen":
        encoder.requires_grad_(False)
        encoder.eval()
    elif mode == "lora":
        add_lora(encoder, lora_rank)
