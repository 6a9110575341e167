"""``edge-export``: build engine bundles for ``edge-agent``.

Exit codes (CONTRACT): 0 ok, 2 usage error, 3 a needed resource is missing (e.g. the
``[export]`` extra), 1 anything else. Errors are one line on stderr; ``--debug`` adds the
traceback. torch and transformers are imported only by the subcommands, so ``--help`` works
without them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from edge_agent import __version__
from edge_agent.errors import EdgeTriageError

PROG = "edge-export"
# Third-party loggers that narrate their internals at INFO/WARNING during an export.
NOISY = ("onnxscript", "onnx_ir", "torch", "transformers")


class _ElapsedFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self.start = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        line = f"[{time.monotonic() - self.start:6.1f}s] {level}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ElapsedFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("export", "edge_agent"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, build_demo_bundle, format_table

    settings = DemoSettings(seed=args.seed, train_seconds=args.train_seconds, steps=args.steps)
    result = build_demo_bundle(args.out, settings, overwrite=args.overwrite)
    size = sum(p.stat().st_size for p in result.bundle.rglob("*") if p.is_file())
    print(format_table(result.metrics))
    print(
        f"bundle {result.bundle}: {size / 1e6:.1f} MB, trained {result.train_seconds:.0f} s, "
        f"total {result.seconds:.0f} s, onnx vs torch cosine "
        f"{result.parity['images_cosine_min']:.6f}"
    )
    return 0


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be within 1..3600 seconds")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Build engine bundles for edge-agent.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="train a tiny SigLIP on simulated studies and write the demo bundle",
        description="Train a tiny SigLIP vision tower on simulated chest studies, export it "
        "to ONNX, fit a linear probe and write a demo bundle (not for clinical use). Fails "
        "without writing if a held-out AUROC is below 0.95.",
    )
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--train-seconds",
        type=_positive_seconds,
        default=300.0,
        help="training time cap in seconds (default 300; the default steps take about 60 s "
        "on one idle core)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=3000,
        help="training steps (default 3000); if the first steps show they cannot all fit in "
        "--train-seconds, fewer are run (the bundle is then no longer reproducible from the "
        "seed alone)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    p.set_defaults(func=cmd_demo)
    return parser


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind like Ctrl-C does, so that worker processes and temporary folders are cleaned up.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(args.debug)
    setup_logging(debug)
    if threading.current_thread() is not threading.main_thread():
        return _run(args, debug)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _run(args, debug)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        return int(args.func(args))
    except EdgeTriageError as exc:
        return _fail(str(exc), exc.exit_code, debug)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in ("edge_agent", "export"):
            return _fail(f"internal error: {exc}", 1, debug)
        return _fail(
            f"Python module {exc.name!r} is missing: install it with "
            "pip install 'edge-triage[export]'",
            3,
            debug,
        )
    except FileExistsError as exc:
        return _fail(str(exc), 2, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, debug)
    except Exception as exc:
        return _fail(
            f"unexpected error: {type(exc).__name__}: {exc}"
            + ("" if debug else " (run with --debug for the traceback)"),
            1,
            debug,
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
