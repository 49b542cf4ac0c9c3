"""What `make install` should pip-install for torch/torchvision, without clobbering the user's torch.

Prints the requirements to install (nothing when a supported torch and torchvision are present),
or exits 1 with a message when an installed torch is outside the range nfm supports:

* torch and torchvision installed, both within setup.cfg's install_requires ranges -> nothing;
* neither installed -> the pinned versions (PINNED);
* torch installed and supported, torchvision missing or out of range -> the torchvision release
  built for that torch (torchvision 0.(m+15) goes with torch 2.m), so pip keeps the user's torch;
* torch installed but outside the range -> error (use a fresh venv, or FORCE_TORCH=1 to replace it).

Only the standard library: it runs before anything is installed.
"""
from __future__ import annotations

import configparser
import os
import re
import sys
from importlib import metadata
from pathlib import Path

PINNED = {"torch": "2.14.1", "torchvision": "0.29.1"}
VISION_MINOR_OFFSET = 15  # torchvision 0.(m + 15).x is built against torch 2.m


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.14.1+cpu' -> (2, 14, 1); '2.5.0a0+git1234' -> (2, 5, 0)."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def supported_ranges(setup_cfg: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """{"torch": [(">=", (2, 2)), ("<=", (2, 14, 1))], ...} from setup.cfg's install_requires."""
    parser = configparser.ConfigParser()
    parser.read_string(setup_cfg)
    ranges = {}
    for line in parser["options"]["install_requires"].splitlines():
        found = re.match(r"\s*(torchvision|torch)(?![\w-])\s*(.*)$", line)
        if found:
            ranges[found.group(1)] = [(m.group(1), version_tuple(m.group(2)))
                                      for m in re.finditer(r"(>=|<=|==|<|>)\s*([\w.+]+)", found.group(2))]
    return ranges


def _within(version: tuple[int, ...], bounds) -> bool:
    def cmp(a, b):
        n = max(len(a), len(b))
        a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
        return (a > b) - (a < b)
    ops = {">=": lambda c: c >= 0, "<=": lambda c: c <= 0, "==": lambda c: c == 0, "<": lambda c: c < 0,
           ">": lambda c: c > 0}
    return all(ops[op](cmp(version, bound)) for op, bound in bounds)


def plan(installed: dict[str, str | None], setup_cfg: str, force: bool = False) -> list[str]:
    """The pip requirements to install; raises SystemExit(message) for an unsupported torch."""
    ranges = supported_ranges(setup_cfg)
    pinned = [f"{name}=={version}" for name, version in PINNED.items()]
    torch_version = installed.get("torch")
    if force or torch_version is None:
        return pinned
    if not _within(version_tuple(torch_version), ranges["torch"]):
        raise SystemExit(f"torch {torch_version} is installed but nfm supports "
                         f"{', '.join(op + '.'.join(map(str, v)) for op, v in ranges['torch'])}; "
                         "make a fresh venv (see README), or run `make install FORCE_TORCH=1` to replace it "
                         f"with torch {PINNED['torch']}")
    vision = installed.get("torchvision")
    if vision is not None and _within(version_tuple(vision), ranges["torchvision"]):
        return []
    minor = version_tuple(torch_version)[1]
    return [f"torchvision==0.{minor + VISION_MINOR_OFFSET}.*"]


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    """Print the torch/torchvision requirements still to install (nothing when a supported torch is there)."""
    setup_cfg = (Path(__file__).resolve().parent.parent / "setup.cfg").read_text()
    installed = {name: _installed(name) for name in PINNED}
    requirements = plan(installed, setup_cfg, force=os.environ.get("FORCE_TORCH", "") not in ("", "0"))
    if not requirements:
        print(f"keeping the installed torch {installed['torch']} / torchvision {installed['torchvision']}",
              file=sys.stderr)
    print(" ".join(requirements))


if __name__ == "__main__":
    main()
