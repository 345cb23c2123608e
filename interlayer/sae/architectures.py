"""The registry of SAE architectures: one line each. An architecture is one module that owns its config
(fields, defaults, validation), its parameters and initialisation, its encoder and training loss terms; the
trainer, the evaluator, the folder format and the CLI reach it only through this table.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from interlayer.errors import UserError
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.batchtopk import BatchTopKSAE
from interlayer.sae.boosted import BoostedSAE
from interlayer.sae.config import FORMAT_VERSION, SAEConfig
from interlayer.sae.hierarchical import HierarchicalTopKSAE
from interlayer.sae.jumprelu import JumpReLUSAE
from interlayer.sae.kron import KronSAE
from interlayer.sae.matryoshka import MatryoshkaSAE
from interlayer.sae.relu import ReLUSAE
from interlayer.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "hierarchical": HierarchicalTopKSAE,
    "matryoshka": MatryoshkaSAE,
    "kron": KronSAE,
    "jumprelu": JumpReLUSAE,
    "relu": ReLUSAE,
    "boosted": BoostedSAE,
}


def sae_class(architecture: str) -> type[SparseAutoencoder]:
    """The SAE class registered as ``architecture``; a :class:`UserError` listing the names otherwise."""
    if architecture not in ARCHITECTURES:
        raise UserError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture]


def config_fields(architecture: str) -> set[str]:
    """The names of the fields of ``architecture``'s config."""
    return {f.name for f in fields(sae_class(architecture).config_class)}


def make_config(architecture: str, **values: Any) -> SAEConfig:
    """The config of ``architecture`` from ``values``; a field that architecture lacks is a :class:`UserError`."""
    cls = sae_class(architecture).config_class
    unknown = set(values) - config_fields(architecture)
    if unknown:
        names = ", ".join("--" + name.replace("_", "-") for name in sorted(unknown))
        raise UserError(f"{names} {'does' if len(unknown) == 1 else 'do'} not apply to a {architecture} SAE")
    return cls(architecture=architecture, **values)


def config_from_json(data: dict[str, Any], source: str = "cfg.json") -> SAEConfig:
    """Read ``cfg.json`` (format 1 or 2): the architecture's config, unknown fields ignored."""
    version = data.get("version", FORMAT_VERSION)
    if not isinstance(version, int):
        raise UserError(f"{source}: version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{source} has format version {version}; this interlayer reads up to {FORMAT_VERSION}"
        )
    architecture = data.get("architecture", "topk")
    if architecture not in ARCHITECTURES:
        raise UserError(
            f"{source}: unknown architecture {architecture!r}; this interlayer reads {', '.join(ARCHITECTURES)}"
        )
    cls = ARCHITECTURES[architecture].config_class
    known = {f.name: f for f in fields(cls)}
    missing = {name for name, f in known.items() if f.default is MISSING} - data.keys()
    if missing:
        raise UserError(f"{source} lacks the field(s) {', '.join(sorted(missing))}")
    values = {key: value for key, value in data.items() if key in known}
    for name, value in values.items():  # JSON has lists where the config holds tuples (to_json wrote them)
        if isinstance(value, list) and str(known[name].type).startswith("tuple"):
            values[name] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: a field has the wrong type ({exc})") from None


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """An uninitialised SAE of ``cfg.architecture``."""
    return sae_class(cfg.architecture)(cfg)
