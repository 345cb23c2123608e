"""dictionary_learning (Marks et al.) ``ae.pt`` + ``config.json`` folders: read.

``ae.pt`` is a ``torch.save``d state dict; it is read with ``torch.load(weights_only=True)``, which refuses any
pickled object other than tensors and plain containers. ``config.json``'s ``trainer.dict_class`` names the
class (without a config, the state dict's keys decide). The classes, as their ``encode``/``decode`` compute:
    AutoEncoder             z = ReLU(E (x − bias) + e),            x̂ = D z + bias     → ``relu``
    AutoEncoderTopK         z = TopK_k(ReLU(E (x − b_dec) + e)),   x̂ = D z + b_dec    → ``topk``
    BatchTopKSAE            r = ReLU(E (x − b_dec) + e), z = r · 1[r > θ]          → ``batchtopk``
    MatryoshkaBatchTopKSAE  r = ReLU((x − b_dec) W_enc + b_enc), z = r · 1[r > θ]  → ``matryoshka``
    JumpReluAutoEncoder     p = x W_enc + b_enc, z = ReLU(p · 1[p > θ]), x̂ = z W_dec + b_dec → ``jumprelu``
with E = ``encoder.weight`` [F, d], e = ``encoder.bias``, D = ``decoder.weight`` [d, F] (so W_dec = Dᵀ),
``W_enc`` [d, F], ``W_dec`` [F, d]. JumpReluAutoEncoder does not subtract b_dec (b_enc ← b_enc + W_enc b_dec
here) and θ < 0 acts as 0 under its ReLU. Matryoshka's ``group_sizes`` become the prefixes (their cumulative
sums). An ``AutoEncoder`` whose decoder columns are not unit norm (trained with the April-update loss) is
normalised as its ``from_pretrained`` does: D's column f divided by its norm n_f, E's row f and e_f
multiplied by it, so x̂ is unchanged and the codes are the ones dictionary_learning reports.
``GatedAutoEncoder`` and other classes are refused.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from interlayer.atomic import read_json_object
from interlayer.errors import UserError
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.formats.common import assemble, b_enc_without_input_bias, checked_tensor, config_int
from interlayer.sae.formats.hooks import site_from_module

WEIGHTS_FILE = "ae.pt"
CFG_FILE = "config.json"
READS = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder")


def is_dictionary_learning(folder: Path) -> bool:
    """Whether ``folder`` holds an ``ae.pt``."""
    return (folder / WEIGHTS_FILE).is_file()


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict read with ``weights_only=True`` (nothing but tensors is unpickled)."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{file} holds more than tensors, or is damaged ({first}); interlayer loads it with "
            "torch.load(weights_only=True) and never unpickles other objects"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{file} is not a state dict of tensors")
    return state


def _trainer(cfg: Any) -> dict[str, Any]:
    """The ``trainer`` section of a dictionary_learning config ({} when absent)."""
    section = cfg.get("trainer") if isinstance(cfg, dict) else None
    return section if isinstance(section, dict) else {}


def _dict_class(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> str:
    """The dictionary_learning class: the config's ``trainer.dict_class``, else told by the state dict's keys."""
    trainer = _trainer(cfg)
    if trainer.get("dict_class"):
        return str(trainer["dict_class"])
    if "group_sizes" in state:
        return "MatryoshkaBatchTopKSAE"
    if "W_enc" in state:
        return "JumpReluAutoEncoder"
    if "k" in state:
        return "AutoEncoderTopK"
    return "AutoEncoder"


def read_dictionary_learning(folder: Path) -> SparseAutoencoder:
    """The SAE in a dictionary_learning folder (``ae.pt``, and ``config.json`` when present)."""
    file = folder / WEIGHTS_FILE
    state = read_state_dict(file)
    cfg = (
        read_json_object(folder / CFG_FILE, "dictionary_learning config")
        if (folder / CFG_FILE).is_file()
        else {}
    )
    dict_class = _dict_class(state, cfg)
    if dict_class not in READS:
        raise UserError(
            f"{file}: dictionary_learning class {dict_class!r} is not one interlayer reads ({', '.join(READS)})"
        )
    if "W_enc" in state:  # JumpReluAutoEncoder, MatryoshkaBatchTopKSAE: raw parameters, W_enc [d, F]
        if state["W_enc"].dim() != 2:
            raise UserError(f"{file}: W_enc must be [d, F], got shape {tuple(state['W_enc'].shape)}")
        d, F = state["W_enc"].shape
        W_enc_FD = checked_tensor(state, "W_enc", (d, F), file).T.contiguous()
        tensors = {"W_enc": W_enc_FD, "b_enc": checked_tensor(state, "b_enc", (F,), file)}
        tensors |= {
            "W_dec": checked_tensor(state, "W_dec", (F, d), file),
            "b_dec": checked_tensor(state, "b_dec", (d,), file),
        }
    else:
        if "encoder.weight" not in state or state["encoder.weight"].dim() != 2:
            raise UserError(f"{file} lacks a 2-dimensional 'encoder.weight' [F, d]")
        F, d = state["encoder.weight"].shape
        bias = "bias" if dict_class == "AutoEncoder" else "b_dec"
        tensors = {
            "W_enc": checked_tensor(state, "encoder.weight", (F, d), file),
            "b_enc": checked_tensor(state, "encoder.bias", (F,), file),
            "W_dec": checked_tensor(state, "decoder.weight", (d, F), file).T.contiguous(),
            "b_dec": checked_tensor(state, bias, (d,), file),
        }
    trainer = _trainer(cfg)
    hook = str(trainer.get("submodule_name") or "")  # str(): a wrong type in a foreign file is not a crash
    fields: dict[str, Any] = {
        "d_in": int(d),
        "latents": int(F),
        "site": _site(hook),
        "model": str(trainer.get("lm_name") or ""),
        "source_format": "dictionary_learning",
        "source_site": hook,
    }
    if dict_class == "AutoEncoder":  # as from_pretrained loads it: unit decoder rows, same reconstruction
        norms_F = tensors["W_dec"].norm(dim=1)
        if not torch.allclose(norms_F, torch.ones_like(norms_F)):
            tensors["W_dec"] = tensors["W_dec"] / norms_F[:, None]
            tensors["W_enc"], tensors["b_enc"] = (
                tensors["W_enc"] * norms_F[:, None],
                tensors["b_enc"] * norms_F,
            )
        return assemble("relu", tensors, file, **fields)
    if dict_class == "JumpReluAutoEncoder":
        tensors["b_enc"] = b_enc_without_input_bias(tensors["W_enc"], tensors["b_enc"], tensors["b_dec"])
        tensors["threshold"] = checked_tensor(state, "threshold", (int(F),), file).clamp_min(0)
        return assemble("jumprelu", tensors, file, **fields)
    k = _k(state, trainer, file)
    if dict_class == "AutoEncoderTopK":
        return assemble("topk", tensors, file, k=k, **fields)
    tensors["threshold"] = checked_tensor(state, "threshold", (), file)
    if dict_class == "BatchTopKSAE":
        return assemble("batchtopk", tensors, file, k=k, **fields)
    prefixes = tuple(int(p) for p in state["group_sizes"].cumsum(0)) if "group_sizes" in state else ()
    return assemble("matryoshka", tensors, file, k=k, prefixes=prefixes, **fields)


def _k(state: dict[str, torch.Tensor], trainer: dict[str, Any], file: Path) -> int:
    """k from the state dict's ``k`` buffer, else the config's ``trainer.k``."""
    if "k" in state:
        if state["k"].numel() != 1:
            raise UserError(f"{file}: 'k' must hold one number, got shape {tuple(state['k'].shape)}")
        return int(state["k"])
    return config_int(trainer, "k", file.parent / CFG_FILE)


def _site(hook: str) -> str:
    """The site of a dictionary_learning submodule name (``resid_post_layer_3`` or a module path)."""
    match = re.match(r"^(resid_post|mlp_out|attn_out)_layer_(\d+)$", hook)
    if match:
        return (
            f"layers.{match.group(2)}"
            + {"resid_post": "", "mlp_out": ".mlp", "attn_out": ".attn"}[match.group(1)]
        )
    return site_from_module(hook, "dictionary_learning")
