"""Start-up: help loads no torch; commands import only what they use; report reads only the metadata of
measures files."""
import os
import subprocess
import sys

import pytest

from nfm_cli.errors import NfmError
from nfm_cli.report.correlations import load_run, load_runs
from nfm_cli.store.artifacts import read_artifact, read_metadata
from tests.conftest import make_result, write_measures

HEAVY = ("torchvision", "scipy.stats", "matplotlib")
CHECK = ("import sys\nfrom nfm_cli.cli import main\nwatched = sys.argv[1].split(',')\ntry:\n    main(sys.argv[2:])\n"
         "except SystemExit:\n    pass\nprint('IMPORTED', ','.join(m for m in watched if m in sys.modules))\n")
# what loading the command line and printing any help or the version must not import
NUMERIC = ("torch", "torchvision", "numpy", "scipy", "safetensors")
HELP_CHECK = f"""import sys
from typer.main import get_command
from nfm_cli.cli import app, main
names = list(get_command(app).commands)
for argv in [["--help"], ["--version"], ["--threads", "2", "train", "--help"], *[[n, "--help"] for n in names]]:
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
print("COMMANDS", ",".join(names))
print("NUMERIC", ",".join(sorted({{m.split(".")[0] for m in sys.modules}} & set({NUMERIC!r}))))
"""


def run_python(script: str, *argv, **env) -> list[str]:
    res = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, **env))
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.splitlines()


def imported_by(*argv, watched: tuple[str, ...] = HEAVY) -> set[str]:
    lines = [x for x in run_python(CHECK, ",".join(watched), *argv, NFM_THREADS="1") if x.startswith("IMPORTED")]
    assert lines
    return set(filter(None, lines[-1].split(" ", 1)[1].split(",")))


@pytest.mark.integration
def test_help_and_version_of_every_command_import_no_torch_numpy_or_scipy():
    """nfm --help, nfm COMMAND --help (with NFM_THREADS set, as under sweep) and --version stay torch-free."""
    out = dict(line.split(" ", 1) for line in run_python(HELP_CHECK, NFM_THREADS="1")
               if line.startswith(("COMMANDS", "NUMERIC")))
    assert "train" in out["COMMANDS"].split(",") and "hessian-diag" in out["COMMANDS"].split(",")
    assert out["NUMERIC"] == ""


THREADS_CHECK = ("import sys\nfrom nfm_cli.cli import main\n"
                 "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
                 "import torch\nprint('THREADS', torch.get_num_threads(), torch.get_num_interop_threads())\n")


@pytest.mark.integration
def test_every_command_applies_threads_when_it_runs(tiny_checkpoint):
    """--threads is applied when the command runs, where torch is first imported (here by inspect)."""
    from typer.main import get_command

    from nfm_cli.cli import NfmCommand, app
    assert all(isinstance(c, NfmCommand) for c in get_command(app).commands.values())
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS") and k != "NFM_THREADS"}
    res = subprocess.run([sys.executable, "-c", THREADS_CHECK, "--threads", "1", "inspect", str(tiny_checkpoint)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert [x for x in res.stdout.splitlines() if x.startswith("THREADS")] == ["THREADS 1 1"]


@pytest.mark.integration
def test_help_inspect_and_report_import_no_heavy_libraries(tiny_checkpoint, tmp_path):
    assert imported_by("--help") == set()
    assert imported_by("report", "--help") == set()
    assert imported_by("inspect", tiny_checkpoint) == set()
    files = [write_measures(tmp_path / f"r{i}.measures.safetensors", make_result(0.1 * i, 0.2 * i, seed=i,
                                                                                  normalized_sharpness=float(i)))
             for i in range(4)]
    # the correlations need scipy.stats; no plots, no data, and no torch: only the files' headers are read
    assert imported_by("report", *files, watched=HEAVY + ("torch", "safetensors")) == {"scipy.stats"}


@pytest.mark.integration
def test_hessian_diag_quiet_imports_only_what_it_computes_with(tiny_checkpoint, tmp_path):
    """No scipy, torchvision or rich progress bars; no sympy (torch.autograd's grad_outputs check)."""
    watched = ("scipy", "torchvision", "matplotlib", "sympy", "rich.progress")
    assert imported_by("hessian-diag", tiny_checkpoint, "--loss", "ce", "--estimator", "exact", "--out",
                       tmp_path / "h.safetensors", "-q", watched=watched) == set()
    assert (tmp_path / "h.safetensors").exists()


def test_metadata_reader_agrees_with_the_full_reader(tmp_path):
    path = write_measures(tmp_path / "a.measures.safetensors", make_result(0.3, 0.5, normalized_sharpness=2.0))
    full, head = read_artifact(path, "measures"), read_metadata(path, "measures")
    assert head.kind == full.kind and head.meta == full.meta and head.extra == full.extra
    assert head.tensors == {}
    with pytest.raises(NfmError, match="expected a checkpoint file"):
        read_metadata(path, "checkpoint")


def test_report_skips_truncated_files_without_reading_tensors(tmp_path):
    good = write_measures(tmp_path / "a.measures.safetensors", make_result(0.3, 0.5, normalized_sharpness=2.0))
    data = good.read_bytes()
    cut = tmp_path / "cut.measures.safetensors"
    cut.write_bytes(data[:-3])
    longer = tmp_path / "long.measures.safetensors"
    longer.write_bytes(data + b"\0")
    for bad in (cut, longer):
        with pytest.raises(NfmError, match="truncated or corrupt"):
            read_metadata(bad)
    runs, skipped = load_runs([good, cut, longer])
    assert [r["path"] for r in runs] == [str(good)] and len(skipped) == 2
    assert load_run(good)["normalized_sharpness"] == 2.0
