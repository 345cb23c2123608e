"""EleutherAI sparsify folders (``cfg.json`` + ``sae.safetensors``, one per hook point; a run folder holds
one subfolder per hook point, named by it): read and write.

sparsify's TopK sparse coder: pre = encoder.weight (x − b_dec) + encoder.bias ([F, d] weight), z = the k
largest of ReLU(pre), x̂ = W_decᵀ z + b_dec with W_dec [F, d]: interlayer ``topk`` with the same tensors.
Refused, each with one line: ``activation = "groupmax"``, ``skip_connection`` (x̂ gains W_skip x, outside
an SAE's dictionary) and ``transcode`` (a transcoder maps a module's input to its output, which is not an
SAE's reconstruction). ``multi_topk`` changes only training and is read as TopK. Written folders hold a
TopK SAE (or a HierarchicalTopK one at its K) exactly as ``SparseCoder.save_to_disk`` writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interlayer.atomic import read_json_object, read_tensors, write_json, write_tensors
from interlayer.errors import UserError
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.formats.common import assemble, checked_tensor, config_int
from interlayer.sae.formats.hooks import site_from_module

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def is_sparsify(cfg: dict[str, Any]) -> bool:
    """Whether a ``cfg.json`` holding ``cfg`` is sparsify's rather than interlayer's (both weights files are
    called ``sae.safetensors``)."""
    return "latents" not in cfg and ("num_latents" in cfg or "expansion_factor" in cfg)


def read_sparsify(folder: Path) -> SparseAutoencoder:
    """The TopK SAE in a sparsify folder; its hook point is the folder's name."""
    cfg_file, weights_file = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json_object(cfg_file, "sparsify config")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise UserError(f"{cfg_file}: sparsify activation {activation!r} is not one interlayer reads (topk)")
    if cfg.get("transcode"):
        raise UserError(
            f"{cfg_file} is a transcoder (transcode: true): it maps a module's input to its output, which "
            "interlayer's SAEs do not represent"
        )
    if cfg.get("skip_connection"):
        raise UserError(
            f"{cfg_file} has a skip connection (x̂ gains W_skip·x), which interlayer's SAEs do not represent"
        )
    d = config_int(cfg, "d_in", cfg_file)
    F = cfg.get("num_latents") or d * config_int(cfg, "expansion_factor", cfg_file)
    F = config_int({"num_latents": F}, "num_latents", cfg_file)
    raw = read_tensors(weights_file, "sparsify weights")
    tensors = {
        "W_enc": checked_tensor(raw, "encoder.weight", (F, d), weights_file),
        "b_enc": checked_tensor(raw, "encoder.bias", (F,), weights_file),
        "W_dec": checked_tensor(raw, "W_dec", (F, d), weights_file),
        "b_dec": checked_tensor(raw, "b_dec", (d,), weights_file),
    }
    hookpoint = folder.resolve().name
    return assemble(
        "topk",
        tensors,
        weights_file,
        d_in=d,
        latents=F,
        k=config_int(cfg, "k", cfg_file),
        site=site_from_module(hookpoint),
        source_format="sparsify",
        source_site=hookpoint,
    )


def check_writable(sae: SparseAutoencoder) -> None:
    """A :class:`UserError` unless ``sae`` is TopK or HierarchicalTopK (sparsify's coders are TopK)."""
    if sae.cfg.architecture not in ("topk", "hierarchical"):
        raise UserError(
            f"a {sae.cfg.architecture} SAE cannot be written as a sparsify SAE: sparsify's sparse coders are "
            "TopK (export it --to saelens instead)"
        )


def write_sparsify(sae: SparseAutoencoder, folder: Path) -> Path:
    """Write ``sae`` (TopK, or HierarchicalTopK at its K) as a sparsify folder (weights first; both atomic)."""
    cfg = sae.cfg
    k = int(cfg.k)  # type: ignore[attr-defined]
    write_tensors(
        folder / WEIGHTS_FILE,
        {
            "encoder.weight": sae.encoder_weight().detach().float(),
            "encoder.bias": sae.file_tensors()["b_enc"].float(),
            "W_dec": sae.W_dec_FD.detach().float(),
            "b_dec": sae.b_dec_D.detach().float(),
        },
    )
    write_json(
        folder / CFG_FILE,
        {
            "activation": "topk",
            "expansion_factor": max(1, cfg.latents // cfg.d_in),
            "normalize_decoder": True,
            "num_latents": cfg.latents,
            "k": k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": cfg.d_in,
        },
    )
    return folder
