"""The SAE folder format: ``cfg.json`` (the architecture's config) and ``sae.safetensors``.

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
from interlayer.sae.architectures import build_sae, config_from_json
from interlayer.sae.base import SparseAutoencoder

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


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE folder; a missing file, bad JSON or a tensor of the wrong shape is a :class:`UserError`."""
    folder = Path(folder)
    cfg = config_from_json(read_json(folder / CFG_FILE, "SAE config"), source=str(folder / CFG_FILE))
    tensors = read_tensors(folder / WEIGHTS_FILE, "SAE weights")
    sae = build_sae(cfg)
    for name, want in sae.file_tensors().items():
        if name not in tensors:
            raise UserError(f"{folder / WEIGHTS_FILE} lacks tensor {name!r}")
        got = tensors[name]
        if got.shape != want.shape:
            dims = [
                d for d in range(max(got.dim(), want.dim())) if got.shape[d : d + 1] != want.shape[d : d + 1]
            ]
            raise UserError(
                f"{folder / WEIGHTS_FILE}: tensor {name!r} has shape {tuple(got.shape)} but cfg.json implies "
                f"{tuple(want.shape)} (dimension {dims[0]} differs)"
            )
    try:
        sae.load_file_tensors_(tensors)
    except UserError as exc:
        raise UserError(f"{folder / WEIGHTS_FILE}: {exc}") from None
    return sae.to(device).eval().requires_grad_(False)
