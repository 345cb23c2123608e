"""What every reader of another library's files shares: shape checks that name the file and the dimension,
and assembling one of interlayer's SAE modules from dense tensors.

Conventions of interlayer's SAEs (see :mod:`interlayer.sae.base`): pre = W_enc (x − b_dec) + b_enc with W_enc
[F, d] (one row per latent), x̂ = W_decᵀ z + b_dec with W_dec [F, d]. A library whose encoder reads x without
subtracting b_dec (pre = W_enc x + b_enc) is read exactly by b_enc ← b_enc + W_enc b_dec (computed in float64).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from interlayer.errors import UserError
from interlayer.sae.architectures import build_sae, make_config
from interlayer.sae.base import SparseAutoencoder


def checked_tensor(
    tensors: dict[str, torch.Tensor],
    name: str,
    shape: tuple[int, ...],
    file: Path,
    implied_by: str = "the config",
) -> torch.Tensor:
    """``tensors[name]`` as float32 after checking it is there and has ``shape`` (a :class:`UserError` naming
    the file, the tensor and the first differing dimension otherwise)."""
    if name not in tensors:
        raise UserError(
            f"{file} lacks the tensor {name!r} (it holds {', '.join(sorted(tensors)) or 'nothing'})"
        )
    got = tensors[name]
    if tuple(got.shape) != shape:
        dims = [d for d in range(max(got.dim(), len(shape))) if got.shape[d : d + 1] != shape[d : d + 1]]
        raise UserError(
            f"{file}: tensor {name!r} has shape {tuple(got.shape)} but {implied_by} implies {shape} "
            f"(dimension {dims[0]} differs)"
        )
    if not got.is_floating_point():
        raise UserError(f"{file}: tensor {name!r} has dtype {got.dtype}, not a floating-point type")
    return got.to(torch.float32)


def config_int(cfg: dict[str, Any], key: str, file: Path) -> int:
    """A positive whole number from a foreign config, or a :class:`UserError` naming the file and the key."""
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{file}: {key!r} must be a positive whole number, got {value!r}")
    return value


def b_enc_without_input_bias(
    W_enc_FD: torch.Tensor, b_enc_F: torch.Tensor, b_dec_D: torch.Tensor
) -> torch.Tensor:
    """b_enc + W_enc b_dec: the bias that makes W_enc (x − b_dec) + b' equal W_enc x + b_enc for every x."""
    return (b_enc_F.double() + W_enc_FD.double() @ b_dec_D.double()).float()


def assemble(
    architecture: str, tensors: dict[str, torch.Tensor], file: Path, **fields: Any
) -> SparseAutoencoder:
    """One of interlayer's SAEs of ``architecture`` holding ``tensors`` (interlayer's file names and layout:
    ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``), in inference mode; a value the config or the
    tensors refuse is a :class:`UserError` naming ``file``, the file they came from."""
    try:
        sae = build_sae(make_config(architecture, **fields))
        sae.load_file_tensors_(tensors)
    except UserError as exc:
        raise UserError(f"{file}: {exc}") from None
    return sae.eval().requires_grad_(False)
