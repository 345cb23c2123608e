"""What ``lime analyze`` and ``lime convert`` do, as functions: load, check, compute, write atomically."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from interlayer import atomic
from interlayer.data import packed_contexts
from interlayer.errors import UserError
from interlayer.lime.analysis import (
    dynamic_router_shares,
    expected_retrieved_layer,
    router_shares,
    value_entropy_per_layer,
)
from interlayer.lime.checkpoint import check_folder
from interlayer.lime.modeling import LimeForCausalLM
from interlayer.lime.report import write_analysis_report
from interlayer.models import load_model, resolve_model_source


def _lime_folder(name: str, dynamic: bool) -> None:
    """Refuse a model that is not a LIMe checkpoint (or not a dynamic one when ``dynamic``) in one line."""
    source, _ = resolve_model_source(name)
    folder = Path(source)
    if not folder.is_dir():  # a hub id: transformers downloads it; its model_type is checked after loading
        return
    check_folder(folder, name, "dynamic" if dynamic else None)


def analyze(
    model: str,
    out: Path,
    baseline: str = "",
    data: str = "stdlib:code",
    contexts: int = 64,
    context_len: int = 128,
    alpha: float = 0.5,
    dynamic: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """Value entropy per layer of ``model`` (and ``baseline``), its routers' shares and expected retrieved layer;
    writes ``out/report.html`` and ``out/analysis.json``."""
    if contexts < 1 or context_len < 2 or alpha < 0:
        raise UserError("--contexts must be ≥ 1, --context-len ≥ 2 and --alpha ≥ 0")
    _lime_folder(model, dynamic)
    lime = load_model(model, device=device)
    if not isinstance(lime.model, LimeForCausalLM):
        raise UserError(f"{model} is a {lime.model.config.model_type} model, not a LIMe one")
    if dynamic and lime.model.config.lime_router != "dynamic":
        raise UserError(f"{model} has static routers; --dynamic needs a checkpoint with dynamic routers")
    models = {"LIMe": lime}
    if baseline:
        models["baseline"] = load_model(baseline, device=device)
        if not models["baseline"].is_causal_lm:
            raise UserError(f"--baseline {baseline!r} is not a causal LM")
        vocab = (lime.model.config.vocab_size, models["baseline"].model.config.vocab_size)
        if vocab[0] != vocab[1]:
            raise UserError(
                f"--baseline {baseline!r} has a vocabulary of {vocab[1]} tokens, the LIMe model {vocab[0]}: "
                "compare models with the same tokenizer"
            )
    contexts_NT = packed_contexts(lime.tokenizer, data, "validation", context_len, contexts)
    entropy = {name: value_entropy_per_layer(m.model, contexts_NT, alpha) for name, m in models.items()}
    shares_LL = router_shares(lime.model)
    expected = expected_retrieved_layer(shares_LL)
    dynamic_LL = dynamic_router_shares(lime.model, contexts_NT) if dynamic else None
    out.mkdir(parents=True, exist_ok=True)
    report = write_analysis_report(
        out / "report.html",
        model,
        entropy,
        shares_LL.tolist(),
        expected,
        alpha,
        dynamic_LL.tolist() if dynamic_LL is not None else None,
    )
    table = [
        {"layer": layer}
        | {name: values[layer] if layer < len(values) else None for name, values in entropy.items()}
        | {"E_r": expected[layer]}
        for layer in range(len(expected))
    ]
    summary = {
        "model": model,
        "baseline": baseline or None,
        "data": data,
        "contexts": len(contexts_NT),
        "context_len": context_len,
        "alpha": alpha,
        "value_entropy": entropy,
        "router_shares": shares_LL.tolist(),
        "expected_layer": expected,
        "dynamic_router_shares": dynamic_LL.tolist() if dynamic_LL is not None else None,
        "table": table,
        "report": str(report),
    }
    atomic.write_json(out / "analysis.json", summary)
    return summary


def convert(model: str, out: Path, router: str = "static") -> dict[str, Any]:
    """Save ``model`` (a Llama-architecture causal LM) as a LIMe model with identity routers into ``out``."""
    if router not in ("static", "dynamic"):
        raise UserError(f"--router must be static or dynamic, not {router!r}")
    loaded = load_model(model)
    if loaded.model.config.model_type != "llama" or not loaded.is_causal_lm:
        raise UserError(
            f"{model} is a {loaded.model.config.model_type} model; lime convert takes a Llama one"
        )
    lime = LimeForCausalLM.from_llama(loaded.model, lime_router=router)
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    lime.save_pretrained(staging / "model")
    loaded.tokenizer.save_pretrained(staging / "model")
    out.mkdir(parents=True, exist_ok=True)
    atomic.swap_in(staging, out)
    routers = sum(p.numel() for n, p in lime.named_parameters() if ".router." in n)
    return {"model": str(out / "model"), "source": model, "router": router, "router_parameters": routers}
