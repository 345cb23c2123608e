"""Wire a training run together: pick the activation source (a model or a cache), build one SAE config per
site, and hand both to :func:`interlayer.sae.trainer.train_saes`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from interlayer.activations import ActivationCache, Chunk, ChunkPlan, model_chunks
from interlayer.data import corpus_fingerprint
from interlayer.errors import UserError
from interlayer.models import LoadedModel, load_model
from interlayer.sae.config import SAEConfig
from interlayer.sae.trainer import SiteSummary, TrainConfig, train_saes
from interlayer.sites import match_site_names, resolve_sites

DEFAULT_SITES = "layers.*"


@dataclass
class ActivationSource:
    """Where a run's chunks come from, and what the run folder records about it."""

    sites: list[str]
    model: str
    width: int
    chunks: Callable[[int], Iterator[Chunk]]
    settings: dict[str, Any]


def model_source(
    lm: LoadedModel, sites: str, data: str, plan: ChunkPlan, dtype: str = "float32"
) -> ActivationSource:
    """Chunks computed by running ``lm`` on ``data`` and capturing ``sites``."""
    site_objs = resolve_sites(lm.model, sites)

    def chunks(start: int) -> Iterator[Chunk]:
        return model_chunks(lm, site_objs, data, plan, start=start)

    names = [s.name for s in site_objs]
    settings = {
        "model": lm.name,
        "data": data,
        "data_fingerprint": corpus_fingerprint(data),
        "sites": names,
        "plan": asdict(plan),
        "dtype": dtype,
    }
    return ActivationSource(names, lm.name, site_objs[0].width, chunks, settings)


def cache_source(folder: str | Path, sites: str | None) -> ActivationSource:
    """Chunks read back from an activation cache."""
    cache = ActivationCache(folder)
    names = match_site_names(cache.sites, "**" if sites is None else sites)
    settings = {"activations": str(Path(folder).resolve()), "sites": names}
    return ActivationSource(names, str(cache.manifest["model"]), cache.width, cache.chunks, settings)


def train_from_source(
    out: str | Path,
    source: ActivationSource,
    template: SAEConfig,
    train_cfg: TrainConfig,
    device: str = "cpu",
    on_step: Callable[[int, dict[str, SiteSummary]], None] | None = None,
) -> dict[str, Any]:
    """Train one SAE per site of ``source``, shaped like ``template`` (architecture, latents, k)."""
    sae_cfgs = {
        name: replace(template, d_in=source.width, site=name, model=source.model) for name in source.sites
    }
    return train_saes(
        out, source.chunks, sae_cfgs, train_cfg, source.settings, device=device, on_step=on_step
    )


def activation_source(
    *,
    model: str | None = None,
    sites: str | None = None,
    data: str = "stdlib:docs",
    activations: str | Path | None = None,
    plan: ChunkPlan = ChunkPlan(),
    device: str = "cpu",
    dtype: str = "float32",
) -> ActivationSource:
    """The cache ``activations`` when given, else ``model`` run on ``data`` (sites default to ``layers.*``)."""
    if activations is not None:
        return cache_source(activations, sites)
    if model is None:
        raise UserError("pass --model (with --data) or --activations to say where activations come from")
    return model_source(
        load_model(model, device=device, dtype=dtype),
        DEFAULT_SITES if sites is None else sites,
        data,
        plan,
        dtype,
    )
