"""Device selection shared by every step."""
from __future__ import annotations

import torch

from nfm_cli.errors import NfmError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NfmError(f"device {name!r} was asked for but no CUDA GPU is available; use cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise NfmError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
