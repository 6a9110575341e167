"""Findings files: which findings a bundle scores, their prompts and starting thresholds.

A findings file is TOML with one ``[[finding]]`` table per finding (see ``cxr.toml``, the
default for chest radiographs). :func:`load_findings` validates it into the manifest's own
:class:`~edge_agent.bundle.Finding` model; every error names the file, the finding and the key.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from edge_agent.bundle import CTInput, Finding, Prompts
from edge_agent.config import read_toml
from edge_agent.errors import ConfigError

_KEYS = {
    "code",
    "label",
    "present",
    "absent",
    "review_threshold",
    "urgent_threshold",
    "modalities",
    "concept",
}

logger = logging.getLogger(__name__)


def default_findings_path(name: str = "cxr") -> Path:
    return Path(str(resources.files("export.findings") / f"{name}.toml"))


def load_findings(path: Path | str) -> list[Finding]:
    """The findings of a findings file (see :func:`load_findings_file` for its CT section)."""
    return load_findings_file(path)[0]


def load_findings_file(path: Path | str) -> tuple[list[Finding], CTInput | None]:
    """(findings, CT input settings or None). Findings with ``modalities = ["CT"]`` need a
    top-level ``[ct]`` table (convention, slab_mm, stride_mm, aggregate, top_k): how CT
    series become encoder inputs (see docs/ct.md)."""
    path = Path(path)
    where = f"findings({path.name})"
    data = read_toml(path, "--findings")
    unknown = set(data) - {"finding", "ct"}
    if unknown:
        raise ConfigError(
            f"{where}.{sorted(unknown)[0]}", "unknown key (expected [[finding]] and [ct])"
        )
    ct: CTInput | None = None
    if "ct" in data:
        try:
            ct = CTInput.model_validate(data["ct"])
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            raise ConfigError(f"{where}.ct{'.' + key if key else ''}", msg) from exc
    tables = data.get("finding")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(where, "no [[finding]] tables")
    findings: list[Finding] = []
    for i, table in enumerate(tables):
        name = str(table.get("code", i))
        extra = set(table) - _KEYS
        if extra:
            raise ConfigError(f"{where}.{name}.{sorted(extra)[0]}", "unknown key")
        if not table.get("present"):
            raise ConfigError(f"{where}.{name}.present", "at least one present-prompt is needed")
        try:
            findings.append(
                Finding.model_validate(
                    {
                        "code": table.get("code"),
                        "label": table.get("label"),
                        "prompts": Prompts(
                            present=table["present"], absent=table.get("absent", [])
                        ),
                        "review_threshold": table.get("review_threshold"),
                        "urgent_threshold": table.get("urgent_threshold"),
                        **{k: table[k] for k in ("modalities", "concept") if k in table},
                    }
                )
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            full = f"{where}.{name}.{key}" if key else f"{where}.{name}"
            raise ConfigError(full, err["msg"]) from exc
    codes = [f.code for f in findings]
    duplicates = sorted({c for c in codes if codes.count(c) > 1})
    if duplicates:
        raise ConfigError(f"{where}.{duplicates[0]}", "finding code appears twice")
    for f in findings:
        if f.concept is None:
            # Not an error: the DICOM SR names it with a private-scheme code a PACS cannot
            # match against SNOMED CT / RadLex queries.
            logger.warning(
                "%s.%s: no concept (SNOMED CT / RadLex code): DICOM SRs will name it with "
                "a private-scheme code",
                where,
                f.code,
            )
    for_ct = [f.code for f in findings if "CT" in f.modalities]
    if for_ct and ct is None:
        raise ConfigError(f"{where}.ct", f"findings {for_ct} are for CT: add a [ct] table")
    if ct is not None and not for_ct:
        raise ConfigError(f"{where}.ct", 'no finding has modalities = ["CT"]')
    return findings, ct
