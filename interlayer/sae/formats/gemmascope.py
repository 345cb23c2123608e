"""Gemma Scope ``params.npz`` (Google DeepMind's JumpReLU SAEs): read.

The file holds ``W_enc`` [d, F], ``W_dec`` [F, d], ``b_enc`` [F], ``b_dec`` [d] and ``threshold`` [F]; Gemma
Scope encodes pre = x W_enc + b_enc (b_dec is *not* subtracted), z = ReLU(pre) · 1[pre > θ], and decodes
x̂ = z W_dec + b_dec. Read as interlayer ``jumprelu`` with W_enc transposed and b_enc ← b_enc + W_enc b_dec,
which gives the same pre-activations for every x. The file is opened with ``allow_pickle=False``: an object
array is refused, never unpickled. The hub layout ``<repo>/layer_N/width_…/average_l0_…/params.npz`` of the
``…-res`` and ``…-mlp`` releases names the site (``layers.N``, ``layers.N.mlp``) when the path shows it.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from interlayer.errors import UserError
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.formats.common import assemble, b_enc_without_input_bias, checked_tensor

PARAMS_FILE = "params.npz"
ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def is_gemmascope(folder: Path) -> bool:
    """Whether ``folder`` holds a ``params.npz``."""
    return (folder / PARAMS_FILE).is_file()


def read_npz(file: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The arrays ``names`` of an ``.npz`` (those it has) as tensors, read without unpickling anything."""
    if not zipfile.is_zipfile(file):
        raise UserError(f"{file} is not a readable .npz file (not a zip archive)")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: np.array(npz[name]) for name in names if name in npz.files}
    except ValueError as exc:  # numpy's refusal of object arrays under allow_pickle=False
        raise UserError(
            f"{file} holds object arrays ({exc}); interlayer reads numeric arrays only and never unpickles"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{file} is not a readable .npz file: {exc}") from None
    for name, array in arrays.items():
        if array.dtype.kind not in "fiu":
            raise UserError(f"{file}: array {name!r} has dtype {array.dtype}, not a number type")
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def read_gemmascope(folder: Path, hub_path: str = "") -> SparseAutoencoder:
    """The JumpReLU SAE in ``folder/params.npz``; ``hub_path`` (``owner/repo/layer_N/…``) names its site."""
    file = folder / PARAMS_FILE
    arrays = read_npz(file, ARRAYS)
    missing = [name for name in ARRAYS if name not in arrays]
    if missing:
        raise UserError(
            f"{file} lacks the array(s) {', '.join(missing)}; a Gemma Scope file has {', '.join(ARRAYS)}"
        )
    if arrays["W_enc"].dim() != 2:
        raise UserError(
            f"{file}: W_enc must be 2-dimensional [d, F], got shape {tuple(arrays['W_enc'].shape)}"
        )
    d, F = arrays["W_enc"].shape
    W_enc_FD = checked_tensor(arrays, "W_enc", (d, F), file).T.contiguous()
    b_dec_D = checked_tensor(arrays, "b_dec", (d,), file)
    tensors = {
        "W_enc": W_enc_FD,
        "b_enc": b_enc_without_input_bias(W_enc_FD, checked_tensor(arrays, "b_enc", (F,), file), b_dec_D),
        "W_dec": checked_tensor(arrays, "W_dec", (F, d), file),
        "b_dec": b_dec_D,
        "threshold": checked_tensor(arrays, "threshold", (F,), file).clamp_min(
            0
        ),  # θ < 0 acts as 0 under the ReLU
    }
    if "transcoder" in (hub_path or str(folder)):
        raise UserError(
            f"{file} is a Gemma Scope transcoder (it maps an MLP's input to its output), which interlayer's "
            "SAEs do not represent"
        )
    site, source_site = _site_from_path(hub_path or str(folder))
    return assemble(
        "jumprelu",
        tensors,
        file,
        d_in=int(d),
        latents=int(F),
        site=site,
        source_format="gemmascope",
        source_site=source_site,
    )


def _site_from_path(path: str) -> tuple[str, str]:
    """(site, the path's hook description) from a Gemma Scope path such as ``…-pt-res/layer_20/…``."""
    layer = re.search(r"/layer_(\d+)(?:/|$)", path)
    kind = re.search(r"gemma-scope-[^/@]*-(res|mlp|att)(?:-canonical)?(?:@[^/]*)?(?:/|$)", path)
    if layer is None or kind is None:
        return "", ""
    hook = f"{kind.group(1)} layer {layer.group(1)}"
    if kind.group(1) == "att":  # attention SAEs read the heads' outputs before o_proj: no interlayer site
        return "", hook
    return f"layers.{layer.group(1)}" + (".mlp" if kind.group(1) == "mlp" else ""), hook
