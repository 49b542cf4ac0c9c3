"""Many files through one step in one process: ``nfm measure a b c`` (and ``nfm hessian-diag``).

``each_file`` runs one per-file step (``work``: for ``nfm measure``, the output lock and
``measure.measure_checkpoint``) over the files in the order given and returns one ``FileOutcome``
per file: its result, or its one-line error as a value, so that a bad file in the middle does not
stop the others. Each file gets exactly what it would get alone (the same step, locks, resume and
refusals); what they share (torch, the dataset split read from its files: ``data.datasets``' process
cache) is paid once. An interrupt (Ctrl-C, SIGTERM) is not a per-file error: the file in progress
saves as it would alone, no further file starts, and the ``Interrupted`` goes on with the count.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfm_cli.data.datasets import shared_splits
from nfm_cli.errors import NfmError
from nfm_cli.runtime import interrupt
from nfm_cli.runtime.progress import ProgressFn, report

EXIT_ERROR = 1    # a failed file's exit code when its error names none (the command line's EXIT_ERROR)
EXIT_INTERNAL = 3  # an nfm bug, not the file's (the command line's EXIT_INTERNAL)


@dataclass
class FileOutcome:
    """What one file of a many-file call came to: ``result`` (the step's return value) or ``error``
    (one line naming the file) with its ``exit_code``; ``seconds`` of wall time spent on it."""

    index: int
    path: Path
    seconds: float
    result: Any = None
    error: str | None = None
    exit_code: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def internal_error_line(exc: BaseException) -> str:
    """The command line's one line for an unexpected exception (an nfm bug)."""
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"internal error {type(exc).__name__}: {first} (rerun with --debug for the traceback)"


def _named(message: str, path: Path) -> str:
    """An error line that starts with ``path`` (an ``NfmError`` about another file, or none, gets it in front)."""
    return message if message.startswith(f"{os.fspath(path)}: ") else f"{path}: {message}"


def each_file(paths: Sequence[str | os.PathLike], work: Callable[[Path], Any], *,
              on_outcome: Callable[[FileOutcome], None] | None = None, raise_internal: bool = False,
              progress: ProgressFn = None) -> list[FileOutcome]:
    """``work(path)`` for every path in order; one ``FileOutcome`` each (``on_outcome`` sees it at once).

    An ``NfmError`` (bad file, locked output, refusal) becomes that file's error line and exit code;
    any other exception too (as an internal error) unless ``raise_internal`` (``--debug``). An
    ``interrupt.Interrupted`` stops the loop: it is re-raised with how many files were done."""
    outcomes: list[FileOutcome] = []
    with shared_splits():
        for i, raw in enumerate(paths):
            outcomes.append(_one(i, Path(raw), work, len(paths), len(outcomes), raise_internal))
            if on_outcome is not None:
                on_outcome(outcomes[-1])
            report(progress, "files", i + 1, len(paths), file=Path(raw).name)
    return outcomes


def _one(i: int, path: Path, work: Callable[[Path], Any], total: int, done: int, raise_internal: bool) -> FileOutcome:
    """One file's outcome (see ``each_file``)."""
    start = time.perf_counter()
    try:
        outcome = FileOutcome(i, path, 0.0, result=work(path))
    except interrupt.Interrupted as stop:
        count = f"{done} of {total} files were done before it"
        raise interrupt.Interrupted(stop.signum, f"{stop.saved}; {count}" if stop.saved else count) from None
    except NfmError as err:
        outcome = FileOutcome(i, path, 0.0, error=_named(str(err), path),
                              exit_code=getattr(err, "exit_code", EXIT_ERROR))
    except Exception as exc:
        if raise_internal:
            raise
        outcome = FileOutcome(i, path, 0.0, error=_named(internal_error_line(exc), path), exit_code=EXIT_INTERNAL)
    outcome.seconds = time.perf_counter() - start
    return outcome


def exit_code(outcomes: Sequence[FileOutcome]) -> int:
    """0 when every file succeeded; else the failures' exit code if they share one, else ``EXIT_ERROR``."""
    codes = {o.exit_code for o in outcomes if not o.ok}
    if not codes:
        return 0
    return codes.pop() if len(codes) == 1 else EXIT_ERROR


def count_line(outcomes: Sequence[FileOutcome], what: str = "checkpoints", done: str = "measured") -> str:
    """The final count: ``3 checkpoints: 2 measured, 1 failed (b.safetensors)``."""
    failed = [o for o in outcomes if not o.ok]
    line = f"{len(outcomes)} {what}: {len(outcomes) - len(failed)} {done}, {len(failed)} failed"
    if failed:
        names = ", ".join(str(o.path) for o in failed[:3]) + (", ..." if len(failed) > 3 else "")
        line += f" ({names})"
    return line


def check_distinct_outputs(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Refuse two inputs that would write the same output file (before any work)."""
    seen: dict[Path, Path] = {}
    for src, out in pairs:
        key = Path(os.path.abspath(out))
        if key in seen and Path(os.path.abspath(seen[key])) != Path(os.path.abspath(src)):
            raise NfmError(f"{seen[key]} and {src} would both write {out}; rename one of them", out)
        seen.setdefault(key, src)
