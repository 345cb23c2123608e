"""The configuration of one sparse autoencoder: the object behind ``cfg.json`` and the CLI flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from interlayer.errors import UserError

FORMAT_VERSION = 1
ARCHITECTURES = ("topk", "batchtopk")


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is; written as ``cfg.json`` beside ``sae.safetensors``."""

    d_in: int
    """Width of the activations it reads (the site's width)."""
    latents: int
    """Dictionary size F."""
    k: int
    """Active latents per token (TopK), or the mean per token over a batch (BatchTopK)."""
    architecture: str = "topk"
    """``topk`` or ``batchtopk`` (BatchTopK in training, a JumpReLU with its learned threshold at inference)."""
    site: str = ""
    """The site it was trained on, e.g. ``layers.3``."""
    model: str = ""
    """The model it was trained on, as the user named it."""
    normalisation: str = "none"
    """How inputs were scaled in training: ``none`` or ``mean_squared_norm`` (E‖c·x‖² = d_in). Saved SAEs have
    the scale folded into their weights, so they always read raw activations."""
    input_scale: float = 1.0
    """The factor c applied to inputs during training (already folded into saved weights)."""
    version: int = FORMAT_VERSION
    """Folder-format version."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}"
            )
        for name in ("d_in", "latents", "k"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.k > self.latents:
            raise UserError(f"k ({self.k}) must not exceed latents ({self.latents})")
        if self.normalisation not in ("none", "mean_squared_norm"):
            raise UserError(
                f"normalisation must be 'none' or 'mean_squared_norm', got {self.normalisation!r}"
            )
        if not self.input_scale > 0:
            raise UserError(f"input_scale must be positive, got {self.input_scale}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "cfg.json") -> SAEConfig:
        known = {f.name for f in fields(cls)}
        missing = {"d_in", "latents", "k"} - data.keys()
        if missing:
            raise UserError(f"{source} lacks the field(s) {', '.join(sorted(missing))}")
        version = data.get("version", FORMAT_VERSION)
        if not isinstance(version, int):
            raise UserError(f"{source}: version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise UserError(
                f"{source} has format version {data['version']}; this interlayer reads up to {FORMAT_VERSION}"
            )
        return cls(**{key: value for key, value in data.items() if key in known})
