"""The package's layout rules (README "Layout"), read from the source: imports flow cli -> steps -> core."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "nfm_cli"
CORE = ("curvature", "measures", "report", "store", "data", "runtime", "symmetries")
TOP_LEVEL = {"__init__.py", "__main__.py", "api.py", "choices.py", "errors.py"}


def imported_modules(path: Path) -> set[str]:
    """Every nfm_cli module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nfm_cli"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nfm_cli"))
    return found


def package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0] if len(path.relative_to(ROOT).parts) > 1 else ""


def test_top_level_holds_only_entry_points_api_and_shared_leaves():
    assert {p.name for p in ROOT.glob("*.py")} <= TOP_LEVEL


def test_no_core_module_imports_steps_cli_or_the_api():
    upward = []
    for path in ROOT.rglob("*.py"):
        if package_of(path) in CORE or path.name in ("choices.py", "errors.py"):
            for module in imported_modules(path):
                if module.split(".")[1:2] and module.split(".")[1] in ("steps", "cli", "api"):
                    upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not upward


def test_steps_never_import_the_cli():
    bad = [f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / "steps").glob("*.py") for m in imported_modules(p)
           if m.startswith("nfm_cli.cli")]
    assert not bad


def test_every_subpackage_says_what_it_holds_and_imports_nothing():
    for init in ROOT.glob("*/__init__.py"):
        if init.parent.name == "cli":
            continue                       # the typer app lives in cli/__init__.py
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init} has no docstring"
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], f"{init} imports"


MAX_FUNCTION_LINES = 80    # "functions that fit a screen", signature and docstring included


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function or method longer than ``limit`` lines."""
    found = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = node.end_lineno - first + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_every_function_fits_a_screen():
    assert not long_functions(ROOT)


def test_the_function_length_check_finds_a_long_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert [f.split()[1] for f in long_functions(pkg)] == ["long"]


REPO = ROOT.parent
TEST_PATH = re.compile(r"\btests/[\w/]+\.py\b")


def stale_test_paths(texts: dict[str, str]) -> list[str]:
    """Every `tests/....py` a document names that does not exist in the repository."""
    return [f"{name}: {found}" for name, text in texts.items() for found in TEST_PATH.findall(text)
            if not (REPO / found).is_file()]


def test_every_test_file_the_docs_and_makefile_name_exists():
    documents = [*REPO.glob("*.md"), *REPO.glob("notes/*.md"), REPO / "Makefile"]
    assert not stale_test_paths({p.name: p.read_text() for p in documents})


def test_the_stale_path_check_finds_a_moved_test_file():
    assert stale_test_paths({"X.md": "see tests/test_locks.py and tests/store/test_locks.py"}) == \
        ["X.md: tests/test_locks.py"]
