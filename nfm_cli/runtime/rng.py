"""Randomness keyed by (seed, purpose, index): resumed runs draw exactly what uninterrupted runs draw."""
from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit integer derived from ``seed`` and ``keys`` (stable across runs and platforms)."""
    text = "/".join([str(int(seed))] + [str(k) for k in keys]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def keyed_generator(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded from ``(seed, *keys)``, e.g. ``keyed_generator(0, "probe", 17)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
