"""Tests for interlayer.data: corpora, the split rule, packing and batching."""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import sysconfig
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from interlayer.data import (
    SHUFFLE_BUFFER,
    Document,
    buffer_shuffle,
    corpus_fingerprint,
    iter_documents,
    pack_contexts,
    seeded_order,
    token_batches,
)
from interlayer.errors import UserError
from interlayer.models import minilm_path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A second document, somewhat longer than the first one, with several words in it.",
    "Short.",
    "Tokenizers split text into pieces; models read the pieces and predict the next one.",
]


def is_validation(name: str, val_fraction: float = 0.1) -> bool:
    """The documented split rule, restated independently."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32 < val_fraction


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(str(minilm_path()))


@pytest.fixture(scope="module")
def causal_tokenizer():
    words = sorted(
        {w for t in TEXTS for w in pre_tokenizers.Whitespace().pre_tokenize_str(t) for w in [w[0]]}
    )
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<bos>", "<eos>", "<pad>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )


def test_stdlib_docs_split_disjoint_deterministic_and_union():
    def names(split: str, n: int) -> list[str]:
        return [d.name for d in itertools.islice(iter_documents("stdlib:docs", split, 0.5), n)]

    train, val, every = names("train", 6), names("validation", 6), names("all", 12)
    assert train == names("train", 6) and len(train) == len(val) == 6 and not set(train) & set(val)
    assert not any(is_validation(n, 0.5) for n in train) and all(is_validation(n, 0.5) for n in val)
    in_train = [n for n in every if not is_validation(n, 0.5)]
    in_val = [n for n in every if is_validation(n, 0.5)]
    assert in_train[:6] == train[: len(in_train)] and in_val[:6] == val[: len(in_val)]
    assert all(n.endswith(".py") and "site-packages" not in n and not n.startswith("test/") for n in every)


def test_stdlib_docs_and_code_contents():
    doc = next(iter_documents("stdlib:docs", "all"))
    code = next(iter_documents("stdlib:code", "all"))
    assert doc.name == code.name
    assert code.text == (Path(sysconfig.get_paths()["stdlib"]) / code.name).read_text(encoding="utf-8")
    tree = ast.parse(code.text)
    functions = [
        n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and ast.get_docstring(n)
    ]
    assert doc.text.split("\n\n")[0] == ast.get_docstring(tree).split("\n\n")[0]
    assert all(ast.get_docstring(n) in doc.text for n in functions)


def write_folder(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text\n\nsecond paragraph", encoding="utf-8")
    records = [{"text": "first record"}, {"id": 3, "body": "second record"}]
    (root / "sub" / "b.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8"
    )
    pq.write_table(pa.table({"id": [1, 2], "content": ["row zero", "row one"]}), root / "c.parquet")
    (root / "ignored.md").write_text("not read", encoding="utf-8")


def test_folder_reads_txt_jsonl_parquet_with_names(tmp_path):
    write_folder(tmp_path)
    docs = list(iter_documents(str(tmp_path), "all"))
    assert docs == [
        Document("a.txt", "alpha text\n\nsecond paragraph"),
        Document("c.parquet#0", "row zero"),
        Document("c.parquet#1", "row one"),
        Document("sub/b.jsonl#0", "first record"),
        Document("sub/b.jsonl#1", "second record"),
    ]


def test_folder_splits_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i}", encoding="utf-8")
    (tmp_path / "r.jsonl").write_text(
        "\n".join(json.dumps({"text": f"r{i}"}) for i in range(5)), encoding="utf-8"
    )
    spec = str(tmp_path)
    train = [d.name for d in iter_documents(spec, "train", 0.3)]
    val = [d.name for d in iter_documents(spec, "validation", 0.3)]
    every = [d.name for d in iter_documents(spec, "all", 0.3)]
    assert not set(train) & set(val) and sorted(train + val) == sorted(every) and len(every) == 45
    assert val == [n for n in every if is_validation(n.split("#")[0], 0.3)] and 0 < len(val) < 45
    records = [n for n in every if n.startswith("r.jsonl#")]
    assert set(records) <= set(train) or set(records) <= set(val)


def test_single_file_splits_by_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": f"record number {i}"}) for i in range(60)), encoding="utf-8"
    )
    train = list(iter_documents(str(path), "train", 0.25))
    val = list(iter_documents(str(path), "validation", 0.25))
    assert sorted(d.name for d in train + val) == sorted(f"data.jsonl#{i}" for i in range(60))
    assert [d.name for d in val] == [
        f"data.jsonl#{i}" for i in range(60) if is_validation(f"data.jsonl#{i}", 0.25)
    ]
    assert all(d.text == f"record number {d.name.split('#')[1]}" for d in train + val)
    txt = tmp_path / "notes.txt"
    txt.write_text("one para\nstill one\n\n  \ntwo\n\n\nthree\n", encoding="utf-8")
    assert [d.text.strip() for d in iter_documents(str(txt), "all")] == [
        "one para\nstill one",
        "two",
        "three",
    ]


# ---------------------------------------------------------------- seeded order


def test_seeded_order_is_the_documented_hash_sort():
    names = [f"file{i:02d}.txt" for i in range(30)]
    order = seeded_order(names, 5)
    assert order == sorted(names, key=lambda n: hashlib.sha256(f"5:{n}".encode()).hexdigest())
    assert sorted(order) == names and order != names
    assert seeded_order(names, 5) == order and seeded_order(names, 6) != order
    assert seeded_order(names, None) == names
    # A file keeps its place relative to the others when files are removed.
    assert seeded_order(names[::2], 5) == [n for n in order if n in names[::2]]


def test_buffer_shuffle_is_a_bounded_seeded_permutation():
    items = list(range(200))
    out = list(buffer_shuffle(items, 16, seed=3))
    assert sorted(out) == items and out != items
    assert list(buffer_shuffle(items, 16, seed=3)) == out
    assert list(buffer_shuffle(items, 16, seed=4)) != out
    # An item moves at most `buffer` places earlier (it is yielded after the buffer was filled past it).
    assert all(position >= item - 16 for position, item in enumerate(out))
    assert list(buffer_shuffle(items, 1, seed=3)) == items
    everything = list(buffer_shuffle(items, 500, seed=3))  # a buffer larger than the input: one shuffle
    assert sorted(everything) == items and everything[:20] != items[:20]
    with pytest.raises(UserError, match="shuffle_buffer must be at least 1, got 0"):
        list(buffer_shuffle(items, 0, seed=3))


def write_record_files(root: Path, files: int = 3, records: int = 20) -> None:
    for f in range(files):
        (root / f"part{f}.jsonl").write_text(
            "\n".join(json.dumps({"text": f"file {f} record {r}"}) for r in range(records)), encoding="utf-8"
        )


def test_seeded_documents_interleave_files_and_keep_the_split(tmp_path):
    write_record_files(tmp_path)
    spec = str(tmp_path)
    fixed = [d.name for d in iter_documents(spec, "all")]
    assert fixed == [f"part{f}.jsonl#{r}" for f in range(3) for r in range(20)]  # no seed: path order
    mixed = [d.name for d in iter_documents(spec, "all", seed=0)]
    assert sorted(mixed) == sorted(fixed) and mixed != fixed
    assert [d.name for d in iter_documents(spec, "all", seed=0)] == mixed
    assert [d.name for d in iter_documents(spec, "all", seed=1)] != mixed
    # Records of different files interleave: the file changes far more often than the 2 times of path order.
    files = [name.split("#")[0] for name in mixed]
    changes = sum(a != b for a, b in zip(files, files[1:], strict=False))
    assert changes > 20
    # The first documents come from every file, not only the first one.
    assert {name.split("#")[0] for name in mixed[:10]} == {f"part{f}.jsonl" for f in range(3)}
    # The split does not depend on the seed: a unit (here a file) is in the same split for every seed.
    for split in ("train", "validation"):
        plain = {d.name for d in iter_documents(spec, split, 0.4)}
        assert {d.name for d in iter_documents(spec, split, 0.4, seed=7)} == plain
    # A small buffer still keeps each record within `shuffle_buffer` places of its seeded-file-order spot.
    small = [d.name for d in iter_documents(spec, "all", seed=0, shuffle_buffer=4)]
    assert sorted(small) == sorted(fixed) and small != mixed
    with pytest.raises(UserError, match="shuffle_buffer must be at least 1"):
        iter_documents(spec, "all", seed=0, shuffle_buffer=0)


def test_seeded_single_file_records_are_shuffled(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"record {i}"}) for i in range(50)), encoding="utf-8")
    names = [d.name for d in iter_documents(str(path), "all", seed=2)]
    assert sorted(names) == sorted(f"data.jsonl#{i}" for i in range(50))
    assert names != [f"data.jsonl#{i}" for i in range(50)]
    assert SHUFFLE_BUFFER >= 50  # so one shuffle of the whole file, fixed by the seed:
    assert names == list(buffer_shuffle([f"data.jsonl#{i}" for i in range(50)], SHUFFLE_BUFFER, 2))


def test_seeded_stdlib_order_is_the_hash_order_of_its_files():
    fixed = [d.name for d in itertools.islice(iter_documents("stdlib:docs", "train"), 8)]
    seeded = [d.name for d in itertools.islice(iter_documents("stdlib:docs", "train", seed=0), 8)]
    assert seeded == [d.name for d in itertools.islice(iter_documents("stdlib:docs", "train", seed=0), 8)]
    assert seeded != fixed[:8] and seeded != [
        d.name for d in itertools.islice(iter_documents("stdlib:docs", "train", seed=1), 8)
    ]
    keys = [hashlib.sha256(f"0:{name}".encode()).digest() for name in seeded]
    assert keys == sorted(keys)  # no shuffle buffer for the stdlib: files in hash order
    assert not any(is_validation(n) for n in seeded)
    # Files from all over the library come first, not the first few in path order.
    assert len({n.split("/")[0] for n in seeded}) >= 4


def test_empty_data_raises(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n ", encoding="utf-8")
    with pytest.raises(UserError, match="no documents in split 'all'"):
        list(iter_documents(str(tmp_path), "all"))
    (tmp_path / "full.txt").write_text("text", encoding="utf-8")
    with pytest.raises(UserError, match="no documents in split 'validation'"):
        list(iter_documents(str(tmp_path), "validation", val_fraction=0.0))
    with pytest.raises(UserError, match="unknown split"):
        iter_documents(str(tmp_path), "test")
    (tmp_path / "table.csv").write_text("text\nrow", encoding="utf-8")
    with pytest.raises(UserError, match="is not .txt, .jsonl or .parquet"):
        iter_documents(str(tmp_path / "table.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError, match="record 1 is not a JSON object"):
        list(iter_documents(str(tmp_path / "bad.jsonl"), "all"))


def test_missing_path_and_unreachable_dataset_raise_quickly(monkeypatch):
    start = time.perf_counter()
    with pytest.raises(UserError, match="data path not found: no/such/file.txt"):
        iter_documents("no/such/file.txt")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not found locally nor as a Hugging Face dataset"):
        iter_documents("nobody-here/no-such-dataset")
    assert time.perf_counter() - start < 20


def expected_stream(tokenizer, texts: list[str], separator: int) -> list[int]:
    stream: list[int] = []
    for i, text in enumerate(texts):
        stream += ([separator] if i else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
    return stream


def check_packing(tokenizer, texts, context_len, start, end, separator):
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    contexts = list(pack_contexts(tokenizer, docs, context_len))
    stream = expected_stream(tokenizer, texts, separator)
    body_len = context_len - len(start) - len(end)
    assert len(contexts) == len(stream) // body_len > 1
    for c in contexts:
        assert c.dtype == torch.int64 and c.shape == (context_len,)
        assert c[: len(start)].tolist() == start and c[context_len - len(end) :].tolist() == end
    bodies = [c[len(start) : context_len - len(end)].tolist() for c in contexts]
    assert sum(bodies, []) == stream[: len(contexts) * body_len]
    assert [c.tolist() for c in pack_contexts(tokenizer, docs, context_len)] == [c.tolist() for c in contexts]


def test_pack_contexts_bert(bert_tokenizer):
    t = bert_tokenizer
    check_packing(t, TEXTS * 3, 12, [t.cls_token_id], [t.sep_token_id], t.sep_token_id)


def test_pack_contexts_causal(causal_tokenizer):
    t = causal_tokenizer
    assert t.cls_token_id is None and t.bos_token_id == 1 and t.eos_token_id == 2
    check_packing(t, TEXTS * 3, 7, [1], [], 2)


def test_pack_contexts_rejects_short_data_and_tiny_context(bert_tokenizer):
    with pytest.raises(UserError, match="too few for one context"):
        list(pack_contexts(bert_tokenizer, [Document("a", "two words")], 64))
    with pytest.raises(UserError, match="leaves no room"):
        list(pack_contexts(bert_tokenizer, [Document("a", "two words")], 2))


def test_token_batches_shapes_and_keep_mask(bert_tokenizer):
    docs = [Document(str(i), t) for i, t in enumerate(TEXTS * 3)]
    contexts = torch.stack(list(pack_contexts(bert_tokenizer, docs, 10)))
    batches = list(token_batches(bert_tokenizer, docs, 10, batch_size=4))
    assert [b.input_ids_BT.shape[0] for b in batches] == [4] * (len(contexts) // 4) + [len(contexts) % 4]
    ids_BT = torch.cat([b.input_ids_BT for b in batches])
    assert torch.equal(ids_BT, contexts)
    special = set(bert_tokenizer.all_special_ids)
    for b in batches:
        assert b.attention_mask_BT.dtype == torch.int64 and bool((b.attention_mask_BT == 1).all())
        assert b.keep_BT.dtype == torch.bool
        assert b.keep_BT.tolist() == [[i not in special for i in row] for row in b.input_ids_BT.tolist()]
        assert not b.keep_BT[:, 0].any() and not b.keep_BT[:, -1].any()
    assert int(sum(b.keep_BT.sum() for b in batches)) == sum(
        i not in special for i in ids_BT.flatten().tolist()
    )
    dropped = list(token_batches(bert_tokenizer, docs, 10, batch_size=4, drop_last=True))
    assert [b.input_ids_BT.shape[0] for b in dropped] == [4] * (len(contexts) // 4)


def test_corpus_fingerprint(tmp_path):
    write_folder(tmp_path)
    spec = str(tmp_path)
    first = corpus_fingerprint(spec)
    assert first == corpus_fingerprint(spec) and len(first) == 16
    (tmp_path / "a.txt").write_text("changed and longer text", encoding="utf-8")
    assert corpus_fingerprint(spec) != first
    assert (
        corpus_fingerprint("stdlib:docs")
        == corpus_fingerprint("stdlib:docs")
        != corpus_fingerprint("stdlib:code")
    )
    assert corpus_fingerprint("owner/name") != corpus_fingerprint("owner/other")
