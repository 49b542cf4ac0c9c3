"""`make install` keeps a supported torch (issue 13, item 2): scripts/torch_requirements.py's plan."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("torch_requirements", ROOT / "scripts" / "torch_requirements.py")
torch_requirements = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_requirements)
SETUP = (ROOT / "setup.cfg").read_text()


def test_ranges_are_read_from_setup_cfg():
    ranges = torch_requirements.supported_ranges(SETUP)
    assert ranges["torch"] == [(">=", (2, 2)), ("<=", (2, 14, 1))]
    assert ranges["torchvision"] == [(">=", (0, 17)), ("<=", (0, 29, 1))]


@pytest.mark.parametrize("installed, expected", [
    ({"torch": None, "torchvision": None}, ["torch==2.14.1", "torchvision==0.29.1"]),      # nothing: the pins
    ({"torch": "2.14.1", "torchvision": "0.29.1"}, []),                                     # CI: keep, install nothing
    ({"torch": "2.5.1+cpu", "torchvision": "0.20.1+cpu"}, []),                              # a user's CPU build: kept
    ({"torch": "2.2.0", "torchvision": None}, ["torchvision==0.17.*"]),                      # only the matching vision
    ({"torch": "2.9.0+cu126", "torchvision": "0.12.0"}, ["torchvision==0.24.*"]),            # vision too old
])
def test_plan_keeps_a_supported_torch(installed, expected):
    assert torch_requirements.plan(installed, SETUP) == expected


@pytest.mark.parametrize("version", ["2.1.2", "2.15.0", "1.13.1"])
def test_unsupported_torch_is_not_clobbered(version):
    with pytest.raises(SystemExit, match=f"torch {version} is installed but nfm supports"):
        torch_requirements.plan({"torch": version, "torchvision": None}, SETUP)
    assert torch_requirements.plan({"torch": version, "torchvision": None}, SETUP, force=True) == [
        "torch==2.14.1", "torchvision==0.29.1"]


def test_version_parsing():
    assert torch_requirements.version_tuple("2.14.1+cpu") == (2, 14, 1)
    assert torch_requirements.version_tuple("2.5.0a0+git1234") == (2, 5, 0)
    assert torch_requirements.version_tuple("0.29.1") == (0, 29, 1)
