"""How much memory this process may still use, for the automatic batch size.

On a CPU device: the smallest of

* the cgroup limit minus the cgroup's usage, over this process's cgroup and its ancestors
  (v2 ``memory.max`` / ``memory.current``; v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``):
  what a SLURM job, a container or ``systemd-run -p MemoryMax=`` grants;
* ``MemAvailable`` of ``/proc/meminfo`` (what the kernel can give without swapping);
* ``NFM_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix), a limit set by hand, for schedulers
  that do not use cgroups and for tests.

On a CUDA device: the free memory of that GPU (``torch.cuda.mem_get_info``) and ``NFM_MEMORY_LIMIT``.
None when nothing is known (another OS). Paths are module constants so tests can point them at
a fake tree.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from nfm_cli.errors import NfmError

LIMIT_ENV = "NFM_MEMORY_LIMIT"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
_UNLIMITED = 1 << 60               # v1 writes "no limit" as a huge number (9223372036854771712)
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes this process may still allocate on ``device`` (see the module doc); None if unknown."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    known = [env_limit()]
    if device.type == "cuda":
        try:
            known.append(int(torch.cuda.mem_get_info(device)[0]))
        except (RuntimeError, AssertionError):
            pass
    else:
        known += [cgroup_available(), mem_available()]
    known = [k for k in known if k is not None]
    return max(0, min(known)) if known else None


def env_limit() -> int | None:
    """``NFM_MEMORY_LIMIT`` in bytes (None if unset); raises NfmError when it is not a size."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return None
    number, unit = text.upper().rstrip("IB") or "0", ""
    if number[-1:] in _SUFFIX and not number[-1:].isdigit():
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _SUFFIX[unit]
    except ValueError:
        raise NfmError(f"{LIMIT_ENV} must be a size in bytes such as 8000000000 or 8G, not {text!r}") from None
    if not value > 0:
        raise NfmError(f"{LIMIT_ENV} must be positive, not {text!r}")
    return int(value)


def cgroup_available(root: Path | None = None, proc_cgroup: Path | None = None) -> int | None:
    """Smallest (limit - usage) over this process's memory cgroup and its ancestors, v2 or v1."""
    root = CGROUP_ROOT if root is None else root
    proc_cgroup = PROC_CGROUP if proc_cgroup is None else proc_cgroup
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        if controllers == "":                      # v2 unified hierarchy
            found += _walk(root, group, "memory.max", "memory.current")
        elif "memory" in controllers.split(","):   # v1 memory controller
            found += _walk(root / "memory", group, "memory.limit_in_bytes", "memory.usage_in_bytes")
    if not lines:                                  # no /proc/self/cgroup: the root files, if any
        found += _walk(root, "/", "memory.max", "memory.current")
        found += _walk(root / "memory", "/", "memory.limit_in_bytes", "memory.usage_in_bytes")
    return min(found) if found else None


def mem_available(meminfo: Path | None = None) -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes."""
    try:
        text = (MEMINFO if meminfo is None else meminfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            try:
                return int(fields[1]) * (1024 if fields[-1].lower() == "kb" else 1)
            except (IndexError, ValueError):
                return None
    return None


def _walk(base: Path, group: str, limit_name: str, usage_name: str) -> list[int]:
    """limit - usage of every folder from ``base/group`` up to ``base`` that has a finite limit.
    Inside a container the group path may not exist under ``base`` (its own namespace): the
    folders that do exist are used."""
    found = []
    folder = base / group.strip("/")
    while True:
        limit = _read_int(folder / limit_name)
        if limit is not None and limit < _UNLIMITED:
            found.append(limit - (_read_int(folder / usage_name) or 0))
        if folder == base or base not in folder.parents:
            break
        folder = folder.parent
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None
