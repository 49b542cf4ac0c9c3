"""``nfm inspect``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from nfm_cli.artifacts import describe_artifact
from nfm_cli.cli import STEPS, app
from nfm_cli.cli.options import Json, flag
from nfm_cli.cli.render import console, print_json


@app.command("inspect", rich_help_panel=STEPS)
def inspect_command(
    file: Path = typer.Argument(..., metavar="FILE", help="Any nfm artifact: checkpoint, hessian-diag or measures file."),
    as_json: Json = False,
    all_tensors: Annotated[bool, flag("--all", help="List every tensor (default: the first 40).")] = False,
) -> None:
    """Show an artifact's kind, config, progress, metrics and tensors."""
    info = describe_artifact(file)
    if as_json:
        print_json(info)
        return
    meta = info["meta"]
    head = Table(title=f"{file}", show_header=False, title_justify="left")
    head.add_row("kind", info["kind"])
    head.add_row("sha256", info["sha256"])
    for key in ("config", "model", "progress", "metrics", "parents", "wall_time"):
        if key in meta:
            value = meta[key]
            head.add_row(key, json.dumps(value, sort_keys=True) if not isinstance(value, (int, float, str)) else str(value))
    if info["nonfinite_tensors"]:
        head.add_row("[red]NaN/inf[/red]", ", ".join(info["nonfinite_tensors"][:5]) + " (diverged or corrupt)")
    console.print(head)
    tensors = Table("tensor", "dtype", "shape", title=f"{len(info['tensors'])} tensors", title_justify="left")
    for i, (name, t) in enumerate(sorted(info["tensors"].items())):
        if i == 40 and not all_tensors:
            tensors.add_row("...", "", f"{len(info['tensors']) - 40} more (--all)")
            break
        tensors.add_row(name, t["dtype"], "x".join(map(str, t["shape"])) or "scalar")
    console.print(tensors)
