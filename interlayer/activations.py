"""Activations at sites, streamed in deterministic chunks, and an on-disk cache of the same stream.

A *source chunk* is what ``batches_per_chunk`` model batches of packed contexts produce: for every site, the
activations of the kept (non-special) tokens, as a float32 [n, d] tensor (:func:`source_chunks`). The
documents come in the order fixed by the data seed (:func:`interlayer.data.iter_documents`), so source chunk
i always covers the same contexts, and a consumer resumes at it by skipping i·batches_per_chunk·batch_size
contexts (only tokenisation, no model work).

Mixing (:func:`mixed_chunks`): source chunks are grouped in *windows* of ``mix_chunks`` (M) consecutive
chunks, window w holding source chunks wM … wM+M−1 (the last window may be shorter). The rows of a window are
permuted together, by a generator seeded from (seed, w), and cut back into M output chunks with the row
counts of the source chunks: output chunk i has as many rows as source chunk i, drawn from the whole window.
So output chunk i depends only on (data, plan, seed, i); resuming at i recomputes its window (at most M−1
source chunks of extra model work). A window costs M chunks of memory (2·M while it is assembled).
:func:`model_chunks` gives the mixed stream. Consumers then shuffle within a chunk
(:func:`shuffled_batches`), by (seed, chunk index).

The cache (``interlayer activations cache``) writes *source* chunk i as ``shard_{i:05d}.safetensors`` (one
tensor per site) and then updates ``manifest.json``; both writes are atomic, so a killed run resumes at the
first missing shard. :class:`ActivationCache` reads it back, mixed on reading with the reader's seed and
window, so one cache serves any training seed.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from interlayer.atomic import read_json, read_tensors, write_json, write_tensors
from interlayer.data import iter_documents, token_batches
from interlayer.distributed import SINGLE, ProcessGroup
from interlayer.errors import UserError
from interlayer.models import LoadedModel
from interlayer.sites import Site, resolve_sites, run_to_sites

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ChunkPlan:
    """How text is cut into model batches and chunks."""

    context_len: int = 128
    """Tokens per packed context (including the model's special start/end tokens)."""
    batch_size: int = 32
    """Contexts per model forward pass."""
    batches_per_chunk: int = 8
    """Model batches per chunk."""
    mix_chunks: int = 4
    """Source chunks per mixing window (M, see the module docstring): each output chunk is drawn from M
    chunks' worth of contexts. Memory: M chunks held (2·M while a window is assembled), each about
    batches_per_chunk · batch_size · context_len · width · 4 bytes per site; a resume redoes up to M−1 chunks
    of model work. 1 mixes rows within a chunk only."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")

    def source_settings(self) -> dict[str, int]:
        """The fields that fix the source chunks (all but ``mix_chunks``): what an activation cache records."""
        settings = asdict(self)
        del settings["mix_chunks"]
        return settings


@dataclass
class Chunk:
    """The kept-token activations of one chunk, per site."""

    index: int
    acts: dict[str, torch.Tensor]

    @property
    def tokens(self) -> int:
        return next(iter(self.acts.values())).shape[0]


def check_finite(acts_ND: torch.Tensor, site: str, where: str) -> None:
    """Raise a :class:`UserError` naming the site and place when activations hold NaN or inf."""
    if not bool(torch.isfinite(acts_ND).all()):
        raise UserError(
            f"non-finite activations (NaN/inf) at site {site} in {where}; check the model's dtype or inputs"
        )


def model_chunks(
    lm: LoadedModel,
    sites: Sequence[Site],
    data: str,
    plan: ChunkPlan,
    split: str = "train",
    start: int = 0,
    deal: ProcessGroup = SINGLE,
    seed: int | None = 0,
) -> Iterator[Chunk]:
    """Mixed chunks ``start, start+1, …`` of activations of ``lm`` on ``data`` (ends when the data does):
    :func:`source_chunks` with documents in the order of ``seed``, mixed by :func:`mixed_chunks` in windows
    of ``plan.mix_chunks``. ``seed=None`` gives the unmixed source chunks of the fixed document order.

    With ``deal`` a group of W ranks, rank r runs only the model batches r, r+W, … of each chunk and the
    chunk is reassembled in batch order on every rank (every rank gets the single-process chunk, and mixes
    it identically).
    """

    def read(first: int) -> Iterator[Chunk]:
        return source_chunks(lm, sites, data, plan, split, first, deal, seed)

    if seed is None:
        return read(start)
    return mixed_chunks(read, start, plan.mix_chunks, seed)


@dataclass
class ModelBatch:
    """One model forward's inputs and which of its positions' activations are kept."""

    inputs: dict[str, torch.Tensor]
    """Keyword arguments of the model (``input_ids`` and ``attention_mask``, or ``input_values`` and ``attention_mask``)."""
    keep_BT: torch.Tensor
    """True at the positions kept: non-special tokens, or a clip's valid encoder frames."""


AUDIO_CLIPS = 4000
"""Clips per split of a synthesised speech set (``synth:digits``, ``synth:styles``) read for activations."""


def audio_batches(
    lm: LoadedModel, data: str, split: str, seed: int | None, batch_size: int
) -> Iterator[ModelBatch]:
    """Batches of ``batch_size`` clips of the speech data ``data`` (see :mod:`interlayer.speech.datasets`;
    :data:`AUDIO_CLIPS` clips of a synthesised set), in the order of a permutation drawn from ``seed`` (file
    order for None), each clip normalised and padded by the model's feature extractor; the kept positions are
    each clip's valid encoder frames (the convolutional feature encoder's output lengths)."""
    from interlayer.audio import feature_batch, frame_lengths
    from interlayer.speech.datasets import load_speech  # a capability above the core: imported when needed

    speech = load_speech(data, split, AUDIO_CLIPS if data.startswith("synth:") else 0)
    if not len(speech):
        raise UserError(f"{data}: no {split} clips")
    order = list(range(len(speech)))
    if seed is not None:
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    for first in range(0, len(order), batch_size):
        waves = [speech.waves[i] for i in order[first : first + batch_size]]
        input_values, attention_mask = feature_batch(lm.feature_extractor, waves)
        lengths_B = frame_lengths(lm.model, attention_mask.sum(-1))
        frames = int(frame_lengths(lm.model, torch.tensor(input_values.shape[1])))
        keep_BT = torch.arange(frames)[None] < lengths_B[:, None]
        inputs = {"input_values": input_values}
        if getattr(lm.feature_extractor, "return_attention_mask", True):
            inputs["attention_mask"] = attention_mask
        yield ModelBatch(inputs, keep_BT)


def source_chunks(
    lm: LoadedModel,
    sites: Sequence[Site],
    data: str,
    plan: ChunkPlan,
    split: str = "train",
    start: int = 0,
    deal: ProcessGroup = SINGLE,
    seed: int | None = 0,
) -> Iterator[Chunk]:
    """Source chunks ``start, start+1, …`` (unmixed; see the module docstring) of ``lm`` on the documents of
    ``data`` in the order of ``seed`` (:func:`interlayer.data.iter_documents`), or for a speech encoder on the
    clips of :func:`audio_batches` (one clip per context, its valid frames kept); ``deal`` as in
    :func:`model_chunks`."""
    batches: Iterator[ModelBatch]
    if lm.is_speech:
        batches = audio_batches(lm, data, split, seed, plan.batch_size)
    else:
        docs = iter_documents(data, split=split, seed=seed)
        # a short last batch counts too: a corpus smaller than one batch still yields its tokens
        batches = (
            ModelBatch({"input_ids": b.input_ids_BT, "attention_mask": b.attention_mask_BT}, b.keep_BT)
            for b in token_batches(lm.tokenizer, docs, plan.context_len, plan.batch_size)
        )
    batches = itertools.islice(batches, start * plan.batches_per_chunk, None)
    for index in itertools.count(start):
        group = list(itertools.islice(batches, plan.batches_per_chunk))
        if not group:
            return
        parts: dict[str, list[torch.Tensor]] = {site.name: [] for site in sites}
        for batch in group[deal.rank :: deal.world]:
            inputs = {key: value.to(lm.device) for key, value in batch.inputs.items()}
            acts = run_to_sites(lm.model, sites, **inputs)
            keep = batch.keep_BT.to(lm.device)
            for name, tensor in acts.items():
                parts[name].append(tensor[keep].float())
        rows_per_batch = [int(batch.keep_BT.sum()) for batch in group]  # every rank read every batch
        acts_by_site = {
            site.name: _reassemble(parts[site.name], rows_per_batch, site.width, lm.device, deal)
            for site in sites
        }
        chunk = Chunk(index, acts_by_site)
        for name, tensor in chunk.acts.items():
            check_finite(tensor, name, f"chunk {index} of {data}")
        yield chunk


def window_seed(seed: int, window: int) -> int:
    """The generator seed of mixing window ``window``: the first 63 bits of ``sha256(f"mix:{seed}:{window}")``
    (apart from the ``(seed, chunk index)`` seeds of :func:`shuffled_rows`)."""
    return int.from_bytes(hashlib.sha256(f"mix:{seed}:{window}".encode()).digest()[:8], "big") >> 1


def mixed_chunks(
    read: Callable[[int], Iterator[Chunk]], start: int, mix_chunks: int, seed: int
) -> Iterator[Chunk]:
    """Output chunks ``start, start+1, …`` mixed from the source chunks ``read(j)`` yields (chunks j, j+1, …
    with consecutive indices).

    Window w holds source chunks wM … wM+M−1 (M = ``mix_chunks``; the last window may be shorter). Its rows,
    concatenated in chunk order, are permuted by ``torch.randperm`` with a generator seeded by
    :func:`window_seed` (seed, w), and cut in order into chunks with the source chunks' indices and row
    counts. Reading starts at the window of ``start``; earlier output chunks of that window are dropped.
    """
    if mix_chunks < 1:
        raise UserError(f"mix_chunks must be at least 1, got {mix_chunks}")
    first = start - start % mix_chunks
    source = read(first)
    while window := list(itertools.islice(source, mix_chunks)):
        yield from _mix_window(window, mix_chunks, seed, start)


def _mix_window(window: list[Chunk], mix_chunks: int, seed: int, start: int) -> Iterator[Chunk]:
    """The output chunks of one window with index ``start`` or above (see :func:`mixed_chunks`), each built
    when asked for. Empties ``window`` once its rows are concatenated, so that only the window's
    concatenation stays in memory."""
    indices = [chunk.index for chunk in window]
    counts = [chunk.tokens for chunk in window]
    if indices != list(range(indices[0], indices[0] + len(indices))) or indices[0] % mix_chunks:
        raise ValueError(f"a mixing window must hold consecutive chunks from a multiple of M, got {indices}")
    names = list(window[0].acts)
    rows = {name: torch.cat([chunk.acts[name] for chunk in window]) for name in names}
    window.clear()
    generator = torch.Generator().manual_seed(window_seed(seed, indices[0] // mix_chunks))
    order = torch.randperm(sum(counts), generator=generator)
    for index, part in zip(indices, order.split(counts), strict=True):
        if index >= start:
            yield Chunk(index, {name: tensor[part.to(tensor.device)] for name, tensor in rows.items()})


def _reassemble(
    mine: list[torch.Tensor], rows_per_batch: list[int], width: int, device: torch.device, deal: ProcessGroup
) -> torch.Tensor:
    """The rows of every batch of the chunk in batch order, when batch i (``rows_per_batch[i]`` rows) was
    computed by rank i mod W (``mine``: this rank's batches, in order)."""
    if deal.world == 1:
        return torch.cat(mine)
    local = torch.cat(mine) if mine else torch.zeros(0, width, device=device)
    per_rank = [
        rows.split(rows_per_batch[rank :: deal.world])
        for rank, rows in enumerate(deal.all_gather_rows(local))
    ]
    return torch.cat([per_rank[i % deal.world][i // deal.world] for i in range(len(rows_per_batch))])


def shuffled_rows(chunk: Chunk, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices of the chunk's full batches, in a random order fixed by (seed, chunk index); the ragged
    tail is dropped."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + chunk.index)
    order = torch.randperm(chunk.tokens, generator=generator)
    for start in range(0, chunk.tokens - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def shuffled_batches(chunk: Chunk, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of :func:`shuffled_rows`, as activations of every site of the chunk."""
    for rows in shuffled_rows(chunk, batch_size, seed):
        yield {name: tensor[rows.to(tensor.device)] for name, tensor in chunk.acts.items()}


def check_outlier_norm(outlier_norm: float) -> None:
    """A :class:`UserError` unless ``outlier_norm`` is 0 (off) or above 1."""
    if outlier_norm != 0 and not outlier_norm > 1:
        raise UserError(
            f"--outlier-norm must be 0 (off) or above 1 (a multiple of the median norm), got {outlier_norm}"
        )


def inlier_mask(acts_ND: torch.Tensor, outlier_norm: float) -> torch.Tensor:
    """Bool mask of the rows with ‖x‖ ≤ ``outlier_norm`` × median row norm (all rows when it is 0).

    High-norm tokens (attention sinks) dominate squared-error losses and the input scale; filtering them is
    optional. The median is the lower median (``torch.median``) over the rows given.
    """
    if outlier_norm <= 0 or acts_ND.shape[0] == 0:
        return torch.ones(acts_ND.shape[0], dtype=torch.bool, device=acts_ND.device)
    norms_N = acts_ND.norm(dim=1)
    return norms_N <= outlier_norm * norms_N.median()


class ActivationCache:
    """A cache folder written by :func:`cache_activations`, read back as its chunk stream."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_json(self.folder / MANIFEST, "activation cache manifest")
        missing = {"sites", "width", "shards", "model"} - set(self.manifest)
        if missing:
            raise UserError(
                f"{self.folder} is not an activation cache (its manifest lacks {', '.join(sorted(missing))})"
            )

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def width(self) -> int:
        return int(self.manifest["width"])

    def chunks(
        self,
        start: int = 0,
        sites: Sequence[str] | None = None,
        seed: int | None = None,
        mix_chunks: int = 1,
    ) -> Iterator[Chunk]:
        """Chunks ``start, start+1, …`` of the cache, holding ``sites`` (default: all cached sites): the
        stored source chunks as they are when ``seed`` is None, else mixed on reading by
        :func:`mixed_chunks` with ``seed`` and windows of ``mix_chunks`` shards (the same chunks
        :func:`model_chunks` gives with that window, when the cache was written with the same data seed)."""
        names = self.sites if sites is None else list(sites)
        if seed is None:
            return self._shard_chunks(start, names)
        return mixed_chunks(lambda first: self._shard_chunks(first, names), start, mix_chunks, seed)

    def _shard_chunks(self, start: int, names: list[str]) -> Iterator[Chunk]:
        """The stored chunks ``start, …`` holding the sites ``names``."""
        for shard in self.manifest["shards"][start:]:
            tensors = read_tensors(self.folder / shard["file"], "activation shard")
            lacking = set(names) - tensors.keys()
            if lacking:
                raise UserError(f"{self.folder / shard['file']} lacks site(s) {', '.join(sorted(lacking))}")
            chunk = Chunk(shard["index"], {name: tensors[name].float() for name in names})
            for name, tensor in chunk.acts.items():
                check_finite(tensor, name, f"chunk {chunk.index} of the cache {self.folder}")
            yield chunk

    def site_tensor(self, site: str, max_tokens: int | None = None) -> torch.Tensor:
        """All cached activations of one site, concatenated in stream order (up to ``max_tokens``)."""
        if site not in self.sites:
            raise UserError(
                f"site {site!r} is not in the cache {self.folder}; it has {', '.join(self.sites)}"
            )
        parts, total = [], 0
        for chunk in self.chunks():
            parts.append(chunk.acts[site])
            total += chunk.tokens
            if max_tokens is not None and total >= max_tokens:
                break
        return torch.cat(parts)[:max_tokens]


def cache_activations(
    lm: LoadedModel,
    site_patterns: Sequence[str],
    data: str,
    tokens: int,
    out: str | Path,
    plan: ChunkPlan,
    split: str = "train",
    on_chunk: Callable[[int], None] | None = None,
    seed: int | None = 0,
) -> ActivationCache:
    """Write at least ``tokens`` kept-token activations as shards of :func:`source_chunks` (documents in the
    order of ``seed``, rows unmixed: mixing happens on reading); rerunning resumes after the last shard.

    The manifest records the plan without ``mix_chunks`` and the document order as ``data_seed``; a cache
    written before ``data_seed`` existed (documents in sorted order) resumes only with ``seed=None``.
    """
    out = Path(out)
    sites = resolve_sites(lm.model, site_patterns)
    settings = {
        "model": lm.name,
        "data": data,
        "split": split,
        "sites": [s.name for s in sites],
        "plan": plan.source_settings(),
        "data_seed": seed,
    }
    manifest: dict[str, Any] = {
        **settings,
        "width": sites[0].width,
        "tokens": 0,
        "shards": [],
        "complete": False,
    }
    if (out / MANIFEST).exists():
        manifest = read_json(out / MANIFEST, "activation cache manifest")
        old = {key: manifest.get(key) for key in settings}
        if old != settings:
            raise UserError(
                f"{out} holds a cache made with other settings ({old}); choose a new --out folder"
            )
    pending = source_chunks(lm, sites, data, plan, split, start=len(manifest["shards"]), seed=seed)
    for chunk in pending if manifest["tokens"] < tokens else ():
        name = f"shard_{chunk.index:05d}.safetensors"
        write_tensors(out / name, chunk.acts)
        manifest["shards"].append({"index": chunk.index, "file": name, "tokens": chunk.tokens})
        manifest["tokens"] += chunk.tokens
        write_json(out / MANIFEST, manifest)
        if on_chunk is not None:
            on_chunk(chunk.tokens)
        if manifest["tokens"] >= tokens:
            break
    if manifest["tokens"] == 0:
        raise UserError(f"data {data} produced no tokens for the cache")
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    return ActivationCache(out)
