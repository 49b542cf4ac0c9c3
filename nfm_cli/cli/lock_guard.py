"""The ``--wait`` option and the output lock every writing command holds (``nfm_cli.store.locks``)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import typer

from nfm_cli.cli.render import note_printer
from nfm_cli.store.locks import EXIT_LOCKED, output_lock

WAIT_HELP = (f"If another nfm is writing the same output, wait for it to finish (then resume or leave its "
             f"finished file alone) instead of stopping at once with exit code {EXIT_LOCKED}.")


def wait_option() -> bool:
    """``--wait``: the same option on every command that writes an artifact."""
    return typer.Option(False, "--wait", help=WAIT_HELP)


@contextlib.contextmanager
def locked(out: str | os.PathLike, wait: bool, command: str) -> Iterator[None]:
    """Hold the lock of ``out`` (notes such as "waiting for ..." go to stderr, even with --quiet)."""
    with output_lock(out, wait=wait, progress=note_printer, command=command):
        yield
