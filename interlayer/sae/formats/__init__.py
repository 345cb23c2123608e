"""Other libraries' SAE files: recognise a folder's format and read it as one of interlayer's SAE modules,
and write interlayer SAEs in the formats other tools read.

=====================  ===============================================  ==============================================
format                 files                                            read as
=====================  ===============================================  ==============================================
interlayer             ``cfg.json`` (``latents``) + ``sae.safetensors``  itself
SAELens                ``cfg.json`` + ``sae_weights.safetensors``        relu / topk / jumprelu / batchtopk
sparsify               ``cfg.json`` (``num_latents``) + ``sae.safetensors``  topk
Gemma Scope            ``params.npz``                                   jumprelu
dictionary_learning    ``ae.pt`` (+ ``config.json``)                     relu / topk / batchtopk / matryoshka / jumprelu
=====================  ===============================================  ==============================================

A path may also be ``hf://owner/repo[@revision]/path`` (:mod:`interlayer.sae.formats.hub`). The returned
module's ``sae(x)`` is the original library's reconstruction and ``sae.encode(x)`` its latent activations,
to float tolerance, for any leading shape of x; ``sae.cfg.source_format`` / ``source_site`` record where it
came from and the library's hook name.
"""

from __future__ import annotations

from pathlib import Path

from interlayer.atomic import read_json_object
from interlayer.errors import UserError
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.formats import dictionary_learning, gemmascope, hub, saelens, sparsify

__all__ = ["EXPORTS", "check_writable", "detect_format", "hub", "read_foreign", "write_as"]

EXPORTS = ("saelens", "sparsify")
"""Formats :func:`write_as` writes."""


def detect_format(folder: Path) -> str | None:
    """``interlayer``, ``saelens``, ``sparsify``, ``gemmascope``, ``dictionary_learning``, or None when ``folder`` holds no SAE of any known format."""
    cfg = read_json_object(folder / "cfg.json", "SAE config") if (folder / "cfg.json").is_file() else None
    if saelens.is_saelens(folder, cfg):
        return "saelens"
    if cfg is not None:  # a missing weights file is then the reader's one-line error
        return "sparsify" if sparsify.is_sparsify(cfg) else "interlayer"
    if gemmascope.is_gemmascope(folder):
        return "gemmascope"
    if dictionary_learning.is_dictionary_learning(folder):
        return "dictionary_learning"
    return None


def read_foreign(folder: Path, fmt: str, hub_path: str = "") -> SparseAutoencoder:
    """Read the SAE of format ``fmt`` (any :func:`detect_format` names but ``interlayer``) in ``folder``."""
    if fmt == "saelens":
        return saelens.read_saelens(folder)
    if fmt == "sparsify":
        return sparsify.read_sparsify(folder)
    if fmt == "gemmascope":
        return gemmascope.read_gemmascope(folder, hub_path)
    if fmt == "dictionary_learning":
        return dictionary_learning.read_dictionary_learning(folder)
    raise ValueError(f"unknown format {fmt!r}")


def check_writable(sae: SparseAutoencoder, fmt: str) -> None:
    """A :class:`UserError` saying why, unless format ``fmt`` (one of :data:`EXPORTS`) can express ``sae``."""
    if fmt == "saelens":
        saelens.saelens_equivalent(sae)
    elif fmt == "sparsify":
        sparsify.check_writable(sae)
    else:
        raise UserError(f"cannot export to {fmt!r}; choose one of {', '.join(EXPORTS)}")


def write_as(sae: SparseAutoencoder, fmt: str, folder: Path) -> Path:
    """Write ``sae`` into ``folder`` as format ``fmt`` (one of :data:`EXPORTS`); an SAE the format cannot
    express is a :class:`UserError` saying why, and nothing is written."""
    check_writable(sae, fmt)
    if fmt == "saelens":
        return saelens.write_saelens(sae, folder)
    return sparsify.write_sparsify(sae, folder)
