"""Start-up: commands import only what they use; report reads only the metadata of measures files."""
import os
import subprocess
import sys

import pytest

from nfm_cli.artifacts import read_artifact, read_metadata
from nfm_cli.errors import NfmError
from nfm_cli.report import load_run, load_runs
from tests.test_report import make_result, write_measures

HEAVY = ("torchvision", "scipy.stats", "matplotlib")
CHECK = ("import sys\nfrom nfm_cli.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
         f"print('IMPORTED', ','.join(m for m in {HEAVY!r} if m in sys.modules))\n")


def imported_by(*argv) -> set[str]:
    res = subprocess.run([sys.executable, "-c", CHECK, *map(str, argv)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, NFM_THREADS="1"))
    line = [x for x in res.stdout.splitlines() if x.startswith("IMPORTED")]
    assert line, res.stdout + res.stderr
    return set(filter(None, line[-1].split(" ", 1)[1].split(",")))


def test_help_inspect_and_report_import_no_heavy_libraries(tiny_checkpoint, tmp_path):
    assert imported_by("--help") == set()
    assert imported_by("report", "--help") == set()
    assert imported_by("inspect", tiny_checkpoint) == set()
    files = [write_measures(tmp_path / f"r{i}.measures.safetensors", make_result(0.1 * i, 0.2 * i, seed=i,
                                                                                  normalized_sharpness=float(i)))
             for i in range(4)]
    assert imported_by("report", *files) == {"scipy.stats"}  # the correlations need it; no plots, no data


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
