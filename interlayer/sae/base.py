"""What every SAE architecture is: a module with a decoder x̂ = W_decᵀ z + b_dec, an encoder of its own, a
training forward that returns its loss terms, and the decoder hygiene the trainer applies.

An architecture subclasses :class:`SparseAutoencoder` (in its own module), names its config class, creates its
encoder parameters and implements :meth:`~SparseAutoencoder._codes` (inference codes of a [B, d] batch) and
:meth:`~SparseAutoencoder.training_forward`. The public :meth:`encode`, :meth:`decode`, :meth:`forward` and
:meth:`reconstruct` accept any leading shape ``[..., d]`` and any floating dtype (computed in the SAE's
dtype, returned in the input's).

Decoder hygiene shared by all: decoder rows at unit norm (:meth:`project_decoder_grad_` removes the gradient
component along each row before the step, :meth:`normalise_decoder_` rescales after it). After a run that
trained on scaled inputs c·x, :meth:`fold_input_scale_` rewrites the weights so the SAE reads raw x:
the encoder weight ← c·W_enc, b_dec ← b_dec / c, W_dec ← W_dec / c. Pre-activations W_enc (c·x − b_dec) are
then unchanged, so codes and thresholds are too, and x̂ is divided by c.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.sae.config import SAEConfig
from interlayer.sae.kernels import sparse_decode


@dataclass
class TrainingOutput:
    """What one training forward returns: the architecture's loss terms and what the trainer counts.

    The trainer's loss is ``recon_loss / Σ‖x − x̄‖² + α·min(n_dead/k_aux, 1)·Σ‖e − aux_hat‖² / Σ‖x − x̄‖²
    + penalty / B`` with the sums over the whole batch of B rows (all ranks together under ``--distribute
    data``), e = x − x_hat detached.
    """

    recon_loss: torch.Tensor
    """Differentiable scalar: the architecture's squared reconstruction error summed over the batch (TopK:
    Σ‖x − x̂‖²; HierarchicalTopK: the mean over prefixes of that; Matryoshka: the sum over prefixes)."""
    x_hat_BD: torch.Tensor
    """The full reconstruction (may be detached): the reported FVU and AuxK's residual use it."""
    aux_hat_BD: torch.Tensor | None
    """The AuxK reconstruction of the residual from dead latents (no bias), or None when unused."""
    fired_F: torch.Tensor
    """Bool mask of latents that fired on at least one token of the batch."""
    active: float
    """Number of (token, latent) pairs active in the batch (L0 = active / tokens)."""
    penalty: torch.Tensor | None = None
    """Differentiable scalar summed over the batch's rows (JumpReLU: λ·Σ_b L0_b), or None."""


class SparseAutoencoder(nn.Module):
    """Decoder parameters, the shape-agnostic public API and decoder hygiene common to every architecture."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    """The config dataclass this architecture reads and writes."""
    batch_coupled: ClassVar[bool] = False
    """True when a token's code depends on the rest of its training batch (BatchTopK): such an SAE cannot be
    trained with ``--distribute data``, whose ranks see only a slice of each batch."""
    file_names: ClassVar[dict[str, str]] = {"W_dec": "W_dec_FD", "b_dec": "b_dec_D"}
    """Tensor name in ``sae.safetensors`` → attribute; architectures extend it."""

    W_dec_FD: torch.Tensor
    """The dictionary [F, d], one row per latent (a parameter; a boosted SAE's is stitched from its parts)."""
    b_dec_D: torch.Tensor
    """The decoder bias [d]."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._make_decoder(cfg)

    def _make_decoder(self, cfg: SAEConfig) -> None:
        """Create the decoder parameters ``W_dec_FD`` [F, d] and ``b_dec_D`` [d]; an architecture whose
        dictionary is assembled from other modules (:mod:`interlayer.sae.boosted`) overrides it."""
        self.W_dec_FD = nn.Parameter(torch.empty(cfg.latents, cfg.d_in))
        self.b_dec_D = nn.Parameter(torch.zeros(cfg.d_in))

    # ---- initialisation and hygiene -------------------------------------------------------------------
    def initialise_(self, generator: torch.Generator, b_dec_D: torch.Tensor | None = None) -> None:
        """Set every parameter from ``generator``; b_dec to ``b_dec_D`` (the data mean) when given."""
        raise NotImplementedError

    def _initialise_decoder_(self, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.W_dec_FD.copy_(W_dec_FD)
            self.normalise_decoder_()
            self.b_dec_D.copy_(b_dec_D if b_dec_D is not None else torch.zeros_like(self.b_dec_D))

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from each decoder row's gradient its component along that (unit) row."""
        if self.W_dec_FD.grad is not None:
            along_F1 = (self.W_dec_FD.grad * self.W_dec_FD).sum(dim=1, keepdim=True)
            self.W_dec_FD.grad.sub_(along_F1 * self.W_dec_FD)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make the SAE read raw x when it was trained on scale·x (see the module docstring)."""
        self.encoder_weight().mul_(scale)
        self.b_dec_D.div_(scale)
        self.W_dec_FD.div_(scale)

    def encoder_weight(self) -> nn.Parameter:
        """The matrix applied to (x − b_dec), which :meth:`fold_input_scale_` multiplies by c."""
        raise NotImplementedError

    # ---- the folder format ---------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to ``sae.safetensors``, under their file names."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        return {name: own[attr].detach() for name, attr in self.file_names.items()}

    @torch.no_grad()
    def load_file_tensors_(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors read from ``sae.safetensors`` (shapes already checked) into the module."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        for name, attr in self.file_names.items():
            own[attr].copy_(tensors[name])

    # ---- inference, any leading shape -----------------------------------------------------------------
    def check_k(self, k: int | None) -> None:
        """A :class:`UserError` unless ``k`` is None or a budget this SAE can be evaluated at."""
        if k is None:
            return
        k_max = self.cfg.k_max
        if k_max is None:
            raise UserError(f"a {self.cfg.architecture} SAE has no k; evaluate it without --k-eval")
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        if k > k_max:
            raise UserError(
                f"k = {k} exceeds {k_max}, the largest budget of this {self.cfg.architecture} SAE"
                + (" (its trained K)" if k_max < self.cfg.latents else " (its latents)")
            )

    def _flatten(self, x: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if x.shape[-1] != width:
            raise UserError(
                f"the SAE's {what} has width {width} but the input's last dimension is {x.shape[-1]} "
                f"(shape {tuple(x.shape)})"
            )
        return x.reshape(-1, width).to(self.b_dec_D.dtype)

    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Codes z [..., F] of activations x [..., d] (``k``: keep the top k per token, where supported)."""
        self.check_k(k)
        z_BF = self._codes(self._flatten(x, self.cfg.d_in, "input"), k)
        return z_BF.reshape(*x.shape[:-1], self.cfg.latents).to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x̂ = W_decᵀ z + b_dec for codes z [..., F]."""
        x_hat_BD = self._flatten(z, self.cfg.latents, "dictionary") @ self.W_dec_FD + self.b_dec_D
        return x_hat_BD.reshape(*z.shape[:-1], self.cfg.d_in).to(z.dtype)

    def reconstruct(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂, z) in one pass: the SAE's own forward, with the codes it used."""
        self.check_k(k)
        x_hat_BD, z_BF = self._reconstruct(self._flatten(x, self.cfg.d_in, "input"), k)
        lead = x.shape[:-1]
        return x_hat_BD.reshape(*lead, self.cfg.d_in).to(x.dtype), z_BF.reshape(*lead, self.cfg.latents).to(
            x.dtype
        )

    def forward(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The reconstruction x̂ [..., d] of x [..., d]."""
        self.check_k(k)
        x_hat_BD = self._forward(self._flatten(x, self.cfg.d_in, "input"), k)
        return x_hat_BD.reshape(x.shape).to(x.dtype)

    # ---- what an architecture implements, on [B, d] batches ------------------------------------------
    def _codes(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        raise NotImplementedError

    def _reconstruct(self, x_BD: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        z_BF = self._codes(x_BD, k)
        return z_BF @ self.W_dec_FD + self.b_dec_D, z_BF

    def _forward(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        return self._reconstruct(x_BD, k)[0]

    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        """The loss terms of one training batch (``dead_F``: latents AuxK may use; ``k_aux`` per token)."""
        raise NotImplementedError

    def dense_training_output(
        self,
        x_BD: torch.Tensor,
        z_BF: torch.Tensor,
        aux_hat_BD: torch.Tensor | None = None,
        penalty: torch.Tensor | None = None,
    ) -> TrainingOutput:
        """The :class:`TrainingOutput` of dense codes z [B, F]: x̂ = W_decᵀ z + b_dec, the term Σ‖x − x̂‖², and
        the latents with z ≠ 0 as fired (with ``aux_hat_BD`` and ``penalty`` passed through)."""
        x_hat_BD = z_BF @ self.W_dec_FD + self.b_dec_D
        active_BF = z_BF.detach() != 0
        return TrainingOutput(
            (x_hat_BD - x_BD).pow(2).sum(),
            x_hat_BD,
            aux_hat_BD,
            active_BF.any(0),
            float(active_BF.sum()),
            penalty,
        )

    def sparse_training_output(
        self,
        x_BD: torch.Tensor,
        selection: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        recon_and_x_hat: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> TrainingOutput:
        """The :class:`TrainingOutput` of a per-token selection (values_BK, latents_BK, AuxK values_BA, AuxK
        latents_BA): AuxK decoded sparsely without bias, the firings, and the reconstruction term, which is
        Σ‖x − x̂‖² of the sparse decode unless ``recon_and_x_hat`` gives the architecture's own."""
        values_BK, indices_BK, aux_values_BA, aux_indices_BA = selection
        if recon_and_x_hat is None:
            x_hat_BD = sparse_decode(values_BK, indices_BK, self.W_dec_FD) + self.b_dec_D
            recon_and_x_hat = ((x_hat_BD - x_BD).pow(2).sum(), x_hat_BD)
        aux_hat_BD = None
        if aux_indices_BA.shape[1] > 0:
            aux_hat_BD = sparse_decode(aux_values_BA, aux_indices_BA, self.W_dec_FD)
        active_BK = values_BK > 0
        fired_F = torch.zeros(self.cfg.latents, dtype=torch.bool, device=x_BD.device)
        fired_F[indices_BK[active_BK]] = True
        return TrainingOutput(*recon_and_x_hat, aux_hat_BD, fired_F, float(active_BK.sum()))


class DenseEncoderSAE(SparseAutoencoder):
    """An SAE whose encoder is a dense F×d matrix: pre = W_enc (x − b_dec) + b_enc."""

    file_names: ClassVar[dict[str, str]] = {
        "W_enc": "W_enc_FD",
        "b_enc": "b_enc_F",
        **SparseAutoencoder.file_names,
    }

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.W_enc_FD = nn.Parameter(torch.empty(cfg.latents, cfg.d_in))
        self.b_enc_F = nn.Parameter(torch.zeros(cfg.latents))

    def initialise_(self, generator: torch.Generator, b_dec_D: torch.Tensor | None = None) -> None:
        """Random unit decoder rows, encoder = decoder (W_enc = W_decᵀ as maps), b_enc = 0, b_dec = data mean."""
        self._initialise_decoder_(torch.randn(self.W_dec_FD.shape, generator=generator), b_dec_D)
        with torch.no_grad():
            self.W_enc_FD.copy_(self.W_dec_FD)
            self.b_enc_F.zero_()

    def encoder_weight(self) -> nn.Parameter:
        return self.W_enc_FD

    def pre_activations(self, x_BD: torch.Tensor) -> torch.Tensor:
        """W_enc (x − b_dec) + b_enc, dense [B, F]."""
        return torch.addmm(self.b_enc_F, x_BD - self.b_dec_D, self.W_enc_FD.T)


def topk_codes(pre_BF: torch.Tensor, k: int) -> torch.Tensor:
    """Dense codes keeping the k largest of ReLU(pre) per row (zeros elsewhere)."""
    values_BK, indices_BK = pre_BF.topk(k, dim=1, sorted=False)
    return torch.zeros_like(pre_BF).scatter_(1, indices_BK, values_BK.clamp_(min=0))
