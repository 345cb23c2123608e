"""The SAE folder format: ``cfg.json`` (an :class:`SAEConfig`) and ``sae.safetensors``.

Tensor names: ``W_enc`` [F, d], ``b_enc`` [F], ``W_dec`` [F, d], ``b_dec`` [d], plus ``threshold`` [] for
BatchTopK. Saved weights read raw activations (any training-time input scale is folded in). Both files are
written atomically; loading reads JSON and safetensors only and checks every shape against the config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from interlayer.atomic import read_json, read_tensors, write_json, write_tensors
from interlayer.errors import UserError
from interlayer.sae.config import SAEConfig
from interlayer.sae.topk import SparseAutoencoder, build_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
_PARAM_NAMES = {
    "W_enc": "W_enc_FD",
    "b_enc": "b_enc_F",
    "W_dec": "W_dec_FD",
    "b_dec": "b_dec_D",
    "threshold": "threshold",
}


def state_tensors(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The SAE's tensors under their file names."""
    own = dict(sae.named_parameters()) | dict(sae.named_buffers())
    return {file_name: own[attr].detach() for file_name, attr in _PARAM_NAMES.items() if attr in own}


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``folder/cfg.json`` and ``folder/sae.safetensors`` (weights first, so a config never points at nothing)."""
    folder = Path(folder)
    write_tensors(folder / WEIGHTS_FILE, state_tensors(sae), metadata={"format": "interlayer-sae"})
    write_json(folder / CFG_FILE, sae.cfg.to_json())
    return folder


def folded_copy(sae: SparseAutoencoder) -> SparseAutoencoder:
    """A copy of ``sae`` whose weights read raw activations (training input scale folded in)."""
    out = build_sae(sae.cfg)
    out.load_state_dict(sae.state_dict())
    out.fold_input_scale_(sae.cfg.input_scale)
    return out


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE folder; a missing file, bad JSON or a tensor of the wrong shape is a :class:`UserError`."""
    folder = Path(folder)
    cfg = SAEConfig.from_json(read_json(folder / CFG_FILE, "SAE config"), source=str(folder / CFG_FILE))
    tensors = read_tensors(folder / WEIGHTS_FILE, "SAE weights")
    sae = build_sae(cfg)
    expected = state_tensors(sae)
    for name, want in expected.items():
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
    with torch.no_grad():
        for name, attr in _PARAM_NAMES.items():
            if name in expected:
                getattr(sae, attr).copy_(tensors[name])
    return sae.to(device).eval().requires_grad_(False)
