"""Checks of a LIMe folder before its weights load, so that a wrong file ends in one line that names it.

A LIMe checkpoint is a transformers folder whose ``config.json`` has ``model_type: lime``; its router
tensors (``model.layers.{r}.self_attn.router.weight``, r ≥ 1) must be [R, (r+1)·R] for the config's R
kv-heads, and a ``dynamic`` config needs the dynamic router's weights (``...router.dynamic.weight``,
[R·(r+1)·R, d]). Tensor shapes are read from the safetensors headers only (nothing is loaded, nothing
unpickled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from interlayer.errors import UserError
from interlayer.lime.configuration import ROUTERS


def read_config(folder: Path, name: str) -> dict[str, Any]:
    """The folder's ``config.json`` as a dictionary (one clear line when it is not JSON)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{name}: config.json could not be read ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{name}: config.json is not a JSON object")
    return config


def require_lime(folder: Path, name: str) -> dict[str, Any]:
    """The config of ``folder`` if it is a LIMe checkpoint; one line naming its architecture otherwise."""
    config = read_config(folder, name)
    if config.get("model_type") != "lime":
        kind = config.get("model_type", "unknown")
        raise UserError(
            f"{name} is a {kind} checkpoint, not a LIMe one (config.json model_type must be 'lime')"
        )
    return config


def _tensor_shapes(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor's (file, shape) from the folder's safetensors files."""
    shapes: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has keys(), not __iter__)
                shapes[key] = (path.name, list(handle.get_slice(key).get_shape()))
    return shapes


def check_router_shapes(folder: Path, name: str, config: dict[str, Any]) -> None:
    """Refuse a folder whose router tensors do not match its config (shape, or static vs dynamic)."""
    layers = int(config.get("num_hidden_layers", 0))
    kv_heads = int(config.get("num_key_value_heads") or config.get("num_attention_heads") or 0)
    hidden = int(config.get("hidden_size", 0))
    dynamic = config.get("lime_router", "static") == "dynamic"
    shapes = _tensor_shapes(folder)
    if not shapes:
        raise UserError(f"{name}: no .safetensors weights in {folder}")
    for layer in range(1, layers):
        prefix = f"model.layers.{layer}.self_attn.router"
        wanted = {f"{prefix}.weight": [kv_heads, (layer + 1) * kv_heads]}
        if dynamic:
            wanted[f"{prefix}.dynamic.weight"] = [kv_heads * (layer + 1) * kv_heads, hidden]
        for key, shape in wanted.items():
            if key not in shapes:
                what = "a dynamic-router" if key.endswith("dynamic.weight") else "a LIMe"
                raise UserError(
                    f"{name}: {key} is missing, so this is not {what} checkpoint "
                    f"(config lime_router={config.get('lime_router', 'static')!r})"
                )
            file, found = shapes[key]
            if found != shape:
                raise UserError(
                    f"{name}: {file} holds {key} of shape {found}, but the config ({layers} layers, "
                    f"{kv_heads} kv-heads) needs {shape}"
                )


def check_folder(folder: Path, name: str, lime_router: str | None = None) -> dict[str, Any]:
    """All checks of a local LIMe folder; ``lime_router`` (when given) must be the checkpoint's router kind."""
    config = require_lime(folder, name)
    stored = config.get("lime_router", "static")
    if stored not in ROUTERS:
        raise UserError(
            f"{name}: config.json lime_router must be one of {', '.join(ROUTERS)}, not {stored!r}"
        )
    if lime_router is not None and lime_router != stored:
        raise UserError(
            f"{name} has {stored} routers; the {lime_router} router option needs a checkpoint trained with "
            f"{lime_router} routers (lime train --architectures lime-dynamic)"
        )
    check_router_shapes(folder, name, config)
    return config
