"""Where a run's activation chunks come from: a model run on text, or an activation cache on disk.

Every capability that consumes activations (SAE training, and the methods after it) takes an
:class:`ActivationSource`; the run folder records its ``settings`` so that a resumed run can check it reads
the same stream.

Data order: a source is built with the run's training ``seed``. A model source reads the documents in that
seed's order and mixes its chunks in windows of ``plan.mix_chunks``; a cache source mixes the stored chunks
on reading with the same seed and window (the cache's own document order was fixed when it was written).
Both record ``data_seed`` and ``mix_chunks`` in ``settings``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from interlayer.activations import ActivationCache, Chunk, ChunkPlan, model_chunks
from interlayer.data import corpus_fingerprint
from interlayer.distributed import SINGLE, ProcessGroup
from interlayer.errors import UserError
from interlayer.models import LoadedModel, load_model
from interlayer.sites import match_site_names, resolve_sites

DEFAULT_SITES = "layers.*"


@dataclass
class ActivationSource:
    """Where a run's chunks come from, and what the run folder records about it."""

    sites: list[str]
    model: str
    width: int
    site_chunks: Callable[[Sequence[str], int, ProcessGroup], Iterator[Chunk]]
    """``site_chunks(names, start, deal)``: chunks ``start, …`` holding the sites ``names`` only; a model
    source deals its model batches among the ranks of ``deal`` (:func:`interlayer.activations.model_chunks`)."""
    settings: dict[str, Any]

    def chunks(self, start: int = 0) -> Iterator[Chunk]:
        """Chunks ``start, …`` holding every site of the source."""
        return self.site_chunks(self.sites, start, SINGLE)


def model_source(
    lm: LoadedModel, sites: str, data: str, plan: ChunkPlan, dtype: str = "float32", seed: int = 0
) -> ActivationSource:
    """Chunks computed by running ``lm`` on ``data`` and capturing ``sites``: :func:`model_chunks` with
    documents in the order of ``seed`` and windows of ``plan.mix_chunks`` (pass the training seed)."""
    site_objs = resolve_sites(lm.model, sites)
    by_name = {site.name: site for site in site_objs}

    def site_chunks(names: Sequence[str], start: int, deal: ProcessGroup) -> Iterator[Chunk]:
        site_list = [by_name[name] for name in names]
        return model_chunks(lm, site_list, data, plan, start=start, deal=deal, seed=seed)

    names = [s.name for s in site_objs]
    settings = {
        "model": lm.name,
        "data": data,
        "data_fingerprint": corpus_fingerprint(data),
        "sites": names,
        "plan": asdict(plan),
        "dtype": dtype,
        "data_seed": seed,
    }
    return ActivationSource(names, lm.name, site_objs[0].width, site_chunks, settings)


def cache_source(
    folder: str | Path, sites: str | None, seed: int = 0, mix_chunks: int = ChunkPlan.mix_chunks
) -> ActivationSource:
    """Chunks read back from an activation cache, mixed on reading with ``seed`` (pass the training seed) in
    windows of ``mix_chunks`` shards (:meth:`ActivationCache.chunks`)."""
    cache = ActivationCache(folder)
    names = match_site_names(cache.sites, "**" if sites is None else sites)
    settings = {
        "activations": str(Path(folder).resolve()),
        "sites": names,
        "data_seed": seed,
        "mix_chunks": mix_chunks,
    }
    return ActivationSource(
        names,
        str(cache.manifest["model"]),
        cache.width,
        # every rank reads the shards and mixes them alike
        lambda site_names, start, _deal: cache.chunks(start, site_names, seed, mix_chunks),
        settings,
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
    seed: int = 0,
) -> ActivationSource:
    """The cache ``activations`` when given, else ``model`` run on ``data`` (sites default to ``layers.*``);
    either way the data order and mixing come from ``seed`` (pass the training seed) and
    ``plan.mix_chunks``."""
    if activations is not None:
        return cache_source(activations, sites, seed, plan.mix_chunks)
    if model is None:
        raise UserError("pass --model (with --data) or --activations to say where activations come from")
    return model_source(
        load_model(model, device=device, dtype=dtype),
        DEFAULT_SITES if sites is None else sites,
        data,
        plan,
        dtype,
        seed,
    )
