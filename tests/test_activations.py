"""Tests for interlayer.activations: deterministic chunks, the shuffle, the on-disk cache and NaN checks."""

from __future__ import annotations

import collections
import difflib
import json
import random
from pathlib import Path

import pytest
import torch

from interlayer.activations import (
    MANIFEST,
    ActivationCache,
    Chunk,
    ChunkPlan,
    cache_activations,
    check_finite,
    mixed_chunks,
    model_chunks,
    shuffled_batches,
    source_chunks,
    window_seed,
)
from interlayer.atomic import write_tensors
from interlayer.errors import UserError
from interlayer.models import LoadedModel, load_model
from interlayer.sites import resolve_sites
from interlayer.sources import activation_source, model_source

PLAN = ChunkPlan(context_len=32, batch_size=2, batches_per_chunk=2, mix_chunks=3)
SITES = ("embed", "layers.1")
# The MiniLM tokenizer's special tokens: [PAD], [UNK], [CLS], [SEP], [MASK].
SPECIAL_IDS = {0, 100, 101, 102, 103}
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def lm(tiny_models: dict[str, Path]) -> LoadedModel:
    return load_model(str(tiny_models["llama"]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three English .txt files (stdlib module docstrings), about 600 tokens in all."""
    folder = tmp_path_factory.mktemp("corpus")
    for name, module in (("a_collections", collections), ("b_random", random), ("c_difflib", difflib)):
        (folder / f"{name}.txt").write_text(module.__doc__, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def chunks(lm: LoadedModel, corpus: Path) -> list[Chunk]:
    """The unmixed chunks of the documents in path order (``seed=None``)."""
    return list(model_chunks(lm, resolve_sites(lm.model, SITES), str(corpus), PLAN, split="all", seed=None))


@pytest.fixture(scope="module")
def seeded_source(lm: LoadedModel, corpus: Path) -> list[Chunk]:
    """The source chunks of the documents in the order of seed 0 (what a cache stores by default)."""
    return list(source_chunks(lm, resolve_sites(lm.model, SITES), str(corpus), PLAN, split="all", seed=0))


def _contexts(lm: LoadedModel, corpus: Path) -> list[list[int]]:
    """The packed contexts, rebuilt from the documented rule: [CLS] + 30 body tokens + [SEP], documents
    (one per file, sorted by name) tokenized without special tokens and joined by [SEP]."""
    stream: list[int] = []
    for index, path in enumerate(sorted(corpus.glob("*.txt"))):
        if index:
            stream.append(SEP)
        stream += lm.tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    body = PLAN.context_len - 2
    return [[CLS, *stream[i : i + body], SEP] for i in range(0, len(stream) - body + 1, body)]


def _assert_chunks_equal(left: list[Chunk], right: list[Chunk]) -> None:
    assert [c.index for c in left] == [c.index for c in right]
    for a, b in zip(left, right, strict=True):
        assert sorted(a.acts) == sorted(b.acts)
        for name in a.acts:
            assert torch.equal(a.acts[name], b.acts[name]), (a.index, name)


# ---------------------------------------------------------------- model_chunks


def test_chunks_are_deterministic_and_resume_exactly(
    lm: LoadedModel, corpus: Path, chunks: list[Chunk]
) -> None:
    contexts = _contexts(lm, corpus)
    per_chunk = PLAN.batch_size * PLAN.batches_per_chunk
    assert len(contexts) >= 12
    assert len(chunks) == len(contexts) // per_chunk
    assert [c.index for c in chunks] == list(range(len(chunks)))
    sites = resolve_sites(lm.model, SITES)
    _assert_chunks_equal(list(model_chunks(lm, sites, str(corpus), PLAN, split="all", seed=None)), chunks)
    resumed = list(model_chunks(lm, sites, str(corpus), PLAN, split="all", start=1, seed=None))
    _assert_chunks_equal(resumed, chunks[1:])
    assert list(model_chunks(lm, sites, str(corpus), PLAN, split="all", start=len(chunks), seed=None)) == []


def test_chunk_holds_the_kept_tokens_of_its_contexts(
    lm: LoadedModel, corpus: Path, chunks: list[Chunk]
) -> None:
    per_chunk = PLAN.batch_size * PLAN.batches_per_chunk
    contexts = _contexts(lm, corpus)
    for chunk in chunks:
        ids_BT = torch.tensor(contexts[chunk.index * per_chunk : (chunk.index + 1) * per_chunk])
        keep_BT = torch.tensor([[t not in SPECIAL_IDS for t in row] for row in ids_BT.tolist()])
        expected_tokens = sum(t not in SPECIAL_IDS for row in ids_BT.tolist() for t in row)
        assert chunk.tokens == expected_tokens == int(keep_BT.sum())
        assert expected_tokens <= per_chunk * (PLAN.context_len - 2)
        for name in SITES:
            assert chunk.acts[name].shape == (expected_tokens, 32)
            assert chunk.acts[name].dtype == torch.float32
        # The same forward passes, batch by batch, read through output_hidden_states.
        embeds, layer1 = [], []
        for start in range(0, per_chunk, PLAN.batch_size):
            ids = ids_BT[start : start + PLAN.batch_size]
            keep = keep_BT[start : start + PLAN.batch_size]
            hidden = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            embeds.append(hidden.hidden_states[0][keep])
            layer1.append(hidden.hidden_states[2][keep])
        torch.testing.assert_close(chunk.acts["embed"], torch.cat(embeds), atol=1e-6, rtol=0)
        torch.testing.assert_close(chunk.acts["layers.1"], torch.cat(layer1), atol=1e-6, rtol=0)
    # Three documents, two [SEP] separators inside bodies; they and [CLS]/[SEP] at the ends are dropped.
    seps_in_bodies = sum(row[1:-1].count(SEP) for row in contexts[: len(chunks) * per_chunk])
    assert seps_in_bodies == 2
    assert sum(c.tokens for c in chunks) == len(chunks) * per_chunk * 30 - 2


# ---------------------------------------------------------------- mixing


def _numbered_chunks(counts: list[int]) -> list[Chunk]:
    """Chunks whose rows hold their global row number (site "a") and its negative (site "b")."""
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    return [
        Chunk(
            i, {"a": torch.arange(o, o + n).float()[:, None], "b": -torch.arange(o, o + n).float()[:, None]}
        )
        for i, (o, n) in enumerate(zip(offsets, counts, strict=True))
    ]


def _row_ids(chunk: Chunk) -> list[int]:
    assert torch.equal(chunk.acts["a"], -chunk.acts["b"])  # every site is permuted alike
    return chunk.acts["a"][:, 0].long().tolist()


def test_mixed_chunks_permute_each_window_and_resume_exactly() -> None:
    counts = [5, 7, 6, 4, 9, 3, 8]  # windows of 3: chunks 0-2 (18 rows), 3-5 (16 rows), 6 (8 rows)
    source = _numbered_chunks(counts)
    reads: list[int] = []

    def read(first: int):
        reads.append(first)
        return iter(source[first:])

    mixed = list(mixed_chunks(read, 0, 3, seed=11))
    assert [c.index for c in mixed] == list(range(7)) and [c.tokens for c in mixed] == counts
    ids = [_row_ids(c) for c in mixed]
    windows = [(0, 18), (18, 34), (34, 42)]
    for (lo, hi), members in zip(windows, [ids[0:3], ids[3:6], ids[6:7]], strict=True):
        flat = [r for chunk in members for r in chunk]
        assert sorted(flat) == list(range(lo, hi))  # a permutation of the window's rows, nothing else
    # The documented rule: randperm of the window's rows with the generator seeded by window_seed(seed, w).
    order = torch.randperm(16, generator=torch.Generator().manual_seed(window_seed(11, 1)))
    assert [r for chunk in ids[3:6] for r in chunk] == (order + 18).tolist()
    # Output chunk 0 draws rows from every source chunk of its window.
    assert {next(i for i, o in enumerate([0, 5, 12]) if o <= r < o + counts[i]) for r in ids[0]} == {0, 1, 2}
    assert ids[6] != list(range(34, 42))  # the short last window is mixed too
    # Resuming at any chunk reads from the start of its window and gives the rest of the full pass.
    for start in range(8):
        reads.clear()
        resumed = list(mixed_chunks(read, start, 3, seed=11))
        assert [_row_ids(c) for c in resumed] == ids[start:]
        assert reads == [start - start % 3]
    assert [_row_ids(c) for c in mixed_chunks(read, 0, 3, seed=11)] == ids
    assert [_row_ids(c) for c in mixed_chunks(read, 0, 3, seed=12)] != ids
    # A window of 1 permutes within each chunk only.
    alone = [_row_ids(c) for c in mixed_chunks(read, 0, 1, seed=11)]
    offsets = [0, 5, 12, 18, 22, 31, 34]
    assert all(sorted(r) == list(range(o, o + n)) for r, o, n in zip(alone, offsets, counts, strict=True))
    with pytest.raises(UserError, match="mix_chunks must be at least 1, got 0"):
        list(mixed_chunks(read, 0, 0, seed=11))


def _sorted_rows(rows_ND: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, rows_ND.tolist()))


def test_model_chunks_mix_documents_and_windows(
    lm: LoadedModel, corpus: Path, chunks: list[Chunk], seeded_source: list[Chunk]
) -> None:
    sites = resolve_sites(lm.model, SITES)
    mixed = list(model_chunks(lm, sites, str(corpus), PLAN, split="all", seed=0))
    assert len(mixed) == len(chunks) == len(seeded_source) >= 4
    assert [c.index for c in mixed] == list(range(len(chunks)))
    assert [c.tokens for c in mixed] == [c.tokens for c in seeded_source]
    # Same seed: identical chunks; resuming at any chunk, even inside a window, gives the full pass's rest.
    _assert_chunks_equal(list(model_chunks(lm, sites, str(corpus), PLAN, split="all", seed=0)), mixed)
    for start in range(1, len(mixed) + 1):
        resumed = list(model_chunks(lm, sites, str(corpus), PLAN, split="all", start=start, seed=0))
        _assert_chunks_equal(resumed, mixed[start:])
    # Each window's rows are exactly the rows of its source chunks (the documents in seed 0's order) ...
    m = PLAN.mix_chunks
    for lo in range(0, len(mixed), m):
        for name in SITES:
            got = torch.cat([c.acts[name] for c in mixed[lo : lo + m]])
            want = torch.cat([c.acts[name] for c in seeded_source[lo : lo + m]])
            assert _sorted_rows(got) == _sorted_rows(want)
        # ... permuted alike in every site: the (embed, layers.1) row pairs are those of the source.
        pairs = [torch.cat([c.acts["embed"], c.acts["layers.1"]], 1) for c in mixed[lo : lo + m]]
        source_pairs = [
            torch.cat([c.acts["embed"], c.acts["layers.1"]], 1) for c in seeded_source[lo : lo + m]
        ]
        assert _sorted_rows(torch.cat(pairs)) == _sorted_rows(torch.cat(source_pairs))
    # The seeded document order is not the path order, and seed 1 gives other chunks.
    assert not torch.equal(seeded_source[0].acts["embed"], chunks[0].acts["embed"])
    assert not torch.equal(mixed[0].acts["layers.1"], seeded_source[0].acts["layers.1"])
    other = list(model_chunks(lm, sites, str(corpus), PLAN, split="all", seed=1))
    assert not torch.equal(other[0].acts["layers.1"], mixed[0].acts["layers.1"])


def test_sources_pass_the_seed_and_record_it(lm: LoadedModel, corpus: Path) -> None:
    source = model_source(lm, ",".join(SITES), str(corpus), PLAN, seed=4)
    assert source.settings["data_seed"] == 4 and source.settings["plan"]["mix_chunks"] == 3
    direct = model_chunks(lm, resolve_sites(lm.model, SITES), str(corpus), PLAN, split="train", seed=4)
    _assert_chunks_equal(list(source.chunks(1)), list(direct)[1:])


# ---------------------------------------------------------------- shuffled_batches


def _labelled_chunk(index: int, rows: int = 37) -> Chunk:
    """A chunk whose row r holds r everywhere (and -r in a second site), so a batch reveals its rows."""
    ids = torch.arange(rows, dtype=torch.float32)
    return Chunk(index, {"a": ids[:, None].repeat(1, 4), "b": -ids[:, None].repeat(1, 3)})


def _rows(chunk: Chunk, batch_size: int, seed: int) -> list[list[int]]:
    batches = list(shuffled_batches(chunk, batch_size, seed))
    for batch in batches:
        assert batch["a"].shape == (batch_size, 4) and batch["b"].shape == (batch_size, 3)
        # Both sites are indexed by the same rows.
        assert torch.equal(batch["a"][:, 0], -batch["b"][:, 0])
        assert torch.equal(batch["a"], batch["a"][:, :1].expand(-1, 4))
    return [batch["a"][:, 0].long().tolist() for batch in batches]


def test_shuffled_batches_are_a_seeded_permutation() -> None:
    chunk = _labelled_chunk(3)
    rows = _rows(chunk, 5, seed=7)
    assert len(rows) == 37 // 5 == 7
    flat = [r for batch in rows for r in batch]
    assert len(flat) == len(set(flat)) == 35
    assert set(flat) <= set(range(37))
    assert flat != sorted(flat)
    assert _rows(_labelled_chunk(3), 5, seed=7) == rows
    assert _rows(chunk, 5, seed=8) != rows
    assert _rows(_labelled_chunk(4), 5, seed=7) != rows
    # The order is the permutation itself: a different batch size regroups the same sequence.
    assert [r for batch in _rows(chunk, 7, seed=7) for r in batch] == flat[:35]
    assert list(shuffled_batches(chunk, 38, seed=7)) == []


def test_shuffled_batches_of_a_real_chunk(chunks: list[Chunk]) -> None:
    chunk = chunks[1]
    batches = list(shuffled_batches(chunk, 16, seed=0))
    assert len(batches) == chunk.tokens // 16
    got = torch.cat([b["layers.1"] for b in batches])
    # Each batch row is a distinct row of the chunk, and the embed row comes from the same token.
    matches = (got[:, None, :] == chunk.acts["layers.1"][None, :, :]).all(dim=-1)
    assert matches.sum(dim=1).tolist() == [1] * len(got)  # every row is exactly one chunk row
    rows = matches.int().argmax(dim=1)
    assert len(set(rows.tolist())) == len(rows)
    assert torch.equal(torch.cat([b["embed"] for b in batches]), chunk.acts["embed"][rows])
    again = torch.cat([b["layers.1"] for b in shuffled_batches(chunk, 16, seed=0)])
    assert torch.equal(got, again)


# ---------------------------------------------------------------- cache


def _shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("shard_*.safetensors"))


def test_cache_round_trip_resume_and_settings(
    lm: LoadedModel, corpus: Path, seeded_source: list[Chunk], tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    seen: list[int] = []
    cache = cache_activations(
        lm, ["layers.1", "embed"], str(corpus), 1, out, PLAN, split="all", on_chunk=seen.append
    )
    assert seen == [seeded_source[0].tokens]
    assert _shard_files(out) == ["shard_00000.safetensors"]
    assert cache.sites == list(SITES) and cache.width == 32
    assert cache.manifest["complete"] is True and cache.manifest["tokens"] == seeded_source[0].tokens
    _assert_chunks_equal(list(cache.chunks()), seeded_source[:1])

    first = out / "shard_00000.safetensors"
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns
    target = seeded_source[0].tokens + seeded_source[1].tokens
    seen.clear()
    cache = cache_activations(lm, ["embed", "layers.1"], str(corpus), target, out, PLAN, "all", seen.append)
    assert seen == [seeded_source[1].tokens]  # resumed: chunk 0 was not recomputed
    assert _shard_files(out) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert first.stat().st_mtime_ns == first_mtime and first.read_bytes() == first_bytes
    assert cache.manifest["tokens"] == target
    _assert_chunks_equal(list(cache.chunks()), seeded_source[:2])
    _assert_chunks_equal(list(cache.chunks(start=1)), seeded_source[1:2])

    fresh = cache_activations(lm, list(SITES), str(corpus), target, tmp_path / "fresh", PLAN, "all")
    assert fresh.manifest == cache.manifest
    for name in _shard_files(out):
        assert (tmp_path / "fresh" / name).read_bytes() == (out / name).read_bytes()

    # More tokens than the data holds: every chunk is cached, then the stream ends.
    everything = cache_activations(lm, list(SITES), str(corpus), 10**9, out, PLAN, "all")
    assert everything.manifest["tokens"] == sum(c.tokens for c in seeded_source)
    assert len(_shard_files(out)) == len(seeded_source)
    _assert_chunks_equal(list(everything.chunks()), seeded_source)
    all_rows = torch.cat([c.acts["layers.1"] for c in seeded_source])
    assert torch.equal(everything.site_tensor("layers.1"), all_rows)
    assert torch.equal(everything.site_tensor("layers.1", max_tokens=5), all_rows[:5])

    manifest_bytes = (out / MANIFEST).read_bytes()
    for changed in (
        {"site_patterns": ["layers.0"]},
        {"plan": ChunkPlan(context_len=32, batch_size=4, batches_per_chunk=1)},
        {"split": "train"},
        {"seed": 1},
        {"seed": None},
    ):
        kwargs = {"site_patterns": list(SITES), "plan": PLAN, "split": "all", **changed}
        with pytest.raises(UserError, match="other settings.*choose a new --out folder"):
            cache_activations(lm, data=str(corpus), tokens=10**9, out=out, **kwargs)
        assert (out / MANIFEST).read_bytes() == manifest_bytes
    # The window is applied on reading, so the cache is not tied to it: another mix_chunks resumes it.
    assert "mix_chunks" not in everything.manifest["plan"] and everything.manifest["data_seed"] == 0
    unmixed_plan = ChunkPlan(context_len=32, batch_size=2, batches_per_chunk=2, mix_chunks=1)
    again = cache_activations(lm, list(SITES), str(corpus), 10**9, out, unmixed_plan, "all")
    assert again.manifest == everything.manifest


def test_cache_is_mixed_on_reading_with_any_seed(
    lm: LoadedModel, corpus: Path, seeded_source: list[Chunk], tmp_path: Path
) -> None:
    cache = cache_activations(lm, list(SITES), str(corpus), 10**9, tmp_path, PLAN, "all")  # data seed 0
    _assert_chunks_equal(list(cache.chunks()), seeded_source)  # stored unmixed
    sites = resolve_sites(lm.model, SITES)
    from_model = list(model_chunks(lm, sites, str(corpus), PLAN, split="all", seed=0))
    # Read with the data seed and the same window, the cache gives exactly the model's mixed stream ...
    _assert_chunks_equal(list(cache.chunks(seed=0, mix_chunks=PLAN.mix_chunks)), from_model)
    # ... with any other seed, the stored chunks mixed by that seed, resumable at any chunk.
    full = list(cache.chunks(seed=9, mix_chunks=2))
    expected = list(mixed_chunks(lambda first: iter(seeded_source[first:]), 0, 2, seed=9))
    _assert_chunks_equal(full, expected)
    assert not torch.equal(full[0].acts["embed"], from_model[0].acts["embed"])
    for start in range(len(full)):
        _assert_chunks_equal(
            list(cache.chunks(start, ["layers.1"], seed=9, mix_chunks=2)),
            [Chunk(c.index, {"layers.1": c.acts["layers.1"]}) for c in full[start:]],
        )
    # A cache source reads it that way, with the seed and window it is given, and records them.
    source = activation_source(activations=tmp_path, plan=PLAN, seed=9)
    assert source.settings["data_seed"] == 9 and source.settings["mix_chunks"] == PLAN.mix_chunks
    _assert_chunks_equal(list(source.chunks()), list(cache.chunks(seed=9, mix_chunks=PLAN.mix_chunks)))


def test_cache_resumes_after_a_crash(
    lm: LoadedModel, corpus: Path, seeded_source: list[Chunk], tmp_path: Path
) -> None:
    out = tmp_path / "crashed"

    def crash_after_first(_tokens: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_activations(lm, list(SITES), str(corpus), 10**9, out, PLAN, "all", crash_after_first)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] is False
    assert [s["file"] for s in manifest["shards"]] == ["shard_00000.safetensors"]
    assert not list(out.glob(".*.tmp"))
    resumed = cache_activations(lm, list(SITES), str(corpus), 10**9, out, PLAN, "all")
    assert resumed.manifest["complete"] is True
    _assert_chunks_equal(list(resumed.chunks()), seeded_source)


def test_cache_site_tensor_unknown_site(
    lm: LoadedModel, corpus: Path, seeded_source: list[Chunk], tmp_path: Path
) -> None:
    cache = cache_activations(lm, ["layers.1"], str(corpus), 1, tmp_path, PLAN, "all")
    assert cache.sites == ["layers.1"]
    assert torch.equal(cache.site_tensor("layers.1"), seeded_source[0].acts["layers.1"])
    with pytest.raises(UserError, match=r"site 'layers\.2' is not in the cache .* it has layers\.1$"):
        cache.site_tensor("layers.2")
    with pytest.raises(UserError, match="not in the cache"):
        cache.site_tensor("embed")


def test_cache_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="activation cache manifest not found"):
        ActivationCache(tmp_path)


# ---------------------------------------------------------------- NaN checks


def test_check_finite_names_the_site() -> None:
    check_finite(torch.randn(4, 3), "layers.1", "chunk 0")  # finite: no error
    acts = torch.zeros(4, 3)
    acts[2, 1] = float("nan")
    with pytest.raises(UserError, match=r"NaN/inf\) at site layers\.1\.mlp in chunk 7 of data"):
        check_finite(acts, "layers.1.mlp", "chunk 7 of data")
    acts[2, 1] = float("-inf")
    with pytest.raises(UserError, match="at site embed in"):
        check_finite(acts, "embed", "somewhere")


def test_cache_with_nan_shard_is_refused(
    lm: LoadedModel, corpus: Path, seeded_source: list[Chunk], tmp_path: Path
) -> None:
    cache = cache_activations(lm, list(SITES), str(corpus), 1, tmp_path, PLAN, "all")
    poisoned = {name: tensor.clone() for name, tensor in seeded_source[0].acts.items()}
    poisoned["layers.1"][3, 0] = float("nan")
    write_tensors(tmp_path / "shard_00000.safetensors", poisoned)
    with pytest.raises(UserError, match=r"at site layers\.1 in chunk 0 of the cache"):
        list(ActivationCache(tmp_path).chunks())
    with pytest.raises(UserError, match=r"at site layers\.1"):
        cache.site_tensor("embed")


def test_chunk_plan_validation() -> None:
    with pytest.raises(UserError, match="batch_size must be at least 1, got 0"):
        ChunkPlan(batch_size=0)
    with pytest.raises(UserError, match="context_len must be at least 1, got -3"):
        ChunkPlan(context_len=-3)
    with pytest.raises(UserError, match="mix_chunks must be at least 1, got 0"):
        ChunkPlan(mix_chunks=0)
    assert ChunkPlan().mix_chunks == 4
