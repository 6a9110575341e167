"""``edge-export add-report``: put an ``edge-export medgemma`` export into an engine bundle.

The result is a new bundle: the given bundle's files (encoder, engines, NOTICE…) as hard
links where the filesystem allows (else copies), plus the export's files under ``report/``,
and a manifest that is the bundle's own with a ``report`` section
(:class:`edge_agent.bundle.Report`) and the new files' entries. The narrative never changes
the scores, so the new bundle's model sha256 (and with it every alert id) is the old one's.

The export's files are re-hashed against ``medgemma.json`` before anything is copied; the
bundle is assembled in a folder beside ``--out``, checked with the daemon's own
:func:`edge_agent.bundle.load_bundle`, and only then renamed into place. Needs neither torch
nor transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge_agent.bundle import (
    MANIFEST,
    REPORT_FORMAT,
    Bundle,
    FileEntry,
    Manifest,
    Report,
    invalid,
    load_bundle,
    sha256_file,
    write_manifest,
)
from edge_agent.errors import BundleError, ConfigError

from .bundle_writer import _swap_into_place
from .medgemma import DESCRIPTION, token_count

logger = logging.getLogger(__name__)


REPORT_DIR = "report"
DEFAULT_RADIOGRAPH_PROMPT = (
    "Describe the findings of this chest X-ray in two or three short sentences."
)
DEFAULT_CT_PROMPT = (
    "This is one axial CT slab shown in three windows (red: wide, green: soft tissue, blue: "
    "brain). Describe the findings in two or three short sentences."
)
DEFAULT_MAX_NEW_TOKENS = 96


@dataclass
class AddReportSettings:
    bundle: Path
    report: Path
    out: Path
    name: str | None = None
    prompt_radiograph: str = DEFAULT_RADIOGRAPH_PROMPT
    prompt_ct: str = DEFAULT_CT_PROMPT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    overwrite: bool = False


@dataclass
class AddReportResult:
    bundle: Bundle
    source: Bundle
    added_files: int
    added_bytes: int
    linked: int
    copied: int
    replaced: Report | None


# --- the export ----------------------------------------------------------------------------


def read_export(folder: Path) -> tuple[dict[str, Any], dict[str, FileEntry]]:
    """``medgemma.json`` of an ``edge-export medgemma`` folder, and an entry for each of its
    files (``medgemma.json`` included), re-hashed: a missing or changed file is a
    :class:`BundleError` naming it."""
    if not folder.is_dir():
        raise BundleError(f"report export {folder} does not exist or is not a folder")
    path = folder / DESCRIPTION
    if not path.is_file():
        raise BundleError(
            f"report export {folder}: {DESCRIPTION} is missing (give the folder "
            "edge-export medgemma wrote)"
        )
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"report export {folder}: {DESCRIPTION} is not readable JSON") from exc
    if not isinstance(description, dict):
        raise BundleError(f"report export {folder}: {DESCRIPTION} is not a JSON object")
    if description.get("format") != REPORT_FORMAT:
        raise BundleError(
            f"report export {folder}: {DESCRIPTION} format {description.get('format')!r} is "
            f"not supported (expected {REPORT_FORMAT})"
        )
    files = description.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"report export {folder}: {DESCRIPTION} lists no files")
    entries: dict[str, FileEntry] = {}
    for name, digest in sorted(files.items()):
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or name == DESCRIPTION:
            raise BundleError(f"report export {folder}: file name {name!r} is not allowed")
        file = folder / name
        if not file.is_file():
            raise BundleError(
                f"report export {folder}: {name} is listed in {DESCRIPTION} but missing"
            )
        actual = sha256_file(file)
        if actual != digest:
            raise BundleError(
                f"report export {folder}: sha256 of {name} does not match {DESCRIPTION}"
            )
        entries[name] = FileEntry(sha256=actual, size=file.stat().st_size)
    entries[DESCRIPTION] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return description, entries


def _in_bundle(name: str) -> str:
    return f"{REPORT_DIR}/{name}"


def default_name(source: str) -> str:
    """'medgemma-4b-it' stays as it is; a student 'tiny-gemma3' becomes 'medgemma-tiny-gemma3'."""
    return source if source.lower().startswith("medgemma") else f"medgemma-{source}"


def build_report(
    folder: Path, description: dict[str, Any], files: dict[str, FileEntry], s: AddReportSettings
) -> Report:
    """The manifest's ``report`` section for the export in ``folder`` (files under report/)."""
    tokens = description.get("tokens")
    template = description.get("chat_template")
    if tokens is None or template is None:
        raise BundleError(
            f"report export {folder}: {DESCRIPTION} has no "
            f"{'tokens' if tokens is None else 'chat_template'} (written by an older "
            "edge-export medgemma); export the checkpoint again"
        )
    graphs = description.get("graphs")
    if not isinstance(graphs, dict) or not all(isinstance(g, dict) for g in graphs.values()):
        raise BundleError(f"report export {folder}: {DESCRIPTION} graphs is not a mapping")
    notice = description.get("notice")
    needed = [g.get("file") for g in graphs.values()] + ["tokenizer.json", template]
    needed += [notice] if notice is not None else []
    for name in needed:
        if not isinstance(name, str) or name not in files:
            raise BundleError(
                f"report export {folder}: {name} is not among {DESCRIPTION}'s files"
                + (" (the daemon reads tokenizer.json)" if name == "tokenizer.json" else "")
            )
    source = str(description.get("source") or folder.name)
    raw = {
        "format": REPORT_FORMAT,
        "name": s.name or default_name(source),
        "source": source,
        "weights_sha256": description.get("weights_sha256"),
        "graphs": {k: {**g, "file": _in_bundle(g["file"])} for k, g in graphs.items()},
        "tokenizer": _in_bundle("tokenizer.json"),
        "chat_template": _in_bundle(template),
        "notice": _in_bundle(notice) if notice is not None else None,
        "tokens": tokens,
        "image": description.get("image"),
        "text": description.get("text"),
        "prompts": {"radiograph": s.prompt_radiograph, "ct": s.prompt_ct},
        "max_new_tokens": s.max_new_tokens,
        "parity": description.get("parity"),
    }
    try:
        return Report.model_validate(raw)
    except ValidationError as exc:
        raise invalid(exc, f"report export {folder}", DESCRIPTION) from exc


# --- the command -----------------------------------------------------------------------------


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_settings(s: AddReportSettings) -> None:
    for option, prompt in (
        ("--prompt-radiograph", s.prompt_radiograph),
        ("--prompt-ct", s.prompt_ct),
    ):
        if not prompt.strip():
            raise ConfigError(option, "the prompt must not be empty")
    if not 1 <= s.max_new_tokens <= 1024:
        raise ConfigError("--max-new-tokens", "must be within 1..1024")
    if s.name is not None and not s.name.strip():
        raise ConfigError("--name", "must not be empty")
    bundle, report, out = (p.resolve() for p in (s.bundle, s.report, s.out))
    if _within(report, out) or _within(out, report):
        raise ConfigError("--out", f"{s.out} and the report export {s.report} overlap")
    if out != bundle and (_within(bundle, out) or _within(out, bundle)):
        raise ConfigError("--out", f"{s.out} and the bundle {s.bundle} are nested")
    if s.out.exists():
        if not s.overwrite:
            raise FileExistsError(f"{s.out} already exists (pass --overwrite to replace it)")
        if not s.out.is_dir() or (any(s.out.iterdir()) and not (s.out / MANIFEST).is_file()):
            raise FileExistsError(f"{s.out} exists and is not a bundle: refusing to replace it")


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` at ``dst`` (True), or copy it where links are not possible (False)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def add_report(s: AddReportSettings) -> AddReportResult:
    """Write ``s.out``: bundle ``s.bundle`` plus the MedGemma export ``s.report``, whole or
    not at all. ``s.bundle`` and ``s.report`` are left as they are."""
    s = replace(s, bundle=Path(s.bundle), report=Path(s.report), out=Path(s.out))
    _check_settings(s)
    source = load_bundle(s.bundle)
    logger.info(
        "bundle %s: %d files match their sha256 (model sha256 %s)",
        s.bundle,
        len(source.manifest.files),
        source.sha256[:12],
    )
    description, report_files = read_export(s.report)
    logger.info("report export %s: %d files match %s", s.report, len(report_files) - 1, DESCRIPTION)
    report = build_report(s.report, description, report_files, s)
    replaced = source.manifest.report
    prefix = f"{REPORT_DIR}/"
    kept = {
        n: e
        for n, e in source.manifest.files.items()
        if not (replaced is not None and n.startswith(prefix))
    }
    clash = sorted(n for n in kept if n.startswith(prefix))
    if clash:
        raise BundleError(
            f"bundle {s.bundle} has no report but holds {clash[0]} under {prefix}: refusing"
        )
    added = {_in_bundle(n): e for n, e in report_files.items()}
    try:
        manifest = Manifest.model_validate(
            {
                **source.manifest.model_dump(mode="json"),
                "report": report.model_dump(mode="json"),
                "files": {
                    n: e.model_dump(mode="json") for n, e in sorted({**kept, **added}.items())
                },
            }
        )
    except ValidationError as exc:
        raise invalid(exc, f"bundle {s.out}") from exc

    s.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{s.out.name}.tmp-", dir=s.out.parent))
    linked = copied = 0
    try:
        logger.info("assembling %s (hard links where the filesystem allows)…", s.out)
        sources = [(s.bundle / n, n) for n in kept]
        sources += [(s.report / n, _in_bundle(n)) for n in report_files]
        for src, name in sources:
            if _link_or_copy(src, staging / name):
                linked += 1
            else:
                copied += 1
        write_manifest(staging, manifest)
        # The daemon's own check, before anyone can see the bundle.
        checked = load_bundle(staging)
        if checked.sha256 != source.sha256:  # the report is not part of the identity
            raise BundleError(f"bundle {s.out}: model sha256 changed; refusing")
        staging.chmod(0o755)  # mkdtemp makes it 0700
        _swap_into_place(staging, s.out, overwrite=s.overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return AddReportResult(
        bundle=replace(checked, root=s.out),
        source=source,
        added_files=len(added),
        added_bytes=sum(e.size for e in added.values()),
        linked=linked,
        copied=copied,
        replaced=replaced,
    )


def summary(result: AddReportResult) -> str:
    m = result.bundle.manifest
    r = m.report
    assert r is not None
    total = sum(e.size for e in m.files.values())
    lines = [
        f"bundle     {result.bundle.root}: {len(m.files)} files, {total / 1e6:.1f} MB; report "
        f"added {result.added_files} files, {result.added_bytes / 1e6:.1f} MB "
        f"({result.linked} hard-linked, {result.copied} copied)",
        f"report     {r.name} (from {r.source}): decoder {r.graphs.decoder.precision}; "
        f"at most {r.max_new_tokens} new tokens",
        f"identity   model sha256 {result.bundle.sha256[:12]} (unchanged: the narrative does "
        "not change alert ids)",
    ]
    if result.replaced is not None:
        lines.append(
            f"replaced   the report {result.replaced.name} (from {result.replaced.source}) "
            f"that {result.source.root} had"
        )
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    settings = AddReportSettings(
        bundle=args.bundle,
        report=args.report,
        out=args.out,
        name=args.name,
        prompt_radiograph=args.prompt_radiograph,
        prompt_ct=args.prompt_ct,
        max_new_tokens=args.max_new_tokens,
        overwrite=args.overwrite,
    )
    print(summary(add_report(settings)))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``add-report`` subcommand to edge-export's subparsers."""
    p = sub.add_parser(
        "add-report",
        help="add a MedGemma export (draft narratives for urgent studies) to a bundle",
        description="Write a new engine bundle: --bundle's files (hard links where possible) "
        "plus the edge-export medgemma folder --report under report/, with a 'report' section "
        "in the manifest. The report's files are re-hashed against medgemma.json first. The "
        "narrative does not change the model sha256, so alert ids stay the same.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="engine bundle to start from")
    p.add_argument(
        "--report", type=Path, required=True, help="folder written by edge-export medgemma"
    )
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument(
        "--name",
        help="model name published with each narrative (default: medgemma-<source>, or the "
        "checkpoint folder name if it starts with medgemma)",
    )
    p.add_argument(
        "--prompt-radiograph",
        default=DEFAULT_RADIOGRAPH_PROMPT,
        metavar="TEXT",
        help=f"question asked with a CR/DX image (default: {DEFAULT_RADIOGRAPH_PROMPT!r})",
    )
    p.add_argument(
        "--prompt-ct",
        default=DEFAULT_CT_PROMPT,
        metavar="TEXT",
        help="question asked with a CT slab in three windows (default: one axial slab in "
        "three windows, describe the findings in two or three short sentences)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=token_count,
        default=DEFAULT_MAX_NEW_TOKENS,
        metavar="N",
        help=f"longest narrative in tokens (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out (only a bundle)"
    )
    p.set_defaults(func=_cmd)
