"""Text sources to token batches: local files, Hugging Face datasets and the embedded stdlib corpus.

A data ``spec`` names a corpus:

- ``stdlib:docs``: the docstrings of the running Python's standard library (English prose). The ``*.py``
  files under ``sysconfig.get_paths()["stdlib"]`` are walked in sorted order, skipping ``site-packages``,
  ``test``/``tests``, ``idlelib``, ``lib2to3`` and ``__pycache__``; files that fail to decode or parse are
  skipped. One document per file: its module, class and function docstrings (``ast.get_docstring``,
  cleaned) in source order, joined by blank lines; files without docstrings are skipped.
- ``stdlib:code``: the source text of the same files, one document per file.
- a local folder: recursively in sorted order, one document per ``*.txt`` file and one per record of each
  ``*.jsonl`` (field ``"text"``, else the first string field) and ``*.parquet`` file (column ``"text"``,
  else the first string column).
- a local file: its records (``.jsonl`` lines, ``.parquet`` rows, ``.txt`` paragraphs between blank lines).
- otherwise a Hugging Face dataset id ``owner/name`` or ``name``, optionally ``:config``, streamed.

Document names are stable ids: the path relative to the corpus root, ``file.jsonl#17`` for record 17
(0-based), ``hf:<id>#<row>`` for a dataset row (``hf:<id>@validation#<row>`` for the dataset's own
validation split).

Split rule: a unit (a file for folders and the stdlib, a record for a single file or dataset rows) is in
"validation" iff ``int(sha256(name)[:8], 16) / 2**32 < val_fraction``, else in "train"; "all" is both. A
dataset with its own "validation" split uses it instead. Documents whose text is only whitespace are skipped.
The split never depends on the seed below.

Order: without a seed (``seed=None``) documents come in the fixed order above. With an integer ``seed``
(:func:`iter_documents`), (1) the files of a folder or of the stdlib are read in the order of
``sha256(f"{seed}:{name}")`` (:func:`seeded_order`: a permutation fixed by the seed, and a file keeps its
place relative to the others when files are added or removed), then (2) except for the stdlib corpus (one
document per file, so already in a seeded order) the documents pass through a seeded shuffle buffer of
``shuffle_buffer`` documents (:func:`buffer_shuffle`), which interleaves the records of neighbouring files,
the records of a single file and the rows of a Hugging Face dataset. Document names, and so
the split, stay the same. (A dataset is not reshuffled with ``datasets``' own ``shuffle``: that renumbers the
rows, and the hashed split is by row number.)
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from interlayer.errors import UserError

SPLITS = ("train", "validation", "all")
_STDLIB_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
_SUFFIXES = (".txt", ".jsonl", ".parquet")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_TOKENIZE_GROUP = 64
SHUFFLE_BUFFER = 1024
"""Documents held by the shuffle buffer of :func:`iter_documents` when a seed is given."""


@dataclass(frozen=True)
class Document:
    """One text of a corpus."""

    name: str
    """Stable id: path relative to the corpus root, ``file.jsonl#17`` for a record, ``hf:<id>#<row>``."""
    text: str
    """The text itself."""


@dataclass(frozen=True)
class TokenBatch:
    """A batch of packed contexts, ready for a model."""

    input_ids_BT: torch.Tensor
    """Token ids, int64 [B, T]."""
    attention_mask_BT: torch.Tensor
    """int64 [B, T]; all ones for packed contexts."""
    keep_BT: torch.Tensor
    """bool [B, T]; False at the tokenizer's special tokens (BOS, CLS, SEP, EOS, PAD, UNK, ...)."""


def hash_fraction(key: str) -> float:
    """``key``'s sha256, its first 32 bits read as a fraction of 2**32: a fixed, uniform-looking number in
    [0, 1) that assigns a unit (file, question) to a split whatever the seed or order."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def _is_validation(key: str, val_fraction: float) -> bool:
    """The split rule: ``key`` is held out iff :func:`hash_fraction` of it is below ``val_fraction``."""
    return hash_fraction(key) < val_fraction


def _in_split(key: str, split: str, val_fraction: float) -> bool:
    """Whether the unit named ``key`` belongs to ``split``."""
    return split == "all" or _is_validation(key, val_fraction) == (split == "validation")


def seeded_order(names: Iterable[str], seed: int | None) -> list[str]:
    """``names`` sorted by ``sha256(f"{seed}:{name}")`` (ties, i.e. equal names, keep their order); with
    ``seed=None``, in the order given."""
    names = list(names)
    if seed is None:
        return names
    return sorted(names, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).digest())


def buffer_shuffle(items: Iterable[Any], buffer: int, seed: int) -> Iterator[Any]:
    """``items`` reordered by a shuffle buffer, the order fixed by ``seed`` and the input order.

    With ``rng = random.Random(seed)``: the first ``buffer`` items fill the buffer; each later item replaces
    the entry at ``rng.randrange(buffer)``, which is yielded; at the end the buffer is ``rng.shuffle``-d and
    yielded. An item moves at most ``buffer`` places earlier; memory is ``buffer`` items.
    """
    if buffer < 1:
        raise UserError(f"shuffle_buffer must be at least 1, got {buffer}")
    rng = random.Random(seed)
    held: list[Any] = []
    for item in items:
        if len(held) < buffer:
            held.append(item)
            continue
        slot = rng.randrange(buffer)
        yield held[slot]
        held[slot] = item
    rng.shuffle(held)
    yield from held


def _stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib root and its ``*.py`` files in sorted walk order, skipped folders pruned."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        files += [Path(folder, n) for n in sorted(names) if n.endswith(".py")]
    return root, files


def _stdlib_documents(kind: str, split: str, val_fraction: float, seed: int | None) -> Iterator[Document]:
    """Docstrings (``kind == "docs"``) or source (``"code"``) of the stdlib files in ``split``, the files in
    :func:`seeded_order`."""
    root, files = _stdlib_files()
    for name in seeded_order((path.relative_to(root).as_posix() for path in files), seed):
        path = root / name
        if not _in_split(name, split, val_fraction):
            continue
        try:
            with tokenize.open(path) as f:
                source = f.read()
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if kind == "code":
            yield Document(name, source)
            continue
        defs = ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        nodes = sorted(
            (n for n in ast.walk(tree) if isinstance(n, defs)), key=lambda n: (n.lineno, n.col_offset)
        )
        docs = [d for n in [tree, *nodes] if (d := ast.get_docstring(n, clean=True))]
        if docs:
            yield Document(name, "\n\n".join(docs))


def _record_text(record: dict[str, Any], where: str) -> str:
    """The ``"text"`` field of a record, else its first string field."""
    if isinstance(record.get("text"), str):
        return record["text"]
    for value in record.values():
        if isinstance(value, str):
            return value
    raise UserError(f"{where} has no string field; give each record a 'text' field")


def _file_records(path: Path, name: str) -> Iterator[Document]:
    """The records of a .jsonl/.parquet file, or the paragraphs of a .txt file, named ``name#i``."""
    if path.suffix == ".txt":
        paragraphs = re.split(r"\n\s*\n", _read_text(path))
        yield from (Document(f"{name}#{i}", p) for i, p in enumerate(paragraphs))
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            lines = (line for line in f if line.strip())
            for i, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict):
                    raise UserError(
                        f"{path}: record {i} is not a JSON object; write one JSON object per line"
                    )
                yield Document(f"{name}#{i}", _record_text(record, f"{path}: record {i}"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except pa.ArrowInvalid as e:
            raise UserError(f"{path} is not a readable parquet file ({e}); rewrite it with pyarrow") from e
        fields = [f.name for f in parquet.schema_arrow if f.type in (pa.string(), pa.large_string())]
        if not fields:
            raise UserError(f"{path} has no string column; add a 'text' column")
        column = "text" if "text" in fields else fields[0]
        row = 0
        for batch in parquet.iter_batches(columns=[column]):
            for text in batch.column(0).to_pylist():
                yield Document(f"{name}#{row}", text or "")
                row += 1


def _read_text(path: Path) -> str:
    """A text file's contents as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8") from e


def _folder_files(root: Path) -> list[Path]:
    """The .txt/.jsonl/.parquet files under ``root``, recursively, in sorted order."""
    return sorted(p for p in root.rglob("*") if p.suffix in _SUFFIXES and p.is_file())


def _path_documents(path: Path, split: str, val_fraction: float, seed: int | None) -> Iterator[Document]:
    """Documents of a local folder (split by file, files in :func:`seeded_order`) or a single file (split by
    record)."""
    if path.is_file():
        for doc in _file_records(path, path.name):
            if _in_split(doc.name, split, val_fraction):
                yield doc
        return
    names = seeded_order((file.relative_to(path).as_posix() for file in _folder_files(path)), seed)
    for name in names:
        file = path / name
        if not _in_split(name, split, val_fraction):
            continue
        if file.suffix == ".txt":
            yield Document(name, _read_text(file))
        else:
            yield from _file_records(file, name)


def _hf_documents(spec: str, split: str, val_fraction: float) -> Iterator[Document]:
    """Rows of a streamed Hugging Face dataset; its own validation split if any, else hashed train rows."""
    import datasets

    dataset_id, _, config = spec.partition(":")
    try:
        splits = datasets.load_dataset(dataset_id, config or None, streaming=True)
    except (OSError, ValueError) as e:
        raise UserError(
            f"data {spec!r} was not found locally nor as a Hugging Face dataset ({type(e).__name__}: {e}); "
            "give an existing file or folder, stdlib:docs, stdlib:code, or a reachable dataset id"
        ) from e
    if "train" not in splits:
        raise UserError(f"dataset {spec!r} has no 'train' split, only {sorted(splits)}; use another dataset")
    own_validation = "validation" in splits
    sources = []
    if split != "validation" or not own_validation:
        sources.append(("train", f"hf:{spec}", not own_validation and split != "all"))
    if split != "train" and own_validation:
        sources.append(("validation", f"hf:{spec}@validation", False))
    return (
        Document(f"{prefix}#{row}", _record_text(record, f"{spec} row {row}"))
        for source, prefix, hashed in sources
        for row, record in enumerate(splits[source])
        if not hashed or _in_split(f"{prefix}#{row}", split, val_fraction)
    )


def _nonempty(docs: Iterator[Document], spec: str, split: str) -> Iterator[Document]:
    """Yield the documents with non-whitespace text; raise UserError once exhausted if there were none."""
    count = 0
    for doc in docs:
        if doc.text.strip():
            count += 1
            yield doc
    if count == 0:
        raise UserError(f"data {spec} has no documents in split {split!r}; add text or choose another split")


def iter_documents(
    spec: str,
    split: str = "train",
    val_fraction: float = 0.1,
    seed: int | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER,
) -> Iterator[Document]:
    """The documents of corpus ``spec`` in ``split`` ("train", "validation" or "all").

    ``seed=None`` gives the fixed order of the module docstring; an integer ``seed`` gives files in
    :func:`seeded_order` and then (but for the stdlib corpus) every document through :func:`buffer_shuffle`
    with ``shuffle_buffer`` documents, so the order depends only on (corpus, split, val_fraction, seed,
    shuffle_buffer). The split is the same for every seed.

    >>> next(iter_documents("stdlib:docs")).name  # doctest: +SKIP
    '__future__.py'
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not 0.0 <= val_fraction <= 1.0:
        raise UserError(f"val_fraction {val_fraction} is outside [0, 1]; pass a fraction such as 0.1")
    if spec.startswith("stdlib:"):
        kind = spec.removeprefix("stdlib:")
        if kind not in ("docs", "code"):
            raise UserError(f"unknown stdlib corpus {spec!r}; use stdlib:docs or stdlib:code")
        docs = _stdlib_documents(kind, split, val_fraction, seed)
    elif (path := Path(spec).expanduser()).exists():
        if path.is_file() and path.suffix not in _SUFFIXES:
            raise UserError(
                f"data file {spec} is not .txt, .jsonl or .parquet; convert it or give its folder"
            )
        docs = _path_documents(path, split, val_fraction, seed)
    elif not _HF_ID.match(spec) or spec.endswith((*_SUFFIXES, ".json", ".csv")):
        raise UserError(
            f"data path not found: {spec}; check the path, or give an HF dataset id or stdlib:docs"
        )
    else:
        docs = _hf_documents(spec, split, val_fraction)
    if seed is not None and not spec.startswith("stdlib:"):  # stdlib: one document per file, already mixed
        if shuffle_buffer < 1:
            raise UserError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        docs = buffer_shuffle(docs, shuffle_buffer, seed)
    return _nonempty(docs, spec, split)


def _token_streams(tokenizer: Any, documents: Iterable[Document]) -> Iterator[list[int]]:
    """Token ids of each document without special tokens, tokenized in groups for speed."""
    group: list[str] = []
    for doc in documents:
        group.append(doc.text)
        if len(group) == _TOKENIZE_GROUP:
            yield from tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]
            group = []
    if group:
        yield from tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]


def pack_contexts(tokenizer: Any, documents: Iterable[Document], context_len: int) -> Iterator[torch.Tensor]:
    """Pack the documents' tokens into int64 [context_len] contexts ``[start] + body + [end]``.

    Documents are tokenized without special tokens and joined by a separator (EOS, else SEP, else none); the
    body stream runs on across contexts and only the final partial context is dropped. ``start`` is CLS for
    BERT-style tokenizers, else BOS if set; ``end`` is SEP for BERT-style tokenizers only.
    """
    cls_style = tokenizer.cls_token_id is not None
    start_id = tokenizer.cls_token_id if cls_style else tokenizer.bos_token_id
    start = [] if start_id is None else [start_id]
    end = [tokenizer.sep_token_id] if cls_style and tokenizer.sep_token_id is not None else []
    separator = next((t for t in (tokenizer.eos_token_id, tokenizer.sep_token_id) if t is not None), None)
    body_len = context_len - len(start) - len(end)
    if body_len < 1:
        raise UserError(
            f"context_len {context_len} leaves no room for text; use at least {context_len - body_len + 1}"
        )
    buffer: list[int] = []
    first, emitted, total = True, 0, 0
    for ids in _token_streams(tokenizer, documents):
        if not ids:
            continue
        if not first and separator is not None:
            buffer.append(separator)
        buffer.extend(ids)
        first, total = False, total + len(ids)
        pos = 0
        while pos + body_len <= len(buffer):
            yield torch.tensor(start + buffer[pos : pos + body_len] + end, dtype=torch.int64)
            pos, emitted = pos + body_len, emitted + 1
        del buffer[:pos]
    if emitted == 0:
        raise UserError(
            f"the data has {total} tokens, too few for one context of {context_len}; "
            "use a smaller context length or more data"
        )


def packed_contexts(tokenizer: Any, data: str, split: str, context_len: int, limit: int = 0) -> torch.Tensor:
    """int64 [N, context_len]: every packed context of a split of ``data`` (:func:`pack_contexts`), or at most
    ``limit`` of them evenly spaced when ``limit`` > 0 (for training from scratch: the whole split in memory)."""
    rows = list(pack_contexts(tokenizer, iter_documents(data, split), context_len))
    packed = torch.stack(rows)
    if limit and len(packed) > limit:
        packed = packed[torch.linspace(0, len(packed) - 1, limit).round().long()]
    return packed


def token_batches(
    tokenizer: Any, documents: Iterable[Document], context_len: int, batch_size: int, drop_last: bool = False
) -> Iterator[TokenBatch]:
    """Batches of ``batch_size`` packed contexts (see :func:`pack_contexts`); the last may be smaller."""
    if batch_size < 1:
        raise UserError(f"batch_size {batch_size} must be at least 1")
    special_ids = torch.tensor(sorted(tokenizer.all_special_ids), dtype=torch.int64)
    rows: list[torch.Tensor] = []
    for context in pack_contexts(tokenizer, documents, context_len):
        rows.append(context)
        if len(rows) == batch_size:
            yield _batch(rows, special_ids)
            rows = []
    if rows and not drop_last:
        yield _batch(rows, special_ids)


def _batch(rows: list[torch.Tensor], special_ids: torch.Tensor) -> TokenBatch:
    """Stack contexts into a :class:`TokenBatch`."""
    input_ids_BT = torch.stack(rows)
    return TokenBatch(input_ids_BT, torch.ones_like(input_ids_BT), ~torch.isin(input_ids_BT, special_ids))


def corpus_fingerprint(spec: str) -> str:
    """A short sha256 hex identifying the corpus version: Python version and files for the stdlib, names,
    sizes and mtimes for local paths, the id for a Hugging Face dataset."""
    parts = [spec]
    if spec.startswith("stdlib:"):
        root, files = _stdlib_files()
        parts.append(sys.version)
        parts += [f"{p.relative_to(root).as_posix()}:{p.stat().st_size}" for p in files]
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        files = [path] if path.is_file() else _folder_files(path)
        parts += [f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def display_tokens(tokenizer: object, ids: list[int]) -> tuple[str, ...]:
    """Tokens as a reader sees them: WordPiece continuations (``##ing``) lose their marks and other WordPiece
    tokens gain a leading space; byte-level BPE tokens are decoded (``Ġthe`` → `` the``)."""
    tokens = tokenizer.convert_ids_to_tokens(ids)  # type: ignore[attr-defined]
    wordpiece = getattr(tokenizer, "cls_token", None) is not None
    if wordpiece:
        return tuple(t[2:] if t.startswith("##") else f" {t}" for t in tokens)
    return tuple(tokenizer.convert_tokens_to_string([t]) for t in tokens)  # type: ignore[attr-defined]
