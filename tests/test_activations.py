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
    model_chunks,
    shuffled_batches,
)
from interlayer.atomic import write_tensors
from interlayer.errors import UserError
from interlayer.models import LoadedModel, load_model
from interlayer.sites import resolve_sites

PLAN = ChunkPlan(context_len=32, batch_size=2, batches_per_chunk=2)
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
    return list(model_chunks(lm, resolve_sites(lm.model, SITES), str(corpus), PLAN, split="all"))


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
    _assert_chunks_equal(list(model_chunks(lm, sites, str(corpus), PLAN, split="all")), chunks)
    resumed = list(model_chunks(lm, sites, str(corpus), PLAN, split="all", start=1))
    _assert_chunks_equal(resumed, chunks[1:])
    assert list(model_chunks(lm, sites, str(corpus), PLAN, split="all", start=len(chunks))) == []


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
    lm: LoadedModel, corpus: Path, chunks: list[Chunk], tmp_path: Path
) -> None:
    out = tmp_path / "cache"
    seen: list[int] = []
    cache = cache_activations(
        lm, ["layers.1", "embed"], str(corpus), 1, out, PLAN, split="all", on_chunk=seen.append
    )
    assert seen == [chunks[0].tokens]
    assert _shard_files(out) == ["shard_00000.safetensors"]
    assert cache.sites == list(SITES) and cache.width == 32
    assert cache.manifest["complete"] is True and cache.manifest["tokens"] == chunks[0].tokens
    _assert_chunks_equal(list(cache.chunks()), chunks[:1])

    first = out / "shard_00000.safetensors"
    first_bytes, first_mtime = first.read_bytes(), first.stat().st_mtime_ns
    target = chunks[0].tokens + chunks[1].tokens
    seen.clear()
    cache = cache_activations(lm, ["embed", "layers.1"], str(corpus), target, out, PLAN, "all", seen.append)
    assert seen == [chunks[1].tokens]  # resumed: chunk 0 was not recomputed
    assert _shard_files(out) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert first.stat().st_mtime_ns == first_mtime and first.read_bytes() == first_bytes
    assert cache.manifest["tokens"] == target
    _assert_chunks_equal(list(cache.chunks()), chunks[:2])
    _assert_chunks_equal(list(cache.chunks(start=1)), chunks[1:2])

    fresh = cache_activations(lm, list(SITES), str(corpus), target, tmp_path / "fresh", PLAN, "all")
    assert fresh.manifest == cache.manifest
    for name in _shard_files(out):
        assert (tmp_path / "fresh" / name).read_bytes() == (out / name).read_bytes()

    # More tokens than the data holds: every chunk is cached, then the stream ends.
    everything = cache_activations(lm, list(SITES), str(corpus), 10**9, out, PLAN, "all")
    assert everything.manifest["tokens"] == sum(c.tokens for c in chunks)
    assert len(_shard_files(out)) == len(chunks)
    _assert_chunks_equal(list(everything.chunks()), chunks)
    all_rows = torch.cat([c.acts["layers.1"] for c in chunks])
    assert torch.equal(everything.site_tensor("layers.1"), all_rows)
    assert torch.equal(everything.site_tensor("layers.1", max_tokens=5), all_rows[:5])

    manifest_bytes = (out / MANIFEST).read_bytes()
    for changed in (
        {"site_patterns": ["layers.0"]},
        {"plan": ChunkPlan(context_len=32, batch_size=4, batches_per_chunk=1)},
        {"split": "train"},
    ):
        kwargs = {"site_patterns": list(SITES), "plan": PLAN, "split": "all", **changed}
        with pytest.raises(UserError, match="other settings.*choose a new --out folder"):
            cache_activations(lm, data=str(corpus), tokens=10**9, out=out, **kwargs)
        assert (out / MANIFEST).read_bytes() == manifest_bytes


def test_cache_resumes_after_a_crash(
    lm: LoadedModel, corpus: Path, chunks: list[Chunk], tmp_path: Path
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
    _assert_chunks_equal(list(resumed.chunks()), chunks)


def test_cache_site_tensor_unknown_site(
    lm: LoadedModel, corpus: Path, chunks: list[Chunk], tmp_path: Path
) -> None:
    cache = cache_activations(lm, ["layers.1"], str(corpus), 1, tmp_path, PLAN, "all")
    assert cache.sites == ["layers.1"]
    assert torch.equal(cache.site_tensor("layers.1"), chunks[0].acts["layers.1"])
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
    lm: LoadedModel, corpus: Path, chunks: list[Chunk], tmp_path: Path
) -> None:
    cache = cache_activations(lm, list(SITES), str(corpus), 1, tmp_path, PLAN, "all")
    poisoned = {name: tensor.clone() for name, tensor in chunks[0].acts.items()}
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
