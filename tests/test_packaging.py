"""Packaging: nfm installs nfm_cli and nfm_models, never the common top-level name `models`."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_setup_cfg_lists_every_package_and_maps_models_to_nfm_models():
    cfg = _setup_cfg()
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nfm_cli").rglob("__init__.py")}
    assert on_disk <= listed, f"add {sorted(on_disk - listed)} to setup.cfg's packages"
    assert "models" not in listed and "nfm_models" in listed
    mapping = dict(line.split("=", 1) for line in cfg["options"]["package_dir"].split("\n") if "=" in line)
    assert {k.strip(): v.strip() for k, v in mapping.items()} == {"nfm_models": "models"}


def test_no_module_imports_the_top_level_name_models():
    offenders = []
    for path in list((ROOT / "nfm_cli").rglob("*.py")) + list((ROOT / "models").rglob("*.py")):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:2] in (["import", "models"], ["from", "models"]) or words[:2] == ["import", "models,"]:
                offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders


@pytest.mark.integration
def test_load_checkpoint_from_a_folder_with_its_own_models_package(tmp_path, tiny_checkpoint):
    """Common in ML repositories: the user's cwd has a models/ package; nfm must not pick it up."""
    own = tmp_path / "models"
    own.mkdir()
    (own / "__init__.py").write_text("raise ImportError('this is the user models package, not nfm')\n")
    code = ("import sys, nfm_cli; ck = nfm_cli.load_checkpoint(sys.argv[1]); "
            "assert 'models' not in sys.modules; print(type(ck.model).__name__, ck.num_classes)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])))
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["MLP", "10"]
