"""Where a run's activation chunks come from: a model run on text, or an activation cache on disk.

Every capability that consumes activations (SAE training, and the methods after it) takes an
:class:`ActivationSource`; the run folder records its ``settings`` so that a resumed run can check it reads
the same stream.
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
    lm: LoadedModel, sites: str, data: str, plan: ChunkPlan, dtype: str = "float32"
) -> ActivationSource:
    """Chunks computed by running ``lm`` on ``data`` and capturing ``sites``."""
    site_objs = resolve_sites(lm.model, sites)
    by_name = {site.name: site for site in site_objs}

    def site_chunks(names: Sequence[str], start: int, deal: ProcessGroup) -> Iterator[Chunk]:
        return model_chunks(lm, [by_name[name] for name in names], data, plan, start=start, deal=deal)

    names = [s.name for s in site_objs]
    settings = {
        "model": lm.name,
        "data": data,
        "data_fingerprint": corpus_fingerprint(data),
        "sites": names,
        "plan": asdict(plan),
        "dtype": dtype,
    }
    return ActivationSource(names, lm.name, site_objs[0].width, site_chunks, settings)


def cache_source(folder: str | Path, sites: str | None) -> ActivationSource:
    """Chunks read back from an activation cache."""
    cache = ActivationCache(folder)
    names = match_site_names(cache.sites, "**" if sites is None else sites)
    settings = {"activations": str(Path(folder).resolve()), "sites": names}
    return ActivationSource(
        names,
        str(cache.manifest["model"]),
        cache.width,
        lambda site_names, start, _deal: cache.chunks(start, site_names),  # every rank reads the shards
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
