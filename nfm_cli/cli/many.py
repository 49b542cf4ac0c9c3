"""Commands over many checkpoints (``nfm measure a b c``): the argument, one line per file, the final count.

Without ``--json`` each file gets one row of a table on stderr as it finishes (its output path on
stdout, as alone); with ``--json`` one JSON object per line on stdout. A failed file gets its
one-line error on stderr (and, with ``--json``, an object with ``error`` and ``exit_code``), the
others go on, and the command ends with the count and a non-zero exit status if any failed.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from nfm_cli.cli.render import _nan_to_none, number, print_note

CheckpointsArg = Annotated[list[Path], typer.Argument(
    metavar="CHECKPOINT", show_default=False,
    help="One or more complete checkpoints written by nfm train, measured one after the other in this "
         "process (each exactly as alone; a failing one gets its error line and the others go on).")]

# the numeric columns of ``nfm measure``'s rows: (key in the row, header, width, significant digits)
MEASURE_COLUMNS = (("normalized", "normalized", 12, 6), ("trace", "trace", 12, 6), ("gap", "gap", 9, 4))


def debug_requested(ctx: typer.Context) -> bool:
    """``nfm --debug`` or ``NFM_DEBUG``: let an internal error's traceback through instead of a line."""
    return bool(ctx.find_root().params.get("debug")) or os.environ.get("NFM_DEBUG", "") not in ("", "0")


def error_line(message: str) -> str:
    """The same one line as a failed single-file command (``cli._fail``)."""
    return "nfm: error: " + " ".join(message.split())


def outcome_printer(total: int, as_json: bool, quiet: bool, fields: Callable[[Any], dict[str, Any]],
                    columns: Sequence[tuple[str, str, int, int]] = MEASURE_COLUMNS) -> Callable[[Any], None]:
    """An ``on_outcome`` callback printing one line per file: a table row on stderr (and the output
    path on stdout), or one JSON object per line on stdout. ``fields(result)`` gives the row's
    ``status``, ``path`` and ``columns`` values, and the JSON object's other keys (``json``)."""
    width = len(str(total))
    header = [f"{'file':>9}  {'status':<16}"] + [f"{title:>{w}}" for _, title, w, _ in columns]
    header_done = False

    def on_outcome(outcome) -> None:
        nonlocal header_done
        if not outcome.ok:
            print_note(error_line(outcome.error))
            if as_json:
                _json_line({"checkpoint": str(outcome.path), "error": outcome.error, "exit_code": outcome.exit_code,
                            "seconds": round(outcome.seconds, 3)})
            return
        row = fields(outcome.result)
        if as_json:
            _json_line({"checkpoint": str(outcome.path), "status": row["status"], "path": str(row["path"]),
                        "seconds": round(outcome.seconds, 3), **row.get("json", {})})
            return
        if not quiet:
            if not header_done:
                print_note(" ".join(header) + f" {'seconds':>8}  checkpoint -> output")
                header_done = True
            cells = [f"{number(row.get(key), digits):>{w}}" for key, _, w, digits in columns]
            counter = f"{outcome.index + 1:>{width}}/{total}"
            print_note(f"{counter:>9}  {row['status']:<16} " + " ".join(cells)
                       + f" {outcome.seconds:>8.2f}  {outcome.path} -> {row['path']}")
        typer.echo(str(row["path"]))

    return on_outcome


def _json_line(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(_nan_to_none(obj), separators=(", ", ": ")))


def finish_many(outcomes: Sequence[Any], quiet: bool, count_line: str, code: int) -> None:
    """The final count on stderr (always when a file failed), then exit with ``code``."""
    if code or not quiet:
        print_note(("nfm: " if code else "") + count_line)
    if code:
        raise typer.Exit(code)
