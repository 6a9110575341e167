"""The test suite's own layout: helpers are modules in tests/helpers/, never test modules;
no test module imports another; the environment is cleaned in one place (conftest.py)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_test_module_imports_another() -> None:
    for path in [*TESTS.glob("*.py"), *(TESTS / "helpers").glob("*.py")]:
        tests = {m for m in imported_modules(path) if m.split(".")[-1].startswith("test_")}
        assert not tests, f"{path.name} imports {sorted(tests)}: move what it needs to helpers/"


def defines(path: Path, name: str) -> bool:
    return any(
        isinstance(node, ast.FunctionDef) and node.name == name
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_the_environment_is_cleaned_once() -> None:
    defined = [p.name for p in TESTS.rglob("*.py") if defines(p, "_clean_env")]
    assert defined == ["conftest.py"], defined
