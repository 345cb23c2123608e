"""Pieces every sub-app of the command line shares: option types, the JSON summary line, rich tables."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleOptions, RenderResult
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
ChunkOpt = Annotated[
    int, typer.Option("--chunk-batches", help="Model batches per chunk (the checkpoint unit).")
]
MixOpt = Annotated[
    int,
    typer.Option(
        "--mix-chunks", help="Consecutive chunks whose tokens are mixed together (memory: this many)."
    ),
]
OutlierOpt = Annotated[
    float,
    typer.Option(
        "--outlier-norm",
        help="Leave out tokens with norm > this × the median norm at the site (0: keep all).",
    ),
]


def int_list(text: str | None, option: str) -> tuple[int, ...] | None:
    """The whole numbers of a comma-separated option (None when the option was not given); anything else is
    one error line naming the option."""
    from interlayer.errors import UserError

    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values:
        raise UserError(f"{option} takes comma-separated whole numbers, got {text!r}")
    return values


def emit(summary: dict[str, Any], as_json: bool) -> None:
    """With ``--json``, print ``summary`` as one line of JSON on stdout (the command's last line there)."""
    if as_json:
        print(json.dumps(summary, sort_keys=True))


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class FittedTable:
    """A rich renderable: the rows as a table that fits the console width without ever cutting a value.

    The first column (the key a user types back: a site, a model name) is never wrapped or ellipsised, nor is
    any other cell; headers may fold onto several lines. When the columns do not fit even with folded headers,
    trailing columns are left out and a caption names them (``--json`` has every field).
    """

    _HEADER_MIN = 8
    """Narrowest a column is squeezed for its header (wider cells keep their full width)."""

    def __init__(self, title: str, rows: list[dict[str, Any]]) -> None:
        self.title = title
        self.columns = list(dict.fromkeys(key for row in rows for key in row))
        self.cells = [[_cell(row[c]) if c in row else "" for c in self.columns] for row in rows]

    def _widths(self, compact: bool) -> list[int]:
        widths = []
        for i, column in enumerate(self.columns):
            cell = max((len(row[i]) for row in self.cells), default=0)
            header = len(column) if not compact or i == 0 else min(len(column), self._HEADER_MIN)
            widths.append(max(cell, header, 1))
        return widths

    @staticmethod
    def _table_width(widths: list[int]) -> int:
        return sum(w + 3 for w in widths) + 1  # one space of padding each side and a border per column

    def fit(self, max_width: int) -> tuple[list[int], list[str]]:
        """The widths of the columns shown within ``max_width`` and the names of the columns left out."""
        widths = self._widths(compact=False)
        if self._table_width(widths) <= max_width:
            return widths, []
        widths = self._widths(compact=True)
        shown = 1  # the key column always
        while shown < len(widths) and self._table_width(widths[: shown + 1]) <= max_width:
            shown += 1
        return widths[:shown], self.columns[shown:]

    def build(self, max_width: int) -> Table:
        """The rich Table for a console ``max_width`` columns wide."""
        widths, left_out = self.fit(max_width)
        caption = f"not shown (too narrow; see --json): {', '.join(left_out)}" if left_out else None
        table = Table(title=self.title, caption=caption)
        for column, width in zip(self.columns, widths, strict=False):
            table.add_column(column, width=width, overflow="fold")  # every cell fits: only headers fold
        for row in self.cells:
            table.add_row(*row[: len(widths)])
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width)


def table(title: str, rows: list[dict[str, Any]]) -> FittedTable:
    """``rows`` (one dict per row; floats shown to 4 significant digits) as a renderable table that never
    cuts a value: print it on any rich console. Commands print their tables with :func:`print_table`."""
    return FittedTable(title, rows)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print ``rows`` as a table on stdout: a table is a command's product (``| grep`` must see it); progress
    bars and messages go to stderr. Width: the terminal's, else ``$COLUMNS``, else 80."""
    Console(file=sys.stdout).print(table(title, rows))
