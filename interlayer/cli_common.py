"""Pieces every sub-app of the command line shares: option types, the JSON summary line, rich tables."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

ModelOpt = Annotated[str, typer.Option("--model", help="HF id, local folder, 'minilm' or 'zoo:NAME'.")]
DataOpt = Annotated[
    str, typer.Option("--data", help="Local file/folder, HF dataset id, stdlib:docs or stdlib:code.")
]
SitesOpt = Annotated[
    str, typer.Option("--sites", help="Site names or globs, comma-separated (see `interlayer sites`).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Model dtype: float32, bfloat16 or float16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary as the last line.")]
ContextOpt = Annotated[int, typer.Option("--context-len", help="Tokens per packed context.")]
ModelBatchOpt = Annotated[int, typer.Option("--model-batch-size", help="Contexts per model forward pass.")]
ChunkOpt = Annotated[int, typer.Option("--chunk-batches", help="Model batches per shuffle chunk.")]
OutlierOpt = Annotated[
    float,
    typer.Option(
        "--outlier-norm",
        help="Leave out tokens with norm > this × the median norm at the site (0: keep all).",
    ),
]


def emit(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, sort_keys=True))


def table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns)
        )
    return table
