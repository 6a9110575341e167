"""``edge-agent check``: everything the agent needs, checked the way ``run`` would use it.

Each problem is printed with the config key it comes from. Exit 0 only when the agent could
start; 2 when the configuration is wrong; 3 when a resource (bundle, provider, broker) is
missing or the state database is damaged. The state database is only ever read.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .errors import ConfigError, EdgeTriageError, ResourceMissing

if TYPE_CHECKING:
    from .config import Settings
    from .profiles import Profile


def _line(ok: bool, what: str, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what:<10} {detail}")


_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def platform_report(profile: Profile | None, root: Path = Path("/")) -> list[tuple[bool, str, str]]:
    """(ok, what, detail) lines on the platform: the board and its JetPack release, CUDA,
    the ONNX Runtime build and its providers, TensorRT, and what the profile wants that this
    box lacks. Warnings, not failures (``ok`` False marks them): a missing GPU provider makes
    the agent fall back, it does not stop it; the provider check below says whether any
    provider of the profile is usable."""
    from . import platform

    lines: list[tuple[bool, str, str]] = []
    jetson = platform.is_jetson(root)
    model = platform.device_tree_model(root)
    if jetson:
        release = platform.l4t_release(root)
        lines.append(
            (True, "platform", f"{model}; {release.describe() if release else 'L4T release ?'}")
        )
    else:
        machine = os.uname().machine
        lines.append((True, "platform", f"{model + ', ' if model else ''}{machine}, not a Jetson"))
    wants_gpu = profile is not None and (
        profile.runtime.runner == "tensorrt"
        or any(p in _GPU_PROVIDERS for p in profile.runtime.providers)
    )
    cuda = platform.cuda_version(root)
    if cuda is not None or jetson or wants_gpu:
        lines.append((cuda is not None, "cuda", f"CUDA {cuda}" if cuda else "no CUDA toolkit"))
    ort = platform.ort_build()
    problem = ort.problem
    if jetson and ort.name == "onnxruntime":
        problem = (
            "the CPU-only onnxruntime: on a Jetson install the onnxruntime-gpu wheel for its "
            "JetPack release from NVIDIA (systemd/install.sh --ort-wheel FILE)"
        )
    lines.append((problem is None, "ort", ort.describe() + (f": {problem}" if problem else "")))
    trt = platform.tensorrt_version()
    wants_trt = profile is not None and (
        profile.runtime.runner == "tensorrt"
        or "TensorrtExecutionProvider" in profile.runtime.providers
    )
    if trt is not None or wants_trt:
        detail = f"TensorRT {trt} (Python module)" if trt else "the tensorrt module does not import"
        lines.append((trt is not None, "tensorrt", detail))
    if profile is not None and profile.runtime.runner == "onnxruntime":
        missing = [p for p in profile.runtime.providers if p not in ort.providers]
        usable = [p for p in profile.runtime.providers if p in ort.providers]
        if missing and usable:
            lines.append(
                (
                    False,
                    "missing",
                    f"profile {profile.name} wants {', '.join(missing)}; this ONNX Runtime "
                    f"lacks it, so the encoder runs on {usable[0]}",
                )
            )
    return lines


def _print_platform(profile: Profile | None) -> None:
    for ok, what, detail in platform_report(profile):
        print(f"{'ok  ' if ok else 'warn'} {what:<10} {detail}")


def _check_scp(
    settings: Settings, config_problems: list[ConfigError], resource_problems: list[EdgeTriageError]
) -> None:
    """The Storage SCP: its address can be bound now, its receive folder can be written."""
    from .intake.scp import check_listen

    scp = settings.scp
    try:
        check_listen(scp)
        callers = ", ".join(scp.allowed_calling_aes) or "any calling AE (allowed_calling_aes empty)"
        _line(True, "scp", f"{scp.ae_title} can listen on {scp.bind_address} port {scp.port}")
        _line(True, "scp", f"accepts associations from {callers}")
    except ConfigError as exc:
        _line(False, "scp", str(exc))
        config_problems.append(exc)
    except ResourceMissing as exc:
        _line(False, "scp", str(exc))
        resource_problems.append(exc)
    folder = scp.receive_folder(settings.state_dir)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if folder.is_relative_to(settings.watch_dir.absolute()):
        err = ConfigError("scp.receive_dir", f"{folder} must not be inside watch_dir")
    elif not os.access(existing, os.W_OK | os.X_OK):
        err = ConfigError("scp.receive_dir", f"{folder} is not writable by this user")
    else:
        _line(True, "scp", f"received instances go to {folder}")
        return
    _line(False, "scp", str(err))
    config_problems.append(err)


def _check_state(
    state: Path, config_problems: list[ConfigError], resource_problems: list[EdgeTriageError]
) -> None:
    """The state folder as ``run`` would open it, read-only: never a write to the database."""
    from .store import inspect_database, state_dir_problem

    err: EdgeTriageError | None = state_dir_problem(state)
    version = None
    if err is None:
        try:
            version = inspect_database(state / "state.sqlite3")
        except EdgeTriageError as exc:
            err = exc
    if err is None:
        detail = f"schema {version}, quick_check ok" if version else "new state database"
        _line(True, "state_dir", f"{state} ({detail})")
        return
    _line(False, "state_dir", str(err))
    if isinstance(err, ConfigError):
        config_problems.append(err)
    else:
        resource_problems.append(err)


def cgroup_memory_max(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """This process's cgroup v2 memory limit in bytes, or None when there is none ("max")
    or it cannot be read (cgroup v1, no /sys/fs/cgroup)."""
    try:
        for line in proc_cgroup.read_text().splitlines():
            hierarchy, _, path = line.partition("::")
            if hierarchy == "0":
                value = (root / path.lstrip("/") / "memory.max").read_text().strip()
                return None if value == "max" else int(value)
    except (OSError, ValueError):
        return None
    return None


def run_check(config_file: Path | None) -> int:
    from .bundle import Bundle, load_bundle
    from .config import config_errors, load_settings
    from .mqtt import check_broker
    from .profiles import narrative_wanted, resolve_profile
    from .runners.onnxruntime import available_providers, choose_providers
    from .service import bundle_path

    config_problems: list[ConfigError] = []
    resource_problems: list[EdgeTriageError] = []
    try:
        settings: Settings | None = load_settings(config_file)
    except ConfigError as exc:
        cause = exc.__cause__
        errors = config_errors(cause) if isinstance(cause, ValidationError) else [exc]
        for err in errors:
            _line(False, "config", str(err))
        return 2
    assert settings is not None
    source = config_file or os.environ.get("EDGE_AGENT_CONFIG") or "defaults and environment"
    _line(True, "config", f"{source}")

    try:
        profile, why = resolve_profile(settings.profile)
        _line(True, "profile", f"{profile.name} ({why}) from {profile.source}")
        ceiling = profile.runtime.memory_max_mib
        if ceiling is not None:
            limit = cgroup_memory_max()
            if limit is None:
                # A warning, not a failure: outside systemd (a shell, a container) is fine.
                _line(
                    True,
                    "memory",
                    f"profile ceiling {ceiling} MiB is not applied to this process (no cgroup "
                    "memory.max); systemd/install.sh --profile sets MemoryMax=",
                )
            else:
                _line(
                    True,
                    "memory",
                    f"cgroup MemoryMax {limit // 2**20} MiB (profile ceiling {ceiling} MiB)",
                )
    except ConfigError as exc:
        _line(False, "profile", str(exc))
        config_problems.append(exc)
        profile = None

    _print_platform(profile)

    if settings.watch_dir.is_dir() and os.access(settings.watch_dir, os.R_OK | os.X_OK):
        _line(True, "watch_dir", str(settings.watch_dir))
    else:
        err = ConfigError("watch_dir", f"{settings.watch_dir} is not a readable folder")
        _line(False, "watch_dir", str(err))
        config_problems.append(err)

    _check_state(settings.state_dir, config_problems, resource_problems)

    bundle: Bundle | None = None
    try:
        bundle = load_bundle(bundle_path(settings))
        model = bundle.manifest.model
        _line(
            True,
            "bundle",
            f"{bundle.root}: {model.name} {model.version} {bundle.manifest.precision}"
            f"{' DEMO MODEL, not for clinical use' if model.demo else ''}; hashes verified",
        )
    except ResourceMissing as exc:
        _line(False, "bundle", f"bundle: {exc}")
        resource_problems.append(exc)

    if profile is not None and profile.runtime.runner == "tensorrt":
        try:
            if bundle is None:
                raise ResourceMissing("no verified bundle to look for an engine in")
            from .runners.tensorrt import locate_engine

            _identity, key, engine = locate_engine(bundle, profile)
            _line(True, "engine", f"TensorRT {engine.precision} engine {engine.file} for {key}")
        except ResourceMissing as exc:
            _line(False, "engine", str(exc))
            resource_problems.append(exc)
    elif profile is not None:
        try:
            available = available_providers()
            usable, skipped = choose_providers(profile, available)
            note = f"; not available here: {', '.join(skipped)}" if skipped else ""
            _line(True, "providers", f"{' > '.join(usable)} (profile order){note}")
        except ResourceMissing as exc:
            _line(False, "providers", str(exc))
            resource_problems.append(exc)

    if profile is not None and bundle is not None:
        wanted, budget = narrative_wanted(settings.narrative, profile)
        report = bundle.manifest.report
        if not wanted:
            detail = "off" + (f" (the bundle has {report.name})" if report else "")
            _line(True, "narrative", detail)
        elif report is None:
            err = ConfigError(
                "narrative.enabled",
                "narratives are enabled but the bundle has no report section "
                "(edge-export add-report)",
            )
            _line(False, "narrative", str(err))
            config_problems.append(err)
        else:
            _line(
                True,
                "narrative",
                f"{report.name}, {report.graphs.decoder.precision}; budget {budget:g} s",
            )

    if settings.scp.enabled:
        _check_scp(settings, config_problems, resource_problems)

    try:
        settings.mqtt.password()
        check_broker(settings, timeout=5.0)
        _line(True, "broker", f"{settings.mqtt.host}:{settings.mqtt.port} reachable")
    except ConfigError as exc:
        _line(False, "broker", str(exc))
        config_problems.append(exc)
    except ResourceMissing as exc:
        _line(False, "broker", f"mqtt.host/mqtt.port: {exc}")
        resource_problems.append(exc)

    if config_problems:
        print(f"{len(config_problems) + len(resource_problems)} problem(s)", file=sys.stderr)
        return 2
    if resource_problems:
        print(f"{len(resource_problems)} problem(s)", file=sys.stderr)
        return 3
    print("the agent can start")
    return 0
