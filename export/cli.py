"""``edge-export``: build engine bundles for ``edge-agent``.

Exit codes (docs/interfaces.md): 0 ok, 2 usage error, 3 a needed resource is missing (e.g. the
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

from .parity import ParityBar

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


def _bar(args: argparse.Namespace) -> ParityBar:
    return ParityBar(cosine_mean=args.min_cosine_mean, triage_agreement=args.min_triage_agreement)


def cmd_siglip(args: argparse.Namespace) -> int:
    from .findings import default_findings_path, load_findings_file
    from .siglip import SiglipSettings, build_siglip_bundle, summary

    findings, ct = load_findings_file(args.findings or default_findings_path())
    settings = SiglipSettings(
        checkpoint=args.checkpoint,
        findings=findings,
        out=args.out,
        ct=ct,
        precision=args.precision,
        int8_mode=args.int8_mode,
        calibration=args.calibration,
        calibration_limit=args.calibration_limit,
        search_images=args.search_images,
        int8_target_cosine=args.int8_target_cosine,
        bar=_bar(args),
        name=args.name,
        version=args.model_version,
        notice=args.notice,
        overwrite=args.overwrite,
        threads=args.threads,
    )
    result = build_siglip_bundle(settings)
    print(summary(result, args.precision))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_bundle

    result = verify_bundle(
        args.bundle,
        images=args.images,
        checkpoint=args.checkpoint,
        reference=args.reference,
        profile=args.profile,
        limit=args.limit,
        bar=_bar(args),
    )
    m = result.bundle.manifest
    print(f"bundle     {args.bundle}: {len(m.files)} files, sha256 verified")
    print(f"model      {m.model.name} {m.model.version} ({m.precision})")
    print(f"identity   model sha256 {result.bundle.sha256}")
    if result.parity is None:
        recorded = m.parity or {}
        print(
            "parity     not re-run (give --images and a reference); recorded at export: "
            + (", ".join(f"{k} {v}" for k, v in recorded.items()) or "none")
        )
        return 0
    p = result.parity
    print(f"provider   {result.provider}")
    print(f"reference  {result.reference}")
    print(
        f"parity     {p.images} images: cosine mean {p.cosine_mean:.5f}, min {p.cosine_min:.5f}; "
        f"max |score delta| {p.max_score_delta:.4f}; triage agreement {p.triage_agreement:.1%}: "
        "passes"
    )
    return 0


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be within 0..1")
    return value


def _add_bar_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-cosine-mean",
        type=_unit_interval,
        default=ParityBar.cosine_mean,
        help=f"parity gate: mean cosine to fp32 at least this (default {ParityBar.cosine_mean})",
    )
    p.add_argument(
        "--min-triage-agreement",
        type=_unit_interval,
        default=ParityBar.triage_agreement,
        help="parity gate: share of images whose triage level is unchanged (default "
        f"{ParityBar.triage_agreement})",
    )


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
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "siglip",
        help="export a local MedSigLIP/SigLIP checkpoint to a bundle (fp32, fp16 or int8)",
        description="Export a local SigLIP checkpoint folder (e.g. google/medsiglip-448, "
        "downloaded after accepting its terms) to an engine bundle: the vision tower as ONNX, "
        "the findings' text embeddings computed once, fp16 or int8 if asked, and a parity gate "
        "against PyTorch fp32 that refuses to write a bundle that gives different answers.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="local checkpoint folder")
    p.add_argument(
        "--findings",
        type=Path,
        help="findings TOML (default: the shipped chest radiograph findings, export/findings/"
        "cxr.toml)",
    )
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument(
        "--int8-mode",
        choices=["dynamic", "qdq"],
        default="dynamic",
        help="dynamic: for ONNX Runtime on a CPU (weights int8, the most sensitive MatMuls kept "
        "fp32; default); qdq: explicit Q/DQ for TensorRT, calibrated on --calibration",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        help="folder of this site's CR/DX DICOM for calibration and the parity gate (required "
        "for int8; without it fp32/fp16 parity uses simulated radiographs)",
    )
    p.add_argument(
        "--calibration-limit",
        type=_positive_int,
        default=64,
        help="at most this many calibration images (default 64)",
    )
    p.add_argument(
        "--search-images",
        type=_positive_int,
        default=8,
        help="calibration images used to choose the fp32 MatMuls of int8 (default 8)",
    )
    p.add_argument(
        "--int8-target-cosine",
        type=_unit_interval,
        default=0.999,
        help="int8 dynamic: keep MatMuls in fp32 until the mean cosine reaches this (0.999)",
    )
    _add_bar_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--name", help="model name in the manifest (default: the checkpoint folder)")
    p.add_argument(
        "--model-version", help="model version in the manifest (default: today, YYYY.MM.DD)"
    )
    p.add_argument("--notice", type=Path, help="licence NOTICE file to ship in the bundle")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=cmd_siglip)

    p = sub.add_parser(
        "verify",
        help="re-check a bundle's hashes and re-run its parity on given images",
        description="Re-check every file's sha256 against the manifest; with --images, run the "
        "bundle's encoder as the daemon would (--profile) and compare it with a reference: the "
        "PyTorch fp32 checkpoint or another bundle on the CPU. Exit 1 below the parity bar.",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("--images", type=Path, help="folder of CR/DX DICOM to compare on")
    p.add_argument("--checkpoint", type=Path, help="reference: PyTorch fp32 checkpoint folder")
    p.add_argument("--reference", type=Path, help="reference: another bundle (e.g. fp32), CPU")
    p.add_argument(
        "--profile", default="x86-cpu", help="profile to run the bundle with (default x86-cpu)"
    )
    p.add_argument("--limit", type=_positive_int, default=64, help="at most this many images")
    _add_bar_arguments(p)
    p.set_defaults(func=cmd_verify)

    # Subcommands that live in their own modules register themselves here (each module's
    # register(sub) adds its parser and sets func); they import torch & co. only when run.
    from . import medgemma, probe, report_bundle, tensorrt
    from .evaluation import command as evaluation

    probe.register(sub)
    evaluation.register(sub)
    tensorrt.register(sub)
    medgemma.register(sub)
    report_bundle.register(sub)
    # `--debug` also after the subcommand (edge-export siglip … --debug), for every one of
    # them; SUPPRESS keeps the top-level value when it is not given there.
    for subparser in sub.choices.values():
        subparser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by evaluate's report
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
