"""``nfm inspect``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from nfm_cli.cli import STEPS, command
from nfm_cli.cli.options import Json, flag
from nfm_cli.cli.render import console, number, print_json, render_layers, render_totals

HISTORY_COLUMNS = ("epoch_loss", "train_loss", "train_acc", "test_loss", "test_acc", "gap")
COLLAPSED = {"optim.": "optimizer state", "state.": "partial-run state"}  # one line each unless --all
SHOWN_TENSORS = 40


@command("inspect", STEPS)
def inspect_command(
    file: Path = typer.Argument(..., metavar="FILE",
                                help="Any nfm artifact: checkpoint, hessian-diag or measures file."),
    as_json: Json = False,
    layers: Annotated[bool, flag("--layers", help="Measures files: also the per-layer table.")] = False,
    all_tensors: Annotated[bool, flag("--all", help=f"List every tensor (default: the first {SHOWN_TENSORS}, "
                                      "optimizer state as one line).")] = False,
) -> None:
    """Show an artifact's kind, config and progress, then what it holds: a checkpoint's per-epoch
    history, a measures file's totals (per-layer with --layers), and the tensors."""
    from nfm_cli.store.artifacts import describe_artifact
    info = describe_artifact(file)
    if as_json:
        print_json(info)
        return
    meta = info["meta"]
    _print_head(file, info)
    if info["kind"] == "checkpoint" and isinstance(meta.get("history"), list) and meta["history"]:
        _print_history(meta["history"])
    if info["kind"] == "measures" and isinstance(meta.get("result"), dict):
        _print_measures(meta["result"], layers)
    _print_tensors(info["tensors"], all_tensors)


def _print_head(file: Path, info: dict[str, Any]) -> None:
    meta = info["meta"]
    head = Table(title=escape(str(file)), show_header=False, title_justify="left")
    head.add_row("kind", info["kind"])
    head.add_row("sha256", info["sha256"])
    shown = ("config", "model", "source", "progress", "parents", "wall_time")
    if info["kind"] != "measures":
        shown += ("metrics",)   # a measures file shows its metrics in the totals
    for key in shown:
        if key in meta:
            value = meta[key]
            text = json.dumps(value, sort_keys=True) if not isinstance(value, (int, float, str)) else str(value)
            head.add_row(key, escape(text))
    if info["nonfinite_tensors"]:
        head.add_row("[red]NaN/inf[/red]", escape(", ".join(info["nonfinite_tensors"][:5])) + " (diverged or corrupt)")
    console.print(head)


def _print_history(history: list[Any]) -> None:
    table = Table("epoch", *(c.replace("_", " ") for c in HISTORY_COLUMNS), "note", title="per-epoch history",
                  title_justify="left")
    for row in history:
        if not isinstance(row, dict):
            continue
        note = f"diverged (since epoch {row.get('diverged_epoch')})" if row.get("diverged") else ""
        table.add_row(number(row.get("epoch"), 4), *(number(row.get(c), 4) for c in HISTORY_COLUMNS), note)
    console.print(table)


def _print_measures(result: dict[str, Any], layers: bool) -> None:
    try:
        if layers:
            render_layers(result, "per layer")
        render_totals(result, "measures (totals)")
    except (KeyError, TypeError, AttributeError, ValueError):
        console.print("[yellow]the result entry is malformed; see --json[/yellow]")


def _print_tensors(tensors: dict[str, Any], all_tensors: bool) -> None:
    rows, folded = [], {}
    for name, t in sorted(tensors.items()):
        prefix = next((p for p in COLLAPSED if name.startswith(p)), None)
        if prefix is not None and not all_tensors:
            folded.setdefault(prefix, []).append(t)
            continue
        rows.append((name, t["dtype"], "x".join(map(str, t["shape"])) or "scalar"))
    table = Table("tensor", "dtype", "shape", title=f"{len(tensors)} tensors", title_justify="left")
    for i, row in enumerate(rows):
        if i == SHOWN_TENSORS and not all_tensors:
            table.add_row("...", "", f"{len(rows) - SHOWN_TENSORS} more (--all)")
            break
        table.add_row(*(escape(c) for c in row))
    for prefix, group in folded.items():
        elements = sum(_numel(t["shape"]) for t in group)
        dtypes = ", ".join(sorted({t["dtype"] for t in group}))
        table.add_row(f"{prefix}*", dtypes, f"{COLLAPSED[prefix]}: {len(group)} tensors, {elements} values (--all)")
    console.print(table)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
