"""The one preflight: what the agent needs before it starts, as a list of checks.

``edge-agent run`` executes the checks marked ``at_start`` in order and stops at the first
failure (exit code by the error's class: 2 for a :class:`~edge_agent.errors.ConfigError`,
3 for a :class:`~edge_agent.errors.ResourceMissing`). ``edge-agent check`` executes every
check, prints each line, and exits 2 when any check failed with a config error, else 3 when
any failed with a missing resource, else 0. Both read the same :data:`CHECKS`, so the two
commands cannot disagree on a check they both run.

A few checks run in ``check`` only (``at_start`` False), each for a stated reason: the state
folder and database (``run`` opens them with the same rules, in
:class:`~edge_agent.store.Store`, and sets a damaged database aside instead of stopping), the
broker (the running agent keeps results in its outbox until the broker answers), and the
platform readings (warnings only). ``docs/interfaces.md`` lists the checks.

Narratives, decided once (:func:`narrative_plan`): enabled explicitly in the config
(``narrative.enabled = true``) with a bundle that cannot write them is a config error naming
``narrative.enabled``, for both commands; enabled only by the profile's default, it is a
warning for both, and the agent runs without narratives.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import (
    BrokerUnreachable,
    ConfigError,
    EdgeTriageError,
    PacsUnreachable,
    ResourceMissing,
)

if TYPE_CHECKING:
    from .bundle import Bundle
    from .config import Settings
    from .profiles import Profile

logger = logging.getLogger(__name__)

Level = Literal["ok", "warn"]
Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Note:
    """One printed line of a check that passed: ``ok`` or ``warn`` (never a failure)."""

    level: Level
    label: str
    text: str


@dataclass
class Found:
    """What the checks resolved, filled in as they pass; ``run`` builds the agent from it."""

    settings: Settings
    profile: Profile | None = None
    profile_reason: str = ""
    bundle: Bundle | None = None
    narrative: bool = False  # the narrative worker runs
    narrative_budget: float = 0.0


@dataclass(frozen=True)
class Check:
    """One precondition. ``run`` returns the lines to print or raises the problem;
    ``needs`` names the :class:`Found` fields it reads (it is skipped while an earlier check
    that fills them failed); ``severity`` says what a raised problem does (``error``: a
    failure, ``warning``: a warn line); ``at_start``: ``edge-agent run`` executes it too."""

    name: str
    run: Callable[[Found], list[Note]]
    needs: tuple[str, ...] = ()
    severity: Severity = "error"
    at_start: bool = True

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


@dataclass
class Outcome:
    check: Check
    notes: list[Note] = field(default_factory=list)
    error: EdgeTriageError | None = None
    missing: tuple[str, ...] = ()  # needs that an earlier failure left unfilled: skipped


# -- the checks ----------------------------------------------------------------------------


def _profile(found: Found) -> list[Note]:
    """The device profile resolves (``profile``: a name in firmware_configs/, a path or
    ``auto``); its memory ceiling against this process's cgroup limit."""
    from .profiles import resolve_profile

    profile, why = resolve_profile(found.settings.profile)
    found.profile, found.profile_reason = profile, why
    notes = [Note("ok", "profile", f"{profile.name} ({why}) from {profile.source}")]
    ceiling = profile.runtime.memory_max_mib
    if ceiling is not None:
        limit = cgroup_memory_max()
        if limit is None:
            # Not a failure: outside systemd (a shell, a container) is fine.
            text = (
                f"profile ceiling {ceiling} MiB is not applied to this process (no cgroup "
                "memory.max); systemd/install.sh --profile sets MemoryMax="
            )
        else:
            text = f"cgroup MemoryMax {limit // 2**20} MiB (profile ceiling {ceiling} MiB)"
        notes.append(Note("ok", "memory", text))
    return notes


def _platform(found: Found) -> list[Note]:
    """The board, CUDA, the ONNX Runtime build and TensorRT, and what the profile wants
    that this box lacks (warnings: the agent falls back)."""
    return [
        Note("ok" if ok else "warn", what, detail)
        for ok, what, detail in platform_report(found.profile)
    ]


def _watch_dir(found: Found) -> list[Note]:
    """``watch_dir`` is a folder this user can list and read."""
    watch = found.settings.watch_dir
    if not (watch.is_dir() and os.access(watch, os.R_OK | os.X_OK)):
        raise ConfigError("watch_dir", f"{watch} is not a readable folder")
    return [Note("ok", "watch_dir", str(watch))]


def _state_dir(found: Found) -> list[Note]:
    """The state folder and database as ``run`` opens them, read only (the store's own
    rules: :func:`~edge_agent.store.state_dir_problem`,
    :func:`~edge_agent.store.inspect_database`)."""
    from .store import inspect_database, state_dir_problem

    state = found.settings.state_dir
    problem = state_dir_problem(state)
    if problem is not None:
        raise problem
    version = inspect_database(state / "state.sqlite3")
    detail = f"schema {version}, quick_check ok" if version else "new state database"
    return [Note("ok", "state_dir", f"{state} ({detail})")]


def _bundle(found: Found) -> list[Note]:
    """The engine bundle (``bundle``, else the demo bundle) loads and its hashes match."""
    from .bundle import load_bundle

    bundle = load_bundle(bundle_path(found.settings))
    found.bundle = bundle
    model = bundle.manifest.model
    demo = " DEMO MODEL, not for clinical use" if model.demo else ""
    return [
        Note(
            "ok",
            "bundle",
            f"{bundle.root}: {model.name} {model.version} {bundle.manifest.precision}{demo}; "
            "hashes verified",
        )
    ]


def _runtime(found: Found) -> list[Note]:
    """The profile's runner can run here: its TensorRT engine in the bundle (runner
    ``tensorrt``), else at least one of its ONNX Runtime execution providers."""
    profile = found.profile
    assert profile is not None
    if profile.runtime.runner == "tensorrt":
        if found.bundle is None:
            raise ResourceMissing("engine: no verified bundle to look for an engine in")
        from .runners.tensorrt import locate_engine

        _identity, key, engine = locate_engine(found.bundle, profile)
        return [Note("ok", "engine", f"TensorRT {engine.precision} engine {engine.file} for {key}")]
    from .runners.onnxruntime import available_providers, choose_providers

    usable, skipped = choose_providers(profile, available_providers())
    note = f"; not available here: {', '.join(skipped)}" if skipped else ""
    return [Note("ok", "providers", f"{' > '.join(usable)} (profile order){note}")]


def _narrative(found: Found) -> list[Note]:
    """Draft narratives: on only when the config (else the profile) enables them and the
    bundle has a report section (see :func:`narrative_plan`)."""
    assert found.profile is not None and found.bundle is not None
    enabled, budget, warning = narrative_plan(found.settings, found.profile, found.bundle)
    found.narrative, found.narrative_budget = enabled, budget
    report = found.bundle.manifest.report
    if warning is not None:
        return [Note("warn", "narrative", warning)]
    if not enabled:
        return [
            Note("ok", "narrative", "off" + (f" (the bundle has {report.name})" if report else ""))
        ]
    assert report is not None
    return [
        Note(
            "ok",
            "narrative",
            f"{report.name}, {report.graphs.decoder.precision}; budget {budget:g} s",
        )
    ]


def _scp_listen(found: Found) -> list[Note]:
    """The Storage SCP (``scp.enabled``) can bind ``scp.bind_address``/``scp.port`` now."""
    from .intake.scp import check_listen

    scp = found.settings.scp
    if not scp.enabled:
        return []
    check_listen(scp)
    callers = ", ".join(scp.allowed_calling_aes) or "any calling AE (allowed_calling_aes empty)"
    return [
        Note("ok", "scp", f"{scp.ae_title} can listen on {scp.bind_address} port {scp.port}"),
        Note("ok", "scp", f"accepts associations from {callers}"),
    ]


def _scp_receive_dir(found: Found) -> list[Note]:
    """The SCP's receive folder (``scp.receive_dir``) is outside ``watch_dir`` and writable."""
    settings = found.settings
    if not settings.scp.enabled:
        return []
    problem = receive_dir_problem(settings)
    if problem is not None:
        raise problem
    folder = settings.scp.receive_folder(settings.state_dir)
    return [Note("ok", "scp", f"received instances go to {folder}")]


def _broker(found: Found) -> list[Note]:
    """The MQTT broker (``mqtt.host``/``mqtt.port``) accepts a connection with the
    configured credentials and TLS."""
    from .mqtt import check_broker

    settings = found.settings
    settings.mqtt.password()
    try:
        check_broker(settings, timeout=5.0)
    except BrokerUnreachable as exc:  # named by the keys that say where the broker is
        raise BrokerUnreachable(f"mqtt.host/mqtt.port: {exc}") from exc
    return [Note("ok", "broker", f"{settings.mqtt.host}:{settings.mqtt.port} reachable")]


def _pacs(found: Found) -> list[Note]:
    """The PACS (``pacs.enabled``) answers C-ECHO at ``pacs.host``/``pacs.port`` as
    ``pacs.called_ae`` and accepts the SR's SOP class (Enhanced SR Storage)."""
    pacs = found.settings.pacs
    if not pacs.enabled:
        return []
    from .pacs.scu import PacsError, Peer, echo
    from .pacs.sr import SOP_CLASS

    try:
        peer = Peer.from_settings(pacs)
        echo(peer, sop_classes=(SOP_CLASS,))
    except PacsError as exc:
        raise pacs_problem(exc.reason) from exc
    tls = " over TLS" if pacs.tls_ca is not None else ""
    return [Note("ok", "pacs", f"{peer.where} answers C-ECHO{tls} and accepts Enhanced SR")]


def pacs_problem(reason: str) -> EdgeTriageError:
    """A PACS refusal as the error that names what to fix: the AE title or TLS key the PACS
    refused (a config error), else where the PACS is (a missing resource)."""
    if "Called AE title not recognised" in reason:
        return ConfigError("pacs.called_ae", reason)
    if "Calling AE title not recognised" in reason:
        return ConfigError("pacs.calling_ae", reason)
    if reason.startswith("TLS "):
        return ConfigError("pacs.tls_ca/tls_cert/tls_key", reason)
    return PacsUnreachable(f"pacs.host/pacs.port: {reason}")


CHECKS: tuple[Check, ...] = (
    Check("profile", _profile),
    Check("platform", _platform, severity="warning", at_start=False),
    Check("watch_dir", _watch_dir),
    Check("state_dir", _state_dir, at_start=False),
    Check("bundle", _bundle),
    Check("runtime", _runtime, needs=("profile",)),
    Check("narrative", _narrative, needs=("profile", "bundle")),
    Check("scp", _scp_listen),
    Check("scp.receive_dir", _scp_receive_dir),
    Check("broker", _broker, at_start=False),
    # Not at start, like the broker: the running agent keeps SRs in its outbox until the
    # PACS answers.
    Check("pacs", _pacs, at_start=False),
)
"""Every check, in the order both commands run them (``docs/interfaces.md`` shows them)."""

# What a failing check prints in its first column, where that is not its name.
_LABELS = {"runtime": "providers", "scp.receive_dir": "scp"}


def label(check: Check, found: Found | None = None) -> str:
    """The first column of a check's lines in ``edge-agent check``."""
    if check.name == "runtime" and found is not None and found.profile is not None:
        return "engine" if found.profile.runtime.runner == "tensorrt" else "providers"
    return _LABELS.get(check.name, check.name)


# -- running them -----------------------------------------------------------------------


def evaluate(found: Found, *, at_start: bool) -> Iterator[Outcome]:
    """Run the checks (only those ``run`` runs when ``at_start``) on ``found.settings``, one
    outcome at a time, filling ``found``. A check whose needs an earlier failure left
    unfilled is skipped, not run."""
    for check in CHECKS:
        if at_start and not check.at_start:
            continue
        missing = tuple(need for need in check.needs if getattr(found, need) is None)
        if missing:
            yield Outcome(check, missing=missing)
            continue
        try:
            outcome = Outcome(check, check.run(found))
        except EdgeTriageError as exc:
            if check.severity == "warning":
                outcome = Outcome(check, [Note("warn", label(check, found), str(exc))])
            else:
                outcome = Outcome(check, error=exc)
        yield outcome


def preflight(settings: Settings) -> Found:
    """What ``edge-agent run`` does before it starts: the ``at_start`` checks in order;
    raises the first failure, logs the warnings."""
    found = Found(settings)
    for outcome in evaluate(found, at_start=True):
        if outcome.error is not None:
            raise outcome.error
        for note in outcome.notes:
            if note.level == "warn":
                logger.warning("%s: %s", note.label, note.text)
            else:
                logger.debug("%s: %s", note.label, note.text)
    return found


def verdict(outcomes: list[Outcome]) -> int:
    """``edge-agent check``'s exit code: 2 when a check failed on the configuration (it
    outranks the rest), 3 when a needed resource is missing, else 0."""
    errors = [o.error for o in outcomes if o.error is not None]
    if any(isinstance(e, ConfigError) for e in errors):
        return 2
    return 3 if errors else 0


# -- the rules the checks apply (one place each) ------------------------------------------


def demo_bundle_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("edge_agent") / "data" / "demo-bundle"))


def bundle_path(settings: Settings) -> Path:
    return settings.bundle if settings.bundle is not None else demo_bundle_path()


def receive_dir_problem(settings: Settings) -> ConfigError | None:
    """Why the SCP's receive folder cannot be used (None: it can). Inside ``watch_dir`` the
    intake would read every received file twice, once from each root."""
    folder = settings.scp.receive_folder(settings.state_dir)
    if folder.is_relative_to(settings.watch_dir.absolute()):
        return ConfigError("scp.receive_dir", f"{folder} must not be inside watch_dir")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return ConfigError("scp.receive_dir", f"{folder} is not writable by this user")
    return None


def narrative_plan(
    settings: Settings, profile: Profile, bundle: Bundle
) -> tuple[bool, float, str | None]:
    """(the narrative worker runs, its time budget in seconds, a warning or None).

    Raises ConfigError ``narrative.enabled`` when the config enables narratives explicitly
    and the bundle has no report section: the operator asked for something the agent cannot
    do. Enabled only by the profile's default, the same bundle is a warning and narratives
    stay off."""
    from .profiles import narrative_wanted

    wanted, budget = narrative_wanted(settings.narrative, profile)
    if not wanted or bundle.manifest.report is not None:
        return wanted, budget, None
    why = f"the bundle {bundle.root} has no report section (edge-export add-report)"
    if settings.narrative.enabled:
        raise ConfigError("narrative.enabled", f"narratives are enabled but {why}")
    return False, budget, f"profile {profile.name} enables narratives but {why}: no narratives"


_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def platform_report(profile: Profile | None, root: Path = Path("/")) -> list[tuple[bool, str, str]]:
    """(ok, what, detail) lines on the platform: the board and its JetPack release, CUDA,
    the ONNX Runtime build and its providers, TensorRT, and what the profile wants that this
    box lacks. Warnings, not failures (``ok`` False marks them): a missing GPU provider makes
    the agent fall back, it does not stop it; the runtime check says whether any provider of
    the profile is usable."""
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
