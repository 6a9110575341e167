"""``edge-export tensorrt BUNDLE --profile NAME``: build the bundle's TensorRT engine here.

TensorRT engines only run on the GPU model and TensorRT version that built them, so they are
built on the device itself, never elsewhere. The engine comes from the bundle's encoder ONNX
(parsed from the file, so external weight files work) with the profile's ``[tensorrt]``
precision, workspace and batch shapes, and is recorded in the bundle's manifest under
:func:`edge_agent.bundle.engine_key` of this device: GPU name, compute capability and
TensorRT version, found the way the daemon's TensorRT runner finds them
(:func:`edge_agent.runners.tensorrt.device_identity`). The model's identity
(``model_sha256``, and so alert ids) does not change.

Precision: fp32 sets no flag; fp16 sets TensorRT's FP16 flag; int8 is explicit quantization
only, a bundle whose encoder holds Q/DQ nodes (implicit INT8 calibration is deprecated since
TensorRT 10.1). TensorRT 11 has no precision flags any more (networks are strongly typed, the
precision is the ONNX graph's), so there an fp16 engine needs an fp16 bundle. DLA is not
used: it is for CNNs, and transformer layers would fall back to the GPU silently.

The manifest is updated atomically: the engine file is written (and synced) first, then the
manifest through :func:`edge_agent.bundle.write_manifest`, which checks every hash; the
engine it replaces (same key) is deleted only after the new manifest is in place.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from edge_agent.bundle import (
    Bundle,
    Engine,
    FileEntry,
    Manifest,
    engine_slug,
    invalid,
    load_bundle,
    read_manifest,
    write_manifest,
)
from edge_agent.errors import BundleError, ConfigError, EdgeTriageError
from edge_agent.fsutil import fsync_dir
from edge_agent.profiles import Profile, TensorRTProfile, resolve_profile
from edge_agent.runners.tensorrt import (
    DeviceIdentity,
    device_identity,
    import_tensorrt,
    trt_logger,
)

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
ENGINES_DIR = "engines"
# Log a line at least this often while TensorRT works (builds take minutes).
HEARTBEAT_SECONDS = 30.0
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


class EngineBuildError(EdgeTriageError):
    """TensorRT could not parse the encoder or build the engine (exit 1)."""


# -- what to build ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildSettings:
    """Everything the builder needs, from the profile and the bundle."""

    profile_name: str
    precision: Precision
    workspace_mib: int
    min_batch: int
    opt_batch: int
    max_batch: int
    optimization_level: int
    input_name: str
    output_name: str
    input_size: int
    timing_cache: Path | None

    @classmethod
    def from_profile(
        cls, profile: Profile, section: TensorRTProfile, bundle: Bundle, timing_cache: Path | None
    ) -> BuildSettings:
        encoder = bundle.manifest.encoder
        return cls(
            profile_name=profile.name,
            precision=section.precision,
            workspace_mib=section.workspace_mib,
            min_batch=section.min_batch,
            opt_batch=section.opt_batch,
            max_batch=section.max_batch,
            optimization_level=section.builder_optimization_level,
            input_name=encoder.input_name,
            output_name=encoder.output_name,
            input_size=encoder.preprocessing.input_size,
            timing_cache=timing_cache,
        )


def check_precision(
    requested: Precision, bundle_precision: Precision, qdq_nodes: int | None, profile_name: str
) -> None:
    """Refuse combinations TensorRT cannot build faithfully (ConfigError naming the key).

    ``qdq_nodes``: QuantizeLinear/DequantizeLinear nodes in the encoder, None if not counted.
    """
    key = f"profile({profile_name}).tensorrt.precision"
    if requested == "int8":
        if bundle_precision != "int8":
            raise ConfigError(
                key,
                f"int8 needs a bundle quantized with explicit Q/DQ nodes; this bundle is "
                f"{bundle_precision} (TensorRT's implicit INT8 calibration is deprecated since "
                "10.1 and not used)",
            )
        if qdq_nodes == 0:
            raise ConfigError(
                key,
                "int8 needs Q/DQ (QuantizeLinear/DequantizeLinear) nodes, and this int8 bundle's "
                "encoder has none (dynamically quantized?): export a static Q/DQ int8 bundle",
            )
    elif bundle_precision == "int8":
        raise ConfigError(key, f"is {requested}, but the bundle is int8 (Q/DQ): set it to int8")
    elif requested == "fp32" and bundle_precision == "fp16":
        raise ConfigError(key, "is fp32, but the bundle's encoder is fp16: set it to fp16")


def builder_flags(
    requested: Precision,
    bundle_precision: Precision,
    *,
    weak_typing: bool,
    tensorrt_version: str,
    profile_name: str,
) -> list[str]:
    """TensorRT BuilderFlag names for the requested precision (after :func:`check_precision`).

    ``weak_typing``: this TensorRT still has precision flags (10.x). Without them (11.x) the
    graph's own types decide, so fp16 needs an fp16 bundle."""
    if requested == "fp32":
        return []
    if weak_typing:
        # int8: the Q/DQ-quantized layers run in int8, the others may take fp16 kernels.
        return ["INT8", "FP16"] if requested == "int8" else ["FP16"]
    if requested == "fp16" and bundle_precision != "fp16":
        raise ConfigError(
            f"profile({profile_name}).tensorrt.precision",
            f"TensorRT {tensorrt_version} builds strongly typed networks only (the precision is "
            f"the ONNX graph's), and this bundle is {bundle_precision}: use an fp16 bundle, or "
            "precision fp32",
        )
    return []


def count_qdq_nodes(onnx_path: Path) -> int | None:
    """QuantizeLinear/DequantizeLinear nodes in the graph and its functions; None without the
    ``onnx`` package (TensorRT's parsed network is checked again after parsing)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(onnx_path), load_external_data=False)
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    return sum(1 for node in nodes if node.op_type in QDQ_OPS)


def default_timing_cache(key: str) -> Path:
    """``$XDG_CACHE_HOME/edge-triage/tensorrt/<key>.timing`` (timing caches are per device
    and TensorRT version, like engines; they are not part of the bundle)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-triage" / "tensorrt" / f"{engine_slug(key)}.timing"


# -- building --------------------------------------------------------------------------------


def _parser_error(error: Any) -> str:
    def get(name: str) -> str:
        method = getattr(error, name, None)
        return str(method()) if callable(method) else ""

    where = " ".join(p for p in (get("node_operator"), get("node_name")) if p)
    desc = get("desc") or str(error)
    return f"{where}: {desc}" if where else desc


def _progress_monitor(trt: Any) -> Any:
    """A TensorRT progress monitor that logs phases (with elapsed time, through the CLI's
    formatter) and a heartbeat; Ctrl-C or SIGTERM during the build cancels it cleanly."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.phases: dict[str, tuple[int, int, float]] = {}
            self.last_log = time.monotonic()
            self.interrupt: BaseException | None = None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                depth = 0 if parent_phase is None else self.phases.get(parent_phase, (0,))[0] + 1
                self.phases[phase_name] = (depth, num_steps, time.monotonic())
                if depth <= 1:
                    logger.info("TensorRT: %s%s", "  " * depth, phase_name)
                    self.last_log = time.monotonic()
            except BaseException as exc:  # KeyboardInterrupt/SystemExit: cancel, re-raise later
                self.interrupt = self.interrupt or exc

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                now = time.monotonic()
                if now - self.last_log >= HEARTBEAT_SECONDS:
                    _, steps, _ = self.phases.get(phase_name, (0, 0, now))
                    logger.info("TensorRT: still working: %s, step %d/%d", phase_name, step, steps)
                    self.last_log = now
                return self.interrupt is None
            except BaseException as exc:
                self.interrupt = self.interrupt or exc
                return False

        def phase_finish(self, phase_name: str) -> None:
            try:
                depth, _, started = self.phases.pop(phase_name, (9, 0, 0.0))
                if depth == 0:
                    logger.info(
                        "TensorRT: %s done (%.1f s)", phase_name, time.monotonic() - started
                    )
            except BaseException as exc:
                self.interrupt = self.interrupt or exc

    return _Monitor()


def _check_network(network: Any, settings: BuildSettings) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    n = settings.input_size
    if len(inputs) != 1 or inputs[0].name != settings.input_name:
        raise EngineBuildError(
            f"the encoder's inputs are {[t.name for t in inputs]}, not [{settings.input_name!r}]"
        )
    if settings.output_name not in outputs:
        raise EngineBuildError(f"the encoder's outputs are {outputs}, not {settings.output_name!r}")
    dims = tuple(int(d) for d in inputs[0].shape)
    if len(dims) != 4 or dims[1:] != (3, n, n):
        raise EngineBuildError(f"the encoder takes {dims}, not (batch, 3, {n}, {n})")
    if dims[0] != -1 and not settings.min_batch == settings.max_batch == dims[0]:
        raise ConfigError(
            f"profile({settings.profile_name}).tensorrt.max_batch",
            f"the encoder's batch is fixed at {dims[0]}: set min/opt/max_batch to {dims[0]}",
        )


def _timing_cache(trt: Any, config: Any, path: Path | None) -> Any:
    if path is None:
        return None
    data = b""
    if path.is_file():
        data = path.read_bytes()
        logger.info("timing cache %s (%.1f MB)", path, len(data) / 1e6)
    else:
        logger.info("timing cache %s (new)", path)
    try:
        cache = config.create_timing_cache(data)
        if config.set_timing_cache(cache, False):
            return cache
    except (RuntimeError, TypeError, ValueError) as exc:
        logger.warning("timing cache %s is unusable (%s); starting a new one", path, exc)
    else:
        logger.warning("timing cache %s does not match this TensorRT; starting a new one", path)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(config: Any, path: Path) -> None:
    blob = memoryview(config.get_timing_cache().serialize()).cast("B")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("timing cache saved (%.1f MB)", len(blob) / 1e6)


def build_serialized_engine(
    trt: Any, onnx_path: Path, settings: BuildSettings, flags: list[str]
) -> tuple[Any, int]:
    """Parse ``onnx_path`` and build the engine: (serialized engine, Q/DQ layers seen)."""
    bridge = trt_logger(trt)
    builder = trt.Builder(bridge)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, bridge)
    started = time.monotonic()
    logger.info("parsing %s with TensorRT %s…", onnx_path.name, trt.__version__)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        hint = (
            " (TensorRT takes signed int8 Q/DQ with zero point 0 only: quantize activations and "
            "weights as symmetric QInt8)"
            if settings.precision == "int8"
            else ""
        )
        raise EngineBuildError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: "
            f"{'; '.join(errors[:3]) or 'no reason given'}{hint}"
        )
    qdq_types = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    qdq = sum(1 for i in range(network.num_layers) if network.get_layer(i).type in qdq_types)
    logger.info(
        "parsed in %.1f s: %d layers, %d Q/DQ",
        time.monotonic() - started,
        network.num_layers,
        qdq,
    )
    _check_network(network, settings)
    if settings.precision == "int8" and qdq == 0:
        raise ConfigError(
            f"profile({settings.profile_name}).tensorrt.precision",
            "int8 needs Q/DQ nodes, and TensorRT found none in this encoder",
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    n = settings.input_size
    shapes = [(b, 3, n, n) for b in (settings.min_batch, settings.opt_batch, settings.max_batch)]
    profile = builder.create_optimization_profile()
    profile.set_shape(settings.input_name, *shapes)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT refuses the batch shapes {shapes}")
    timing_cache = _timing_cache(trt, config, settings.timing_cache)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    logger.info(
        "building the engine: %s, batch %d/%d/%d, workspace %d MiB, optimization level %d "
        "(this takes minutes)…",
        settings.precision,
        settings.min_batch,
        settings.opt_batch,
        settings.max_batch,
        settings.workspace_mib,
        settings.optimization_level,
    )
    plan = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.interrupt is not None:
        raise monitor.interrupt
    if plan is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not build the engine (its messages above say "
            f"why; a workspace of {settings.workspace_mib} MiB or the GPU's memory may be too "
            "small)"
        )
    if timing_cache is not None and settings.timing_cache is not None:
        _save_timing_cache(config, settings.timing_cache)
    return plan, qdq


# -- recording -------------------------------------------------------------------------------


def _engine_names(slug: str, sha256: str) -> list[str]:
    first = f"{ENGINES_DIR}/{slug}.plan"
    return [
        first,
        *(f"{ENGINES_DIR}/{slug}-{sha256[:12]}{f'-{i}' if i else ''}.plan" for i in range(9)),
    ]


def _discard_unless_listed(root: Path, name: str) -> None:
    """Remove a new engine file after a failed manifest update, unless the manifest on disk
    already names it (the failure came after the rename)."""
    try:
        listed = name in read_manifest(root).files
    except BundleError:
        listed = True  # cannot tell: keep the file, an unlisted file only causes a warning
    if not listed:
        (root / name).unlink(missing_ok=True)


def install_engine(root: Path, plan: Any, record: Engine) -> tuple[Engine, str | None]:
    """Put a serialized engine (bytes-like: bytes, TensorRT's IHostMemory) into the bundle
    at ``root`` under ``record.key``.

    The file goes to ``engines/<slug>.plan`` (another name while the engine it replaces
    still holds that one), written and synced before the manifest is replaced; the
    replaced engine's file is deleted last. Returns (the recorded engine, the replaced file).
    ``record.file`` is ignored."""
    data = memoryview(plan).cast("B")
    sha256 = hashlib.sha256(data).hexdigest()
    manifest = read_manifest(root)
    key = record.key
    name = next(n for n in _engine_names(engine_slug(key), sha256) if n not in manifest.files)
    folder = root / ENGINES_DIR
    folder.mkdir(exist_ok=True)
    target = root / name
    tmp = folder / f".{target.name}.tmp-{os.getpid()}"
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)

    engines = dict(manifest.engines)
    files = dict(manifest.files)
    replaced: str | None = None
    old = engines.pop(key, None)
    if old is not None and all(e.file != old.file for e in engines.values()):
        files.pop(old.file, None)
        replaced = old.file
    entry = record.model_copy(update={"file": name})
    engines[key] = entry
    files[name] = FileEntry(sha256=sha256, size=len(data))
    try:
        updated = Manifest.model_validate(
            {
                **manifest.model_dump(mode="json"),
                "engines": {k: e.model_dump(mode="json") for k, e in engines.items()},
                "files": {k: e.model_dump(mode="json") for k, e in files.items()},
            }
        )
        write_manifest(root, updated)
    except ValidationError as exc:
        target.unlink(missing_ok=True)
        raise invalid(exc, f"bundle {root}") from exc
    except BaseException:
        _discard_unless_listed(root, name)
        raise
    if replaced is not None and replaced != name:
        (root / replaced).unlink(missing_ok=True)
    return entry, replaced


# -- the command -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    key: str
    engine: Engine
    size: int
    identity: DeviceIdentity
    model_sha256: str
    replaced: str | None


def build_for_bundle(
    bundle_root: Path, profile_spec: str, *, timing_cache: Path | Literal["default"] | None
) -> BuildResult:
    """Build this device's engine for the bundle at ``bundle_root`` and record it.

    ``timing_cache``: a file, None for none, or "default" for the profile's choice (a file
    under the user's cache folder when ``tensorrt.timing_cache`` is true)."""
    profile, why = resolve_profile(profile_spec)
    section = profile.tensorrt
    if section is None:
        raise ConfigError(
            f"profile({profile.name}).tensorrt",
            "missing: this profile does not describe TensorRT engines; choose one that does "
            "(x86-cuda, jetson-orin-nano, jetson-orin-nx, jetson-agx-orin)",
        )
    logger.info("profile %s (%s)", profile.name, why)
    if section.engine != "bundle":
        logger.info(
            "note: profile %s runs TensorRT through ONNX Runtime's engine cache (tensorrt.engine "
            "= %r); the bundle's engine is used with runtime.runner = 'tensorrt'",
            profile.name,
            section.engine,
        )
    logger.info("verifying bundle %s…", bundle_root)
    bundle = load_bundle(bundle_root)
    precision = bundle.manifest.precision
    qdq = None
    if "int8" in (section.precision, precision):
        qdq = count_qdq_nodes(bundle.encoder_path)
    check_precision(section.precision, precision, qdq, profile.name)

    trt = import_tensorrt()
    identity = device_identity()
    key = identity.key(trt.__version__)
    logger.info(
        "device %s (compute capability %s, via %s): key %r",
        identity.name,
        identity.compute_capability,
        identity.source,
        key,
    )
    weak = hasattr(trt, "BuilderFlag") and hasattr(trt.BuilderFlag, "FP16")
    flags = builder_flags(
        section.precision,
        precision,
        weak_typing=weak,
        tensorrt_version=trt.__version__,
        profile_name=profile.name,
    )
    cache: Path | None
    if timing_cache == "default":
        cache = default_timing_cache(key) if section.timing_cache else None
    else:
        cache = timing_cache
    settings = BuildSettings.from_profile(profile, section, bundle, cache)

    started = time.monotonic()
    plan, _ = build_serialized_engine(trt, bundle.encoder_path, settings, flags)
    seconds = time.monotonic() - started
    record = Engine(
        file="-",
        device=identity.name,
        compute_capability=identity.compute_capability,
        tensorrt_version=trt.__version__,
        precision=section.precision,
        profile=profile.name,
        min_batch=section.min_batch,
        opt_batch=section.opt_batch,
        max_batch=section.max_batch,
        workspace_mib=section.workspace_mib,
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(seconds, 1),
    )
    size = memoryview(plan).nbytes
    logger.info("built in %.1f s (%.1f MB); recording it in the manifest…", seconds, size / 1e6)
    entry, replaced = install_engine(bundle.root, plan, record)
    del plan
    after = load_bundle(bundle.root)
    if after.sha256 != bundle.sha256:  # pragma: no cover - install_engine never touches it
        raise BundleError(f"bundle {bundle.root}: model sha256 changed while adding an engine")
    return BuildResult(
        bundle=bundle.root,
        key=key,
        engine=entry,
        size=size,
        identity=identity,
        model_sha256=after.sha256,
        replaced=replaced,
    )


def format_summary(result: BuildResult) -> str:
    e = result.engine
    lines = [
        f"TensorRT engine for {result.key}",
        f"  file      {e.file} ({result.size / 1e6:.1f} MB)",
        f"  built in  {e.build_seconds:.1f} s ({e.precision}, batch {e.min_batch}/{e.opt_batch}/"
        f"{e.max_batch}, workspace {e.workspace_mib} MiB, profile {e.profile})",
        f"  device    {result.identity.name}, compute capability "
        f"{result.identity.compute_capability} (via {result.identity.source})",
        f"  bundle    {result.bundle}, model sha256 {result.model_sha256[:12]} (unchanged)",
    ]
    if result.replaced:
        lines.append(f"  replaced  {result.replaced}")
    return "\n".join(lines)


def cmd_tensorrt(args: argparse.Namespace) -> int:
    timing_cache: Path | Literal["default"] | None = "default"
    if args.no_timing_cache:
        timing_cache = None
    elif args.timing_cache is not None:
        timing_cache = args.timing_cache
    result = build_for_bundle(args.bundle, args.profile, timing_cache=timing_cache)
    print(format_summary(result))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``tensorrt`` subcommand to edge-export's subparsers."""
    p = sub.add_parser(
        "tensorrt",
        help="build the bundle's TensorRT engine on this device and record it in the bundle",
        description="Build a TensorRT engine from the bundle's encoder ONNX on this device "
        "(engines are specific to the GPU and the TensorRT version, so never build them "
        "elsewhere), with the profile's [tensorrt] precision, workspace and batch shapes, and "
        "record it in the bundle's manifest under this device's key. Needs TensorRT's Python "
        "API (JetPack's python3-libnvinfer on a Jetson; pip install tensorrt on x86) and a "
        "GPU; exits 3 without them. Takes minutes.",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="the bundle folder to add to")
    p.add_argument(
        "--profile",
        default="auto",
        metavar="NAME",
        help="device profile with a [tensorrt] section: a name in firmware_configs/, a path, "
        "or auto (default: auto)",
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--timing-cache",
        type=Path,
        metavar="FILE",
        help="TensorRT timing cache file to read and update (default: one per device under "
        "~/.cache/edge-triage/tensorrt/ when the profile's tensorrt.timing_cache is true)",
    )
    cache.add_argument("--no-timing-cache", action="store_true", help="use no timing cache")
    p.set_defaults(func=cmd_tensorrt)
