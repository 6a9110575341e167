"""``edge-agent check``: every preflight check, printed whole.

The checks are :data:`edge_agent.preflight.CHECKS`, the list ``edge-agent run`` executes
before it starts (stopping at the first failure), so both commands give the same verdict
on every check they share. Each problem is printed with the config key it comes from.
Exit 0 only when the agent could start; 2 when the configuration is wrong; 3 when a
resource (bundle, provider, broker) is missing or the state database is damaged. The state
database is only ever read.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import ValidationError

from .errors import ConfigError
from .preflight import Found, Outcome, cgroup_memory_max, evaluate, label, platform_report, verdict

__all__ = ["cgroup_memory_max", "platform_report", "run_check"]

_COLUMN = {"ok": "ok  ", "warn": "warn"}


def _line(column: str, what: str, detail: str) -> None:
    print(f"{column} {what:<10} {detail}")


def run_check(config_file: Path | None) -> int:
    from .config import config_errors, load_settings

    try:
        settings = load_settings(config_file)
    except ConfigError as exc:
        cause = exc.__cause__
        errors = config_errors(cause) if isinstance(cause, ValidationError) else [exc]
        for err in errors:
            _line("FAIL", "config", str(err))
        return 2
    source = config_file or os.environ.get("EDGE_AGENT_CONFIG") or "defaults and environment"
    _line("ok  ", "config", f"{source}")

    outcomes: list[Outcome] = []
    found = Found(settings)
    for outcome in evaluate(found, at_start=False):
        outcomes.append(outcome)
        for note in outcome.notes:
            _line(_COLUMN[note.level], note.label, note.text)
        if outcome.error is not None:
            _line("FAIL", label(outcome.check, found), str(outcome.error))
        elif outcome.missing:
            _line("skip", label(outcome.check, found), f"needs {', '.join(outcome.missing)}")
    code = verdict(outcomes)
    problems = sum(o.error is not None for o in outcomes)
    if code:
        print(f"{problems} problem(s)", file=sys.stderr)
    else:
        print("the agent can start")
    return code
