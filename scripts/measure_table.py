#!/usr/bin/env python3
"""Print README's measure table from the measure registry (tests/test_measure_registry.py checks README)."""
import sys

from nfm_cli.measures.registry import readme_table

if __name__ == "__main__":
    sys.stdout.write(readme_table())
