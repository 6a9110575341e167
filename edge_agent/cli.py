"""``edge-agent``: thin command line over the public API.

Exit codes (docs/interfaces.md): 0 ok, 2 usage or config error, 3 a needed resource is missing,
1 anything else. Errors are one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import __version__
from .errors import ConfigError, EdgeTriageError

logger = logging.getLogger("edge_agent")


def setup_logging(level: str = "INFO", *, dicom_client_only: bool = False) -> None:
    """The process's logging: one handler (journald or stderr) at ``level``.

    ``dicom_client_only``: the process only opens associations (the PACS sender), and our
    own line says how each ended and why, so pynetdicom's ERROR records of the same failure
    (with a traceback each: three records per refused attempt) are left out unless
    ``level`` is DEBUG."""
    from .logs import make_handler

    handler = make_handler()  # journald's native protocol under systemd, else stderr lines
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pydicom's warnings quote element values (patient data): the handler's filter drops
    # them (edge_agent/logs.py), since importing pydicom resets its logger's level.
    # pynetdicom narrates every association at INFO (no PHI, but three lines per C-STORE).
    quiet = dicom_client_only and level != "DEBUG"
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL if quiet else logging.WARNING)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)


def _load(args: argparse.Namespace):
    from .config import load_settings

    return load_settings(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    setup_logging(settings.log_level if not args.debug else "DEBUG")
    from .service import Agent

    agent = Agent(settings)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check

    return run_check(args.config)


def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import simulate, truth_line

    args.out.mkdir(parents=True, exist_ok=True)
    for study in simulate(
        args.out,
        studies=args.studies,
        modality=args.modality,
        abnormal=args.abnormal,
        seed=args.seed,
        interval_seconds=args.interval,
        **({"rows": args.matrix[0], "cols": args.matrix[1]} if args.matrix else {}),
    ):
        print(truth_line(study), flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    setup_logging("DEBUG" if args.debug else "WARNING")
    return run_demo(
        studies=args.studies, broker=args.broker, seed=args.seed, keep=args.keep, hold=args.hold
    )


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from .status import find_file, format_file, format_status, read_status

    settings = _load(args)
    database = settings.state_dir / "state.sqlite3"
    try:
        if args.file is not None:
            found = find_file(database, args.file)
            if found is None:
                raise EdgeTriageError(f"no file with id {args.file!r} in {database}")
            print(json.dumps(found, indent=2) if args.json else format_file(found))
            return 0
        report = read_status(database, last=args.last)
    except sqlite3.Error as exc:  # damaged, held, unreadable: one line saying what to do
        from .store import state_error

        err = state_error(exc, database)
        if err is None:
            raise
        raise err from exc
    except PermissionError as exc:
        raise ConfigError(
            "state_dir",
            f"cannot read {database} ({exc.strerror}); run as the agent's user, e.g. "
            "sudo -u edge-agent edge-agent status",
        ) from exc
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_status(report))
    return 0


BOARD_MODULES = ("starlette", "uvicorn", "argon2")


def _board_extra() -> None:
    """The [board] extra is installed, else ExtraMissing saying so."""
    import importlib.util

    from .errors import ExtraMissing

    for module in BOARD_MODULES:
        if importlib.util.find_spec(module) is None:
            raise ExtraMissing(module, "board")


def cmd_board(args: argparse.Namespace) -> int:
    _board_extra()
    settings = _load(args)
    if args.board_command == "add-user":
        from .board.auth import add_user

        password = sys.stdin.readline().rstrip("\r\n")
        replaced = add_user(settings.board.users_file, args.name, password)
        action = "replaced" if replaced else "added"
        print(f"account {args.name!r} {action} in {settings.board.users_file}")
        return 0
    setup_logging(settings.log_level if not args.debug else "DEBUG")
    from .board.server import BoardServer

    BoardServer(settings).run()
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .results import json_schema_text

    text = json_schema_text()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _matrix(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("expected ROWSxCOLS, e.g. 2048x1664") from exc
    if not (16 <= rows <= 8192 and 16 <= cols <= 8192):
        raise argparse.ArgumentTypeError("rows and columns must be within 16..8192")
    return rows, cols


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be within 0..1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    p.add_argument("--config", type=Path, help="TOML file (default: $EDGE_AGENT_CONFIG)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "status", help="what the state database says: queue, outbox, alerts, rejects, results"
    )
    p.add_argument("--config", type=Path)
    p.add_argument("--last", type=int, default=5, help="recent results and rejects (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--file",
        metavar="FILE_ID",
        help="show the file a P/rejected message's file_id names (its path, status, reason)",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", help="validate config, bundle, providers and broker")
    p.add_argument("--config", type=Path, help="TOML file (default: $EDGE_AGENT_CONFIG)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("simulate", help="write simulated studies the way a modality does")
    p.add_argument("--out", type=Path, required=True, help="folder to write into")
    p.add_argument("--studies", type=int, default=5, help="number of studies (default 5)")
    p.add_argument("--modality", choices=["CR", "DX", "CT"], default="CR")
    p.add_argument("--abnormal", type=_fraction, default=0.3, help="fraction with a finding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matrix", type=_matrix, help="image size ROWSxCOLS (default realistic)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between studies")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("demo", help="end-to-end demo on this machine (demo model)")
    p.add_argument("--studies", type=int, default=6)
    p.add_argument("--broker", help="HOST:PORT of a broker to use instead of a private one")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, help="keep the demo's folders here")
    p.add_argument(
        "--hold",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the triage board up after the table until Enter (default: on a terminal)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("board", help="serve the triage board (web page) for every box")
    p.add_argument("--config", type=Path, help="TOML file (default: $EDGE_AGENT_CONFIG)")
    p.set_defaults(func=cmd_board, board_command=None)
    board = p.add_subparsers(dest="board_command")
    q = board.add_parser(
        "add-user", help="add an account to board.users_file; the password is read from stdin"
    )
    q.add_argument("name", help="user name (letters, digits, _ . @ -)")
    q.add_argument("--config", type=Path, default=argparse.SUPPRESS)

    p = sub.add_parser("schema", help="print the study-result JSON Schema")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_schema)
    return parser


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that Python's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (captured): nothing left to flush
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not as noise at interpreter exit
        return code
    except BrokenPipeError:
        # The reader went away (edge-agent status | head): stop quietly, as a command killed
        # by SIGPIPE would, without the daemon's sockets ever being exposed to SIGPIPE.
        _discard_stdout()
        return 128 + signal.SIGPIPE
    except ConfigError as exc:
        if args.debug:
            raise
        print(f"edge-agent: config error: {exc}", file=sys.stderr)
        return exc.exit_code
    except EdgeTriageError as exc:
        if args.debug:
            raise
        print(f"edge-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"edge-agent: unexpected error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
