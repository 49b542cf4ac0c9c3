"""The ``nfm`` command line: a thin typer layer over the core modules.

Each command parses its options, calls one core function and renders the result (rich tables and
progress bars on stderr, the written path or JSON on stdout). Every failure the user can fix is an
``NfmError`` shown as one line on stderr with a non-zero exit; ``--debug`` shows the traceback.

Loading the command line imports no torch, numpy or scipy (``nfm --help`` and ``nfm COMMAND --help``
stay fast): the options come from torch-free lists (``cli.options``), and each command imports the core
modules it calls inside its function, so it pays only for what it uses.
"""
from __future__ import annotations

import atexit
import gc
import os
import signal
import sys

import typer
import typer._click as typer_click
from typer._click import exceptions as click_exceptions
from typer.core import TyperCommand

from nfm_cli import __version__
from nfm_cli.errors import NfmError
from nfm_cli.runtime import interrupt

HELP_OPTIONS = ["-h", "--help"]
app = typer.Typer(
    name="nfm",
    help="Normalized sharpness (Tsuzuku, Sato & Sugiyama, ICML 2020) of trained networks: "
         "train with random labels, compute Hessian diagonals, solve for the per-row/column "
         "variances, and report which flatness measure tracks the generalization gap.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTIONS},
)

EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3
# help panels, listed in workflow order: the three commands most users run, then the single steps
WORKFLOW, STEPS = "Workflow", "Steps and tools"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nfm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool | None = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    threads: int | None = typer.Option(None, "--threads", envvar="NFM_THREADS", min=1,
                                          help="CPU threads for the math (default: one per core). With several "
                                          "jobs side by side give each cores/jobs, e.g. NFM_THREADS=1 for "
                                          "`xargs -P $(nproc)`."),
) -> None:
    """Global options (give them before the command, e.g. ``nfm --debug train ...``)."""
    # --threads is applied by the command itself (``NfmCommand``) when it runs, not for its --help


def set_threads(n: int, *, torch_too: bool = True) -> None:
    """One pool of ``n`` threads per library that computes: torch's (OpenMP, MKL) for the math, and
    the BLAS that numpy/scipy load (the spectral norm); no extra inter-op pool. ``torch_too=False``
    (a command that never computes with torch) sets the variables only, without importing torch."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)      # for libraries loaded from here on
    if not torch_too:
        return
    import torch
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:              # already set, or inter-op work already started: keep it
        pass


class NfmCommand(TyperCommand):
    """A command that applies the global ``--threads`` (or ``NFM_THREADS``) just before it runs, so
    that ``nfm --threads N COMMAND --help`` does not import torch and a command's torch work always
    runs with the threads set."""

    uses_torch = True

    def invoke(self, ctx: typer_click.Context):
        threads = ctx.find_root().params.get("threads")
        if threads is not None:
            set_threads(threads, torch_too=self.uses_torch)
        return super().invoke(ctx)


class TorchFreeCommand(NfmCommand):
    """A command that reads only artifact headers and computes with numpy/scipy (``report``): the
    threads reach their BLAS through the environment, and torch is not imported for them."""

    uses_torch = False


def command(name: str, panel: str, *, uses_torch: bool = True):
    """``@command("train", WORKFLOW)``: register a command on ``app`` (every command, so each applies
    ``--threads``), listed in the help panel ``panel``."""
    return app.command(name, cls=NfmCommand if uses_torch else TorchFreeCommand, rich_help_panel=panel)


def _fail(message: str, code: int) -> None:
    sys.stderr.write("nfm: error: " + " ".join(message.split()) + "\n")
    sys.stderr.flush()
    sys.exit(code)


def _interrupted(stop: interrupt.Interrupted) -> None:
    """One line for Ctrl-C / SIGTERM, then the shell's exit code for that signal (130 / 143)."""
    saved = f"; {stop.saved}" if stop.saved else ""
    _fail_plain(f"nfm: interrupted by {stop.signal_name}{saved}; rerun the same command to resume "
                "where it stopped", stop.exit_code)


def _fail_plain(line: str, code: int) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    finally:
        sys.exit(code)


def _torchrun_rank() -> int:
    """This process's rank under torchrun, 0 without it; torch is imported only under torchrun
    (``WORLD_SIZE`` set and not 1), where the command needs it anyway."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return 0
    from nfm_cli.runtime import distributed
    return distributed.env_rank()


def _plain_flags(command: typer_click.Command) -> typer_click.Command:
    """Show flags (``--json``, ``--help``, ...) without a ``<bool>`` type in help: they take no value."""
    commands = [command, *getattr(command, "commands", {}).values()]
    for cmd in commands:
        help_option = cmd.get_help_option(typer_click.Context(cmd, help_option_names=HELP_OPTIONS))
        for param in [*cmd.params, help_option]:
            if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
    return command


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``nfm`` script and ``python -m nfm_cli``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None:    # the process's entry point (nfm, python -m nfm_cli): at exit, no garbage collection
        atexit.register(gc.freeze)   # over torch's objects (~0.35 s); files are closed and flushed by then
    debug = "--debug" in args or os.environ.get("NFM_DEBUG", "") not in ("", "0")
    command = _plain_flags(typer.main.get_command(app))
    if _torchrun_rank() > 0:            # under torchrun only rank 0 prints (errors still go to stderr)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
        from nfm_cli.cli.render import console
        console.quiet = True
    previous_handlers = interrupt.install()   # SIGINT/SIGTERM -> Interrupted: loops save, then stop
    try:
        code = command.main(args=args, prog_name="nfm", standalone_mode=False)
        if code == 130:  # typer turned a KeyboardInterrupt into Exit(130) (no nfm command returns 130)
            _interrupted(interrupt.Interrupted(signal.SIGINT))
    except interrupt.Interrupted as stop:
        _interrupted(stop)
    except NfmError as err:
        if debug:
            raise
        _fail(str(err), getattr(err, "exit_code", EXIT_ERROR))
    except click_exceptions.NoArgsIsHelpError as err:   # bare ``nfm``: the help, not an error
        typer.echo(err.ctx.get_help())
        code = 0
    except click_exceptions.UsageError as err:
        if debug:
            raise
        where = f"nfm {err.ctx.info_name} --help" if err.ctx is not None and err.ctx.parent else "nfm --help"
        message = err.format_message().replace("Value error, ", "")   # typer's validator prefix
        _fail(f"{message} (see {where})", EXIT_USAGE)
    except click_exceptions.ClickException as err:
        if debug:
            raise
        _fail(err.format_message(), err.exit_code or EXIT_ERROR)
    except (typer.Abort, KeyboardInterrupt):
        _interrupted(interrupt.Interrupted(signal.SIGINT))
    except BrokenPipeError:
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # an nfm bug, not the user's: still one line unless --debug
        if debug:
            raise
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        _fail(f"internal error {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              EXIT_INTERNAL)
    finally:
        interrupt.restore(previous_handlers)
        if "nfm_cli.runtime.distributed" in sys.modules:    # a torchrun process group exists only if it was imported
            sys.modules["nfm_cli.runtime.distributed"].shutdown()
    sys.exit(code if isinstance(code, int) else 0)


# Commands register themselves on ``app`` when imported; --help lists them in this (workflow) order.
from nfm_cli.cli import train_cmd, import_cmd, measure_cmd, report_cmd, sweep_cmd  # noqa: E402,F401,I001
from nfm_cli.cli import hessian_diag_cmd, solve_variance_cmd, rescale_cmd, inspect_cmd  # noqa: E402,F401,I001
