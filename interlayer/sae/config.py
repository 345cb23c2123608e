"""What an SAE is: the fields every architecture shares, and the base of each architecture's own config.

Each architecture module defines a frozen dataclass deriving from :class:`SAEConfig` (or :class:`KConfig` when
it keeps k latents per token) that adds its own fields and their validation; the registry
(:mod:`interlayer.sae.architectures`) maps the ``architecture`` name written in ``cfg.json`` to that module's
SAE class, whose ``config_class`` reads the file back. Every config is keyword-only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from interlayer.errors import UserError

FORMAT_VERSION = 2
"""Folder-format version. 1: interlayer 0.1 (topk and batchtopk only; read unchanged). 2: per-architecture
config fields (k is absent for architectures without one)."""

NORMALISATIONS = ("none", "mean_squared_norm")


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Fields every SAE has; written as ``cfg.json`` beside ``sae.safetensors``."""

    d_in: int
    """Width of the activations it reads (the site's width)."""
    latents: int
    """Dictionary size F."""
    architecture: str = ""
    """The registry name of the architecture (each architecture's config sets its own default)."""
    site: str = ""
    """The site it was trained on, e.g. ``layers.3``."""
    model: str = ""
    """The model it was trained on, as the user named it."""
    normalisation: str = "none"
    """How inputs were scaled in training: ``none`` or ``mean_squared_norm`` (E‖c·x‖² = d_in). Saved SAEs have
    the scale folded into their weights, so they always read raw activations."""
    input_scale: float = 1.0
    """The factor c applied to inputs during training (already folded into saved weights)."""
    source_format: str = ""
    """Where the SAE came from when it was read from another library's files (``saelens``, ``sparsify``,
    ``gemmascope``, ``dictionary_learning``); empty for SAEs trained here."""
    source_site: str = ""
    """The hook point as that library named it (e.g. ``blocks.3.hook_resid_post``); ``site`` holds the
    interlayer site it maps to, or the same name when there is no mapping."""
    version: int = FORMAT_VERSION
    """Folder-format version."""

    def __post_init__(self) -> None:
        for name in ("d_in", "latents"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.normalisation not in NORMALISATIONS:
            raise UserError(
                f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {self.normalisation!r}"
            )
        if not self.input_scale > 0:
            raise UserError(f"input_scale must be positive, got {self.input_scale}")

    @property
    def k_max(self) -> int | None:
        """The largest k that :meth:`SparseAutoencoder.encode` accepts, or None for an architecture with no k."""
        return None

    @property
    def trained_latents(self) -> int:
        """How many latents training updates, which sets the default learning rate: all of them, except for a
        boosted SAE, which trains only its newest residual."""
        return self.latents

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name, value in data.items():
            if isinstance(value, tuple):
                data[name] = list(value)
        return data


@dataclass(frozen=True, kw_only=True)
class KConfig(SAEConfig):
    """An architecture that keeps k latents per token (exactly, or on average over a batch)."""

    k: int
    """Active latents per token."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise UserError(f"k must be at least 1, got {self.k}")
        if self.k > self.latents:
            raise UserError(f"k ({self.k}) must not exceed latents ({self.latents})")

    @property
    def k_max(self) -> int | None:
        return self.latents
