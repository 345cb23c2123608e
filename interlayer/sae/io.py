"""The SAE folder format: ``cfg.json`` (the architecture's config) and ``sae.safetensors``; loading also
reads other libraries' formats (:mod:`interlayer.sae.formats`).

Tensor names: ``W_enc`` ([F, d]; KronSAE [h(m+n), d]), ``b_enc``, ``W_dec`` [F, d], ``b_dec`` [d], plus
``threshold`` ([] for BatchTopK and Matryoshka, [F] for JumpReLU). Saved weights read raw activations (any
training-time input scale is folded in). Both files are written atomically; loading reads JSON and
safetensors only and checks every shape against the config. Format 1 folders (interlayer 0.1) load as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from interlayer.atomic import read_json, read_tensors, write_json, write_tensors
from interlayer.errors import UserError
from interlayer.sae import formats
from interlayer.sae.architectures import build_sae, config_from_json
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.formats.common import checked_tensor

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae.safetensors`` (weights first, so a config never points at nothing)."""
    folder = Path(folder)
    tensors = {name: t.contiguous().cpu() for name, t in sae.file_tensors().items()}
    write_tensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "interlayer-sae"})
    write_json(folder / CFG_FILE, sae.cfg.to_json())
    return folder


def folded_copy(sae: SparseAutoencoder) -> SparseAutoencoder:
    """A copy of ``sae`` whose weights read raw activations (training input scale folded in)."""
    out = build_sae(sae.cfg).to(sae.W_dec_FD.device)
    out.load_state_dict(sae.state_dict())
    out.fold_input_scale_(sae.cfg.input_scale)
    return out


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read one SAE: an interlayer folder, any format of :mod:`interlayer.sae.formats` (SAELens, sparsify,
    Gemma Scope, dictionary_learning), a run folder holding exactly one SAE, or ``hf://owner/repo/path``.

    A missing file, bad JSON, a tensor of the wrong shape or a format interlayer cannot read is a
    :class:`UserError` naming the file.
    """
    saes = load_saes(path, device)
    if len(saes) > 1:
        raise UserError(
            f"{path} holds {len(saes)} SAEs ({', '.join(saes)}); pass one of its subfolders, or use load_saes"
        )
    return next(iter(saes.values()))


def load_saes(path: str | Path, device: str | torch.device = "cpu") -> dict[str, SparseAutoencoder]:
    """Every SAE at ``path``, keyed by site: one SAE folder (any format), or a run folder with one SAE
    folder per site (interlayer's ``sae train`` output, a sparsify run)."""
    hub_path = str(path) if formats.hub.is_hub_path(path) else ""
    folder = formats.hub.download(hub_path) if hub_path else Path(path)
    if folder.is_file():  # params.npz or ae.pt named directly
        if folder.name not in ("params.npz", "ae.pt"):
            raise UserError(
                f"{path} is a file; pass the SAE's folder (or a Gemma Scope params.npz / dictionary_learning ae.pt)"
            )
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"no SAE at {path}: folder not found")
    fmt = formats.detect_format(folder)
    if fmt is not None:
        sae = _load_own(folder) if fmt == "interlayer" else formats.read_foreign(folder, fmt, hub_path)
        return {sae.cfg.site or folder.name: sae.to(device)}
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and formats.detect_format(p) is not None)
    if not subfolders:
        raise UserError(
            f"no SAE found at {path}: expected an SAE folder (interlayer, SAELens, sparsify, Gemma Scope "
            "params.npz or dictionary_learning ae.pt) there or in its subfolders"
        )
    saes: dict[str, SparseAutoencoder] = {}
    for sub in subfolders:
        (site, sae), *_ = load_saes(sub, device).items()
        if site in saes:
            raise UserError(f"two SAEs for site {site} under {path}; pass one SAE folder")
        saes[site] = sae
    return saes


def _load_own(folder: Path) -> SparseAutoencoder:
    """An interlayer SAE folder; every tensor's shape is checked against ``cfg.json``."""
    cfg = config_from_json(read_json(folder / CFG_FILE, "SAE config"), source=str(folder / CFG_FILE))
    tensors = read_tensors(folder / WEIGHTS_FILE, "SAE weights")
    sae = build_sae(cfg)
    for name, want in sae.file_tensors().items():  # every shape against cfg.json, naming file and dimension
        checked_tensor(tensors, name, tuple(want.shape), folder / WEIGHTS_FILE, implied_by="cfg.json")
    try:
        sae.load_file_tensors_(tensors)
    except UserError as exc:
        raise UserError(f"{folder / WEIGHTS_FILE}: {exc}") from None
    return sae.eval().requires_grad_(False)
