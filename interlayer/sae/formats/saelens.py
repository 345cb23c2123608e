"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``): read and write.

SAELens's inference SAEs, with sae_in = x − a·b_dec (a = ``apply_b_dec_to_input``), pre = sae_in W_enc + b_enc
(W_enc [d, F], W_dec [F, d]):
    standard:  z = ReLU(pre)                              → interlayer ``relu``
    topk:      z = ReLU(TopK_k(pre))                      → ``topk``
    jumprelu:  z = ReLU(pre) · 1[pre > θ]                 → ``jumprelu`` (θ < 0 read as 0: identical under the ReLU)
and x̂ = z W_dec + b_dec. SAELens saves its BatchTopK and Matryoshka SAEs for inference as ``jumprelu`` (θ the
learned batch threshold on every latent), so they arrive as JumpReLU; a folder saved from a BatchTopK or
Matryoshka *training* SAE (architecture ``batchtopk`` / ``matryoshka_batchtopk``, with a scalar
``topk_threshold``) is read as interlayer ``batchtopk``, whose inference is that same JumpReLU.

Exact rewrites into interlayer's convention (pre = W_enc (x − b_dec) + b_enc): a = 0 gives b_enc + W_enc b_dec;
``rescale_acts_by_decoder_norm`` (TopK on pre·‖W_dec_f‖, decoded with W_dec_f / ‖W_dec_f‖) multiplies encoder
row f and b_enc_f by ‖W_dec_f‖ and divides decoder row f by it; an old ``scaling_factor`` s (z·s decoded)
multiplies decoder row f by s_f. ``normalize_activations``: ``none`` reads as it is; ``expected_average_only_in``
with the factor s its trainer stored (``activation_scaler.json``, written beside mid-training checkpoints)
is folded in as SAELens's ``fit()`` folds it when training ends (W_enc·s, W_dec/s, b_dec/s: the SAE computes
decode(encode(s·x))/s, what it was trained to do), where ``SAE.load_from_disk`` would ignore the file; without
a stored factor it reads as it is, as SAELens does. The input-dependent ``constant_norm_rescale``,
``layer_norm`` and ``covariance_whitening`` are refused. Configs
written before SAELens 6 (``hook_point``, ``activation_fn_str``, ``activation_fn_kwargs.k``) are read too.

Written folders use SAELens 6's layout with ``apply_b_dec_to_input = true`` and no normalisation; SAEBench and
Neuronpedia read SAELens folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from interlayer import __version__
from interlayer.atomic import read_json_object, read_tensors, write_json, write_tensors
from interlayer.errors import UserError
from interlayer.sae.base import SparseAutoencoder
from interlayer.sae.formats.common import assemble, b_enc_without_input_bias, checked_tensor, config_int
from interlayer.sae.formats.hooks import saelens_hook, site_from_saelens

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
READS = ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk")
"""SAELens architectures this module reads."""
NORMALISATIONS_READ_AS_IS = ("none", "expected_average_only_in")


def is_saelens(folder: Path, cfg: dict[str, Any] | None) -> bool:
    """Whether ``folder`` is a SAELens folder: its weights file, or a cfg.json in SAELens's vocabulary."""
    return (folder / WEIGHTS_FILE).is_file() or (cfg is not None and "d_sae" in cfg)


def _saelens6_vocabulary(cfg: dict[str, Any]) -> dict[str, Any]:
    """A SAELens config in the 6.x vocabulary (older configs renamed the way SAELens itself renames them)."""
    cfg = dict(cfg)
    if "hook_point" in cfg:
        cfg.setdefault("hook_name", cfg.pop("hook_point"))
    if "activation_fn_str" in cfg:
        cfg.setdefault("activation_fn", cfg.pop("activation_fn_str"))
    metadata: dict[str, Any] = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    cfg["hook_name"] = metadata.get("hook_name", cfg.get("hook_name", ""))
    cfg["model_name"] = metadata.get("model_name", cfg.get("model_name", ""))
    kwargs = cfg.get("activation_fn_kwargs")
    cfg.setdefault("architecture", "standard")
    # as SAELens's handle_pre_6_0_config: a TopK activation makes a TopK SAE, whatever `architecture` says
    if cfg.get("activation_fn") == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def read_saelens(folder: Path) -> SparseAutoencoder:
    """The SAE in a SAELens folder, as one of interlayer's modules with the same codes and reconstruction."""
    cfg_file, weights_file = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = _saelens6_vocabulary(read_json_object(cfg_file, "SAELens config"))
    architecture = cfg["architecture"]
    if architecture not in READS:
        raise UserError(
            f"{cfg_file}: SAELens architecture {architecture!r} is not one interlayer reads "
            f"({', '.join(READS)})"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in NORMALISATIONS_READ_AS_IS:
        raise UserError(
            f"{cfg_file}: normalize_activations {norm!r} rescales each input by its own statistics, which "
            "interlayer's SAEs do not do; fold it into the activations first"
        )
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise UserError(f"{cfg_file}: unknown reshape_activations {cfg['reshape_activations']!r}")
    d, F = config_int(cfg, "d_in", cfg_file), config_int(cfg, "d_sae", cfg_file)
    raw = read_tensors(weights_file, "SAELens weights")
    W_enc_FD = checked_tensor(raw, "W_enc", (d, F), weights_file).T.contiguous()
    b_enc_F = checked_tensor(raw, "b_enc", (F,), weights_file)
    W_dec_FD = checked_tensor(raw, "W_dec", (F, d), weights_file)
    b_dec_D = checked_tensor(raw, "b_dec", (d,), weights_file)
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in raw:
            W_dec_FD = W_dec_FD * checked_tensor(raw, name, (F,), weights_file)[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc_F = b_enc_without_input_bias(W_enc_FD, b_enc_F, b_dec_D)
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms_F = W_dec_FD.norm(dim=1).clamp_min(1e-8)
        W_enc_FD, b_enc_F, W_dec_FD = (
            W_enc_FD * norms_F[:, None],
            b_enc_F * norms_F,
            W_dec_FD / norms_F[:, None],
        )
    scale = _stored_scaling_factor(folder) if norm == "expected_average_only_in" else None
    if scale is not None:  # what SAELens's fit() folds in at the end: encode(s·x), decode / s
        W_enc_FD, W_dec_FD, b_dec_D = W_enc_FD * scale, W_dec_FD / scale, b_dec_D / scale
    tensors = {"W_enc": W_enc_FD, "b_enc": b_enc_F, "W_dec": W_dec_FD, "b_dec": b_dec_D}
    fields: dict[str, Any] = {
        "d_in": d,
        "latents": F,
        "site": site_from_saelens(str(cfg["hook_name"] or "")),
        "model": str(cfg["model_name"] or ""),
        "source_format": "saelens",
        "source_site": str(cfg["hook_name"] or ""),
    }
    if architecture == "standard":
        return assemble("relu", tensors, weights_file, **fields)
    if architecture == "topk":
        return assemble("topk", tensors, weights_file, k=config_int(cfg, "k", cfg_file), **fields)
    if architecture == "jumprelu":
        tensors["threshold"] = checked_tensor(raw, "threshold", (F,), weights_file).clamp_min(0)
        return assemble("jumprelu", tensors, weights_file, **fields)
    tensors["threshold"] = checked_tensor(raw, "topk_threshold", (), weights_file)
    return assemble("batchtopk", tensors, weights_file, k=config_int(cfg, "k", cfg_file), **fields)


def _stored_scaling_factor(folder: Path) -> float | None:
    """s from a training checkpoint's ``activation_scaler.json`` (None when the folder has none)."""
    file = folder / SCALER_FILE
    if not file.is_file():
        return None
    value = read_json_object(file, "SAELens activation scaler").get("scaling_factor")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{file}: scaling_factor must be a positive number, got {value!r}")
    return float(value)


def write_saelens(sae: SparseAutoencoder, folder: Path) -> Path:
    """Write ``sae`` as a SAELens 6 folder (weights first, then the config; both atomic)."""
    architecture, extra, threshold_F = saelens_equivalent(sae)
    cfg = sae.cfg
    tensors = {
        "W_enc": sae.encoder_weight().detach().T,
        "b_enc": sae.file_tensors()["b_enc"],
        "W_dec": sae.W_dec_FD.detach(),
        "b_dec": sae.b_dec_D.detach(),
    }
    if threshold_F is not None:
        tensors["threshold"] = threshold_F
    write_tensors(folder / WEIGHTS_FILE, {n: t.float() for n, t in tensors.items()})
    hook = cfg.source_site if cfg.source_format == "saelens" and cfg.source_site else saelens_hook(cfg.site)
    write_json(
        folder / CFG_FILE,
        {
            "architecture": architecture,
            "d_in": cfg.d_in,
            "d_sae": cfg.latents,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            **extra,
            "metadata": {
                # SAELens reads configs without a version ≥ 6 as the older vocabulary
                "sae_lens_version": "6.0.0",
                "model_name": cfg.model,
                "hook_name": hook,
                "written_by": f"interlayer {__version__}",
            },
        },
    )
    return folder


def saelens_equivalent(sae: SparseAutoencoder) -> tuple[str, dict[str, Any], torch.Tensor | None]:
    """(SAELens architecture, its extra config keys, threshold [F] or None) computing the same codes as ``sae``."""
    arch, F = sae.cfg.architecture, sae.cfg.latents
    if arch == "relu":
        return "standard", {}, None
    if arch in ("topk", "hierarchical"):  # a HierarchicalTopK SAE's own inference is TopK at its K
        k = int(sae.cfg.k)  # type: ignore[attr-defined]
        return "topk", {"k": k, "rescale_acts_by_decoder_norm": False}, None
    if arch == "jumprelu":
        return "jumprelu", {}, sae.file_tensors()["threshold"]
    if arch in ("batchtopk", "matryoshka"):  # inference ReLU(pre)·1[pre > θ] with one θ: SAELens's own export
        return "jumprelu", {}, sae.file_tensors()["threshold"].expand(F).clone()
    raise UserError(
        f"a {arch} SAE cannot be written as a SAELens SAE: SAELens has no architecture that computes its "
        "codes (it reads standard, topk and jumprelu encoders with one dense W_enc)"
        + ("; export its base, and keep the boosted folder for interlayer" if arch == "boosted" else "")
    )
