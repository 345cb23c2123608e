"""SAE Boost (arXiv:2507.12990): residual SAEs for a new domain on top of a frozen base SAE, trained with
``interlayer sae boost``. One boosted SAE is a base SAE (any architecture ``load_sae`` reads, except boosted)
and residuals i = 1..R, each a TopK SAE without decoder bias that reads the raw activation x:

    ê_i = W_dec,iᵀ TopK_{k_i}(ReLU(W_enc,i x + b_enc,i)),     x̂ = x̂_base(x) + Σ_i ê_i,

with W_enc,i and W_dec,i of shape F_i × d. Residual R, the newest, is trained on domain text to predict the
error the frozen part leaves, e = x − x̂_base − Σ_{i<R} ê_i; the base and the earlier residuals stay
frozen (a boosted SAE used as ``--base`` keeps its base and residuals, and the new residual stacks on them).

It is one SAE with a stitched dictionary: the codes are z = [z_base, z_1, …, z_R] (F = F_base + Σ F_i
latents), ``W_dec_FD`` is the base's rows followed by every residual's, ``b_dec_D`` is the base's, and
x̂ = W_decᵀ z + b_dec equals the forward above whenever z are its own codes, so evaluation, splicing and
everything that reads ``sae(x)``, ``sae.encode(x)`` or the dictionary take it like any other SAE. There is
no single k (each part keeps its own).

Training (the ordinary trainer, checkpoints and resumption): on inputs scaled by c (``input_scale``), the
frozen part, which reads raw activations, is applied to x/c and its output scaled by c:
x̂ = c·x̂_frozen(x/c) + ê_R(c·x), with the loss Σ‖c·x − x̂‖², TopK's AuxK on residual R's dead latents, its
decoder rows at unit norm (an imported base's rows are never touched), and the default learning rate set by
F_R. Residual R starts as a TopK SAE does (random unit decoder rows, b_enc = 0) but with a small encoder,
W_enc = 0.1·W_dec (:data:`ENCODER_INIT_SCALE`), so the boosted SAE starts near its frozen part. The frozen latents count as fired on every batch, so a run's ``inactive_fraction`` is over all F
latents. Folding the scale (:meth:`BoostedSAE.fold_input_scale_`) rewrites residual R alone (W_enc ← c·W_enc,
W_dec ← W_dec / c): the saved SAE reads raw x, and ``input_scale`` records the c residual R was trained at.

File tensors: the base's own names under ``base.`` (``base.W_enc``, ``base.b_dec``, …) and
``residual.<i>.W_enc`` [F_i, d], ``residual.<i>.b_enc`` [F_i], ``residual.<i>.W_dec`` [F_i, d] (i from 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from interlayer.errors import UserError
from interlayer.sae.base import SparseAutoencoder, TrainingOutput, topk_codes
from interlayer.sae.config import SAEConfig
from interlayer.sae.kernels import fused_topk_encode, sparse_decode

ENCODER_INIT_SCALE = 0.1
"""A new residual's encoder starts as this times its decoder (a TopK SAE's starts at 1×), so that its first
ê is small and the boosted SAE starts near its frozen part's error rather than adding a k-term reconstruction
of x the size of x itself to it. Measured on 48 steps of a small planted run (tests/sae/test_boost.py's
``small_boost``, base FVU 0.70 on the domain): 0.78 at 1×, 0.41 at 0.3×, 0.42 at 0.1×; with 192 steps on
the planted domain of ``test_residual_learns_the_new_domain…`` all three reach FVU 0.09, and 0.1× recovered
the new atoms at least as well as 1×."""


@dataclass(frozen=True, kw_only=True)
class BoostedConfig(SAEConfig):
    """A frozen base SAE plus residual TopK SAEs (``latents`` = the base's + Σ ``residual_latents``)."""

    architecture: str = "boosted"
    base: dict[str, Any] = field(hash=False)
    """The base SAE's complete ``cfg.json`` (any architecture but boosted), read with
    :func:`~interlayer.sae.architectures.config_from_json`."""
    residual_latents: tuple[int, ...]
    """F_i, the dictionary size of each residual, oldest first; the last is the one being trained."""
    residual_k: tuple[int, ...]
    """k_i, the active latents per token of each residual (1 ≤ k_i ≤ F_i)."""
    residual_data: tuple[str, ...]
    """The ``--data`` (the domain) each residual was trained on."""
    base_folder: str = ""
    """The folder training read the base (and any earlier residuals) from, as an absolute path; only a fresh
    training run reads it (checkpoints and saved SAEs hold the base's weights)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.base, dict):
            raise UserError(f"base must be the base SAE's config (a JSON object), got {self.base!r}")
        if self.base.get("architecture") == "boosted":
            raise UserError(
                "the base of a boosted SAE cannot itself be boosted: give its base and list its residuals "
                "first (boost_config does this)"
            )
        base = self.base_config
        lengths = {len(self.residual_latents), len(self.residual_k), len(self.residual_data)}
        if len(lengths) != 1 or not self.residual_latents:
            raise UserError(
                "residual_latents, residual_k and residual_data must have one entry per residual (at least "
                f"one), got {len(self.residual_latents)}, {len(self.residual_k)} and {len(self.residual_data)}"
            )
        for i, (latents, k) in enumerate(zip(self.residual_latents, self.residual_k, strict=True)):
            if latents < 1:
                raise UserError(f"residual {i}: latents must be at least 1, got {latents}")
            if not 1 <= k <= latents:
                raise UserError(
                    f"residual {i}: k ({k}) must be at least 1 and not exceed latents ({latents})"
                )
        if self.d_in != base.d_in:
            raise UserError(
                f"a residual for a base of another width: d_in is {self.d_in} but the base SAE reads {base.d_in}"
            )
        want = base.latents + sum(self.residual_latents)
        if self.latents != want:
            raise UserError(
                f"latents must be the base's {base.latents} plus the residuals' {sum(self.residual_latents)} "
                f"= {want}, got {self.latents}"
            )

    @cached_property
    def base_config(self) -> SAEConfig:
        """The base SAE's config, read from :attr:`base`."""
        from interlayer.sae.architectures import config_from_json

        return config_from_json(self.base, source="the base SAE's config")

    @property
    def trained_latents(self) -> int:
        return self.residual_latents[-1]


class ResidualTopK(nn.Module):
    """ê = W_decᵀ TopK_k(ReLU(W_enc x + b_enc)): a TopK SAE with no decoder bias, reading x uncentred."""

    def __init__(self, latents: int, d_in: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.W_enc_FD = nn.Parameter(torch.empty(latents, d_in))
        self.b_enc_F = nn.Parameter(torch.zeros(latents))
        self.W_dec_FD = nn.Parameter(torch.empty(latents, d_in))

    def codes(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense codes [B, F_i]: TopK_k(ReLU(W_enc x + b_enc))."""
        return topk_codes(torch.addmm(self.b_enc_F, x_BD, self.W_enc_FD.T), self.k)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """ê [B, d], through the fused encoder and the sparse decoder."""
        values_BK, indices_BK, _, _ = fused_topk_encode(x_BD, self.W_enc_FD, self.b_enc_F, self.k)
        return sparse_decode(values_BK, indices_BK, self.W_dec_FD)


class BoostedSAE(SparseAutoencoder):
    """x̂ = x̂_base(x) + Σ_i W_dec,iᵀ TopK_{k_i}(ReLU(W_enc,i x + b_enc,i)); only the last residual trains."""

    config_class = BoostedConfig
    file_names = {}  # file_tensors names the parts' tensors itself
    cfg: BoostedConfig

    def __init__(self, cfg: SAEConfig) -> None:
        from interlayer.sae.architectures import build_sae

        super().__init__(cfg)
        assert isinstance(cfg, BoostedConfig)
        self.base = build_sae(cfg.base_config).requires_grad_(False)
        self.residuals = nn.ModuleList(
            ResidualTopK(latents, cfg.d_in, k)
            for latents, k in zip(cfg.residual_latents, cfg.residual_k, strict=True)
        )
        for frozen in self.residuals[:-1]:
            frozen.requires_grad_(False)

    def _make_decoder(self, cfg: SAEConfig) -> None:
        """No decoder parameters of its own: :attr:`W_dec_FD` and :attr:`b_dec_D` are read from the parts."""

    @property
    def W_dec_FD(self) -> torch.Tensor:  # type: ignore[override]  # read-only here, a parameter elsewhere
        """The stitched dictionary [F, d]: the base's rows, then each residual's."""
        return torch.cat([self.base.W_dec_FD, *(r.W_dec_FD for r in self.residual_saes)])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x̂ = W_decᵀ z + b_dec with the stitched dictionary, decoded part by part (no [F, d] copy is built)."""
        z_BF = self._flatten(z, self.cfg.latents, "dictionary")
        parts = [self.base.W_dec_FD, *(r.W_dec_FD for r in self.residual_saes)]
        x_hat_BD = self.b_dec_D.expand(z_BF.shape[0], -1)
        start = 0
        for W_dec_FD in parts:
            x_hat_BD = x_hat_BD + z_BF[:, start : start + W_dec_FD.shape[0]] @ W_dec_FD
            start += W_dec_FD.shape[0]
        return x_hat_BD.reshape(*z.shape[:-1], self.cfg.d_in).to(z.dtype)

    @property
    def b_dec_D(self) -> torch.Tensor:  # type: ignore[override]
        """The base's decoder bias (residuals have none)."""
        return self.base.b_dec_D

    @property
    def residual_saes(self) -> list[ResidualTopK]:
        """The residuals, oldest first (``self.residuals`` as the type they are)."""
        return cast(list[ResidualTopK], list(self.residuals))

    @property
    def trained(self) -> ResidualTopK:
        """The newest residual, the only part training updates."""
        return self.residual_saes[-1]

    # ---- initialisation and hygiene: the trained residual only -----------------------------------------
    def initialise_(self, generator: torch.Generator, b_dec_D: torch.Tensor | None = None) -> None:
        """Load the base (and earlier residuals) from ``cfg.base_folder``; the new residual as TopK starts but
        small: random unit decoder rows, W_enc = :data:`ENCODER_INIT_SCALE`·W_dec, b_enc = 0 (``b_dec_D`` is
        ignored: residuals have no bias)."""
        from interlayer.sae.io import load_sae

        if not self.cfg.base_folder:
            raise UserError("this boosted SAE names no base_folder to read its base SAE from")
        frozen = load_sae(self.cfg.base_folder)
        frozen_base, earlier = frozen, []
        got: tuple[str, tuple[int, ...], tuple[int, ...]] = (_json(frozen.cfg.to_json()), (), ())
        if isinstance(frozen, BoostedSAE):
            frozen_base, earlier = frozen.base, frozen.residual_saes
            got = (_json(frozen.cfg.base), frozen.cfg.residual_latents, frozen.cfg.residual_k)
        if got != (_json(self.cfg.base), self.cfg.residual_latents[:-1], self.cfg.residual_k[:-1]):
            raise UserError(
                f"the SAE in {self.cfg.base_folder} is not the base this boosted SAE was configured with "
                "(its cfg.json differs); it changed since the run started: choose a new --out"
            )
        with torch.no_grad():
            self.base.load_state_dict(frozen_base.state_dict())
            for mine, theirs in zip(self.residuals, earlier, strict=False):
                mine.load_state_dict(theirs.state_dict())
            new = self.trained
            new.W_dec_FD.copy_(torch.randn(new.W_dec_FD.shape, generator=generator))
            self.normalise_decoder_()
            new.W_enc_FD.copy_(new.W_dec_FD * ENCODER_INIT_SCALE)
            new.b_enc_F.zero_()

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        W_dec_FD = self.trained.W_dec_FD
        W_dec_FD.div_(W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from each of the trained residual's decoder rows' gradient its component along that row."""
        W_dec_FD = self.trained.W_dec_FD
        if W_dec_FD.grad is not None:
            W_dec_FD.grad.sub_((W_dec_FD.grad * W_dec_FD).sum(dim=1, keepdim=True) * W_dec_FD)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make the trained residual read raw x (W_enc ← c·W_enc, W_dec ← W_dec / c); the rest already does."""
        self.trained.W_enc_FD.mul_(scale)
        self.trained.W_dec_FD.div_(scale)

    def encoder_weight(self) -> nn.Parameter:
        """The trained residual's encoder (no b_dec is subtracted before it)."""
        return self.trained.W_enc_FD

    # ---- the folder format ---------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"base.{name}": t for name, t in self.base.file_tensors().items()}
        for i, r in enumerate(self.residual_saes):
            for name in ("W_enc", "b_enc", "W_dec"):
                tensors[f"residual.{i}.{name}"] = getattr(r, _RESIDUAL_ATTRS[name]).detach()
        return tensors

    @torch.no_grad()
    def load_file_tensors_(self, tensors: dict[str, torch.Tensor]) -> None:
        self.base.load_file_tensors_({n[5:]: t for n, t in tensors.items() if n.startswith("base.")})
        for i, r in enumerate(self.residual_saes):
            for name, attr in _RESIDUAL_ATTRS.items():
                getattr(r, attr).copy_(tensors[f"residual.{i}.{name}"])

    # ---- inference on [B, d] --------------------------------------------------------------------------
    def frozen_forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x̂_base(x) + Σ_{i<R} ê_i(x): everything but the trained residual, on raw x."""
        x_hat_BD = self.base._forward(x_BD, None)
        for r in self.residual_saes[:-1]:
            x_hat_BD = x_hat_BD + r(x_BD)
        return x_hat_BD

    def _codes(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        return torch.cat([self.base._codes(x_BD, None), *(r.codes(x_BD) for r in self.residual_saes)], dim=1)

    def _reconstruct(self, x_BD: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat_BD, z_base_BF = self.base._reconstruct(x_BD, None)
        codes = [z_base_BF]
        for r in self.residual_saes:
            codes.append(r.codes(x_BD))
            x_hat_BD = x_hat_BD + codes[-1] @ r.W_dec_FD
        return x_hat_BD, torch.cat(codes, dim=1)

    def _forward(self, x_BD: torch.Tensor, k: int | None) -> torch.Tensor:
        return self.frozen_forward(x_BD) + self.trained(x_BD)

    # ---- training -------------------------------------------------------------------------------------
    def training_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None, k_aux: int) -> TrainingOutput:
        """On x scaled by c: x̂ = c·x̂_frozen(x/c) + ê_R(x), loss Σ‖x − x̂‖², AuxK from residual R's dead latents
        (the tail of ``dead_F``); the frozen latents are reported as fired."""
        c = self.cfg.input_scale
        with torch.no_grad():
            frozen_BD = self.frozen_forward(x_BD / c) * c
        new = self.trained
        start = self.cfg.latents - new.W_dec_FD.shape[0]
        dead_tail = None if dead_F is None else dead_F[start:]
        values_BK, indices_BK, aux_values_BA, aux_indices_BA = fused_topk_encode(
            x_BD, new.W_enc_FD, new.b_enc_F, new.k, dead_tail, k_aux
        )
        x_hat_BD = frozen_BD + sparse_decode(values_BK, indices_BK, new.W_dec_FD)
        aux_hat_BD = None
        if aux_indices_BA.shape[1] > 0:
            aux_hat_BD = sparse_decode(aux_values_BA, aux_indices_BA, new.W_dec_FD)
        active_BK = values_BK > 0
        fired_F = torch.ones(self.cfg.latents, dtype=torch.bool, device=x_BD.device)
        fired_F[start:] = False
        fired_F[start + indices_BK[active_BK]] = True
        return TrainingOutput(
            (x_hat_BD - x_BD).pow(2).sum(), x_hat_BD, aux_hat_BD, fired_F, float(active_BK.sum())
        )


_RESIDUAL_ATTRS = {"W_enc": "W_enc_FD", "b_enc": "b_enc_F", "W_dec": "W_dec_FD"}
"""A residual's tensor names in ``sae.safetensors`` → its attributes."""


def _json(value: Any) -> str:
    """A canonical text of a JSON-able value (tuples and lists alike), for comparing configs."""
    return json.dumps(value, sort_keys=True)


def boost_config(
    base: SparseAutoencoder, base_folder: str | Path, latents: int, k: int, data: str
) -> BoostedConfig:
    """The config of a new residual (``latents``, ``k``, trained on ``data``) on top of ``base``, read from
    ``base_folder`` (kept as an absolute path, or as given for an ``hf://`` path): a plain SAE becomes the
    base; a boosted SAE lends its base and its residuals (frozen)."""
    from interlayer.sae.formats.hub import is_hub_path

    folder = str(base_folder) if is_hub_path(base_folder) else str(Path(base_folder).resolve())
    if isinstance(base, BoostedSAE):
        cfg = base.cfg
        return replace(
            cfg,
            latents=cfg.latents + latents,
            residual_latents=(*cfg.residual_latents, latents),
            residual_k=(*cfg.residual_k, k),
            residual_data=(*cfg.residual_data, data),
            base_folder=folder,
            normalisation="none",
            input_scale=1.0,
        )
    return BoostedConfig(
        d_in=base.cfg.d_in,
        latents=base.cfg.latents + latents,
        site=base.cfg.site,
        model=base.cfg.model,
        base=json.loads(json.dumps(base.cfg.to_json())),
        residual_latents=(latents,),
        residual_k=(k,),
        residual_data=(data,),
        base_folder=folder,
    )


def stack_boosted(first: SparseAutoencoder, second: SparseAutoencoder) -> BoostedSAE:
    """One boosted SAE with ``first``'s residuals then ``second``'s over their shared base, so that
    x̂ = x̂_base + Σ ê_i over both (several domain residuals summed). Both must be boosted SAEs with the same
    base: the same base config and bit-identical base tensors; otherwise a :class:`UserError`."""
    for name, sae in (("first", first), ("second", second)):
        if not isinstance(sae, BoostedSAE):
            raise UserError(
                f"the {name} SAE is a {sae.cfg.architecture} SAE, not a boosted one; only boosted SAEs stack "
                "(train a residual with `interlayer sae boost`)"
            )
    assert isinstance(first, BoostedSAE) and isinstance(second, BoostedSAE)
    a, b = first.base.cfg, second.base.cfg
    differs = [
        f"{what} {x} vs {y}"
        for what, x, y in (("d_in", a.d_in, b.d_in), ("site", a.site or "?", b.site or "?"))
        if x != y
    ]
    if not differs and _json(first.cfg.base) != _json(second.cfg.base):
        differs = ["other base configs"]
    if not differs:
        ours, others = first.base.file_tensors(), second.base.file_tensors()
        if any(not torch.equal(ours[n].cpu(), others[n].cpu()) for n in ours):
            differs = ["other base weights"]
    if differs:
        raise UserError(
            "cannot stack: the second SAE holds a residual for a base of another width or site than the first "
            f"({', '.join(differs)}); residuals stack only over the identical base SAE"
        )
    cfg = replace(  # the last residual is the second's: its training scale is the one recorded
        first.cfg,
        normalisation=second.cfg.normalisation,
        input_scale=second.cfg.input_scale,
        latents=first.cfg.latents + sum(second.cfg.residual_latents),
        residual_latents=first.cfg.residual_latents + second.cfg.residual_latents,
        residual_k=first.cfg.residual_k + second.cfg.residual_k,
        residual_data=first.cfg.residual_data + second.cfg.residual_data,
    )
    out = BoostedSAE(cfg).to(device=first.b_dec_D.device, dtype=first.b_dec_D.dtype)
    with torch.no_grad():
        out.base.load_state_dict(first.base.state_dict())
        for mine, theirs in zip(out.residuals, [*first.residuals, *second.residuals], strict=True):
            mine.load_state_dict(theirs.state_dict())
    return out.requires_grad_(False)
