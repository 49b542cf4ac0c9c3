#!/usr/bin/env python3
"""Per run: each measure after a function-preserving rescaling divided by its value before (make reproduce-vit).

    scripts/rescale_ratios.py ORIGINAL_FOLDER RESCALED_FOLDER [ORIGINAL_FOLDER RESCALED_FOLDER ...]

Pairs the *.measures.safetensors files of equal names; a measure that is a function of the network
has ratio 1 (up to the solver tolerance and float32 weights); one that moves (flagged `*`, more than
1e-3 relative) is not, whatever its Kendall tau against the gap.
"""
import sys
from pathlib import Path

from nfm_cli.store.artifacts import read_metadata

MEASURES = ("normalized_sharpness", "matrix_normalized_sharpness", "hessian_trace", "frobenius_norm_sq",
            "adaptive_sharpness", "fisher_rao_norm")
MOVES = 1e-3


def ratios(original: Path, rescaled: Path) -> list[str]:
    """One line per run found in both folders: after / before for each of MEASURES."""
    lines = []
    for after_path in sorted(rescaled.glob("*.measures.safetensors")):
        before_path = original / after_path.name
        if not before_path.exists():
            continue
        before = read_metadata(before_path, "measures").meta["result"]
        after = read_metadata(after_path, "measures").meta["result"]
        cells = []
        for key in MEASURES:
            b, a = before.get(key), after.get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                cells.append(f"{key}={a / b:.6g}{'*' if abs(a / b - 1) > MOVES else ''}")
        lines.append(f"{rescaled.name}/{after_path.name.removesuffix('.measures.safetensors')}: " + " ".join(cells))
    return lines


if __name__ == "__main__":
    folders = [Path(p) for p in sys.argv[1:]]
    if not folders or len(folders) % 2:
        sys.exit(__doc__)
    for original, rescaled in zip(folders[::2], folders[1::2], strict=True):
        print("\n".join(ratios(original, rescaled)))
