"""docs/interfaces.md stays true: its config, payload and preflight tables are generated
from the models (``python tests/test_interfaces_doc.py`` rewrites them), and a test fails
when a table differs from what the code says.

The tables sit between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->`` lines."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

DOC = Path(__file__).resolve().parent.parent / "docs" / "interfaces.md"


def _cell(text: str) -> str:
    """One table cell from a docstring or description: reST roles and literals as Markdown."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"`\1`", text)
    return " ".join(text.replace("``", "`").split()).replace("|", "\\|")


def _default(field: object) -> str:
    from pydantic_core import PydanticUndefined

    default = getattr(field, "default", None)
    factory = getattr(field, "default_factory", None)
    if default is PydanticUndefined and factory is not None:
        default = factory()
    if default is None or default is PydanticUndefined:
        return "none"
    if isinstance(default, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in default) + "]`"
    return f"`{default}`"


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, object]]:
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            yield from _fields(sub, key + ".")
        else:
            yield key, field


def config_table() -> str:
    from edge_agent.config import Settings

    rows = ["| key | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for key, field in _fields(Settings):
        env = "EDGE_AGENT_" + key.upper().replace(".", "__")
        description = _cell(getattr(field, "description", None) or "")
        rows.append(f"| `{key}` | `{env}` | {_default(field)} | {description} |")
    return "\n".join(rows)


def payload_table() -> str:
    from edge_agent.results import FindingResult, RejectedFile, StudyResult

    rows = ["| field | meaning |", "| --- | --- |"]
    for model, prefix in (
        (StudyResult, ""),
        (FindingResult, "findings[]."),
        (RejectedFile, "rejected: "),
    ):
        for key, field in _fields(model):
            if prefix == "" and key == "findings":
                rows.append("| `findings` | one entry per finding of the bundle (below) |")
                continue
            description = _cell(getattr(field, "description", None) or "")
            rows.append(f"| `{prefix}{key}` | {description} |")
    return "\n".join(rows)


def manifest_table() -> str:
    """``manifest.json``: the top-level keys and, one level down, the model, encoder and
    finding entries (the head, CT and report sections are described in their docs)."""
    from edge_agent.bundle import Encoder, Finding, Manifest, ModelInfo

    rows = ["| key | type | meaning |", "| --- | --- | --- |"]
    for model, prefix in (
        (Manifest, ""),
        (ModelInfo, "model."),
        (Encoder, "encoder."),
        (Finding, "findings[]."),
    ):
        for name, field in model.model_fields.items():
            description = _cell(field.description or "")
            if not description and prefix == "" and name in ("model", "encoder", "findings"):
                description = "below"
            kind = _cell(_type(field.annotation))
            rows.append(f"| `{prefix}{field.alias or name}` | {kind} | {description} |")
    return "\n".join(rows)


def _type(annotation: object) -> str:
    """A field's type as a reader of the JSON sees it (``Literal['fp32', 'fp16']`` → the
    values, models by name, no module paths)."""
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    text = re.sub(r"\b(?:typing|[a-z_]+(?:\.[a-z_]+)+)\.", "", text)
    text = re.sub(r"Literal\[(.*?)\]", lambda m: m.group(1).replace(", ", " | "), text)
    return f"`{text}`"


def checks_table() -> str:
    from edge_agent.preflight import CHECKS

    rows = [
        "| check | needs | a problem is | `run` runs it | what it checks |",
        "| --- | --- | --- | --- | --- |",
    ]
    for check in CHECKS:
        needs = ", ".join(check.needs) or "-"
        at_start = "yes" if check.at_start else "no (`check` only)"
        rows.append(
            f"| `{check.name}` | {needs} | {check.severity} | {at_start} | {_cell(check.summary)} |"
        )
    return "\n".join(rows)


TABLES = {
    "config": config_table,
    "payload": payload_table,
    "checks": checks_table,
    "manifest": manifest_table,
}


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated: {name} -->\n)(.*?)(<!-- end: {name} -->)", re.S)


def regenerate(text: str) -> str:
    for name, make in TABLES.items():
        pattern = _block(name)
        assert pattern.search(text), f"docs/interfaces.md has no generated block {name!r}"
        table = make()
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(3), text)
    return text


def test_the_generated_tables_match_the_code() -> None:
    text = DOC.read_text()
    assert regenerate(text) == text, (
        "docs/interfaces.md is out of date: run python tests/test_interfaces_doc.py"
    )


def test_every_cli_command_is_documented() -> None:
    import argparse

    from edge_agent.cli import build_parser

    text = DOC.read_text()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name in sub.choices:
        assert f"`edge-agent {name}" in text, name


def test_no_code_points_at_a_file_outside_the_repository() -> None:
    root = DOC.parent.parent
    for folder in ("edge_agent", "export", "tests", "docs", "benchmarks"):
        for path in (root / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.name != Path(__file__).name:
                assert "CONTRACT" not in path.read_text(), path
    assert "CONTRACT" not in (root / "README.md").read_text()


def test_the_readme_lists_every_module() -> None:
    root = DOC.parent.parent
    readme = (root / "README.md").read_text()
    for package in ("edge_agent", "export"):
        for path in sorted((root / package).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            assert f"`{name}`" in readme, f"README.md's module map misses {name}"


if __name__ == "__main__":
    sys.path.insert(0, str(DOC.parent.parent))
    DOC.write_text(regenerate(DOC.read_text()))
