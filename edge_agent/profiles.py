"""Device profiles (``firmware_configs/*.toml``): how this box runs the models.

A profile names the runner, the ONNX Runtime execution providers in order of preference,
thread counts and batch size, and, for NVIDIA GPUs, a ``[tensorrt]`` section: the precision,
workspace and batch shapes of TensorRT engines, and where the engine comes from (the
bundle's own engine built by ``edge-export tensorrt``, run by ``runner = "tensorrt"``; or
ONNX Runtime's TensorRT execution provider with its engine cache in ``state_dir``).
``profile = "auto"`` detects the device from ``/proc/device-tree/model`` (Jetson) and
otherwise picks the x86 profile. A ``[health]`` section sets the limits of the box's health
(:mod:`edge_agent.health`).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import NarrativeBudget, NarrativeSettings, read_toml
from .errors import ConfigError
from .platform import read_model

logger = logging.getLogger(__name__)

ProviderName = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def profile_dirs() -> list[Path]:
    """Where named profiles live: in the wheel, then in a source checkout."""
    here = Path(__file__).resolve().parent
    return [here / "firmware_configs", here.parent / "firmware_configs"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _KeyedProblem(ValueError):
    """A cross-field problem that knows which key to blame (pydantic keeps the exception)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class RuntimeProfile(_Section):
    runner: Literal["onnxruntime", "tensorrt"] = Field(
        default="onnxruntime",
        description="Runner family that executes the encoder: ONNX Runtime with the providers "
        "below, or 'tensorrt', the bundle's own TensorRT engine for this device.",
    )
    providers: list[ProviderName] = Field(
        default=["CPUExecutionProvider"],
        min_length=1,
        description="ONNX Runtime execution providers, most preferred first.",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="Threads inside one operator; 0 lets ONNX Runtime choose."
    )
    batch_size: int = Field(default=1, ge=1, le=64, description="Images per encoder call.")
    precision: Literal["fp32", "fp16", "int8"] = Field(
        default="fp32", description="Precision the device is meant to run (bundle must match)."
    )
    memory_max_mib: int | None = Field(
        default=None,
        ge=256,
        description="Memory ceiling of the whole service in MiB, applied as systemd's "
        "MemoryMax= by systemd/install.sh --profile; edge-agent check compares it with the "
        "running cgroup's limit. None: no ceiling.",
    )


class TensorRTProfile(_Section):
    """How TensorRT engines are built for this device (both engine sources use it)."""

    engine: Literal["bundle", "ort-cache"] = Field(
        default="bundle",
        description="'bundle': the engine edge-export tensorrt built into the bundle on this "
        "device (runtime.runner = 'tensorrt'); 'ort-cache': ONNX Runtime's TensorRT execution "
        "provider builds engines itself and caches them in state_dir. Left out, it follows "
        "runtime.runner (so that switching the runner is one line).",
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        default="fp16",
        description="Precision TensorRT computes in. int8 needs a bundle quantized with "
        "explicit Q/DQ nodes (implicit INT8 calibration is deprecated since TensorRT 10.1).",
    )
    workspace_mib: int = Field(
        default=1024, ge=16, le=1 << 20, description="Builder workspace memory limit in MiB."
    )
    min_batch: int = Field(default=1, ge=1, le=64, description="Smallest batch the engine takes.")
    opt_batch: int = Field(default=1, ge=1, le=64, description="Batch the engine is tuned for.")
    max_batch: int = Field(default=1, ge=1, le=64, description="Largest batch the engine takes.")
    builder_optimization_level: int = Field(
        default=3, ge=0, le=5, description="TensorRT builder optimization level (0-5; 3 default)."
    )
    timing_cache: bool = Field(
        default=True, description="Keep TensorRT's timing cache so that rebuilds are faster."
    )

    @model_validator(mode="after")
    def _batches_ordered(self) -> TensorRTProfile:
        if self.opt_batch < self.min_batch:
            raise _KeyedProblem("tensorrt.opt_batch", "must be at least min_batch")
        if self.max_batch < self.opt_batch:
            raise _KeyedProblem("tensorrt.max_batch", "must be at least opt_batch")
        return self


class HealthProfile(_Section):
    """The box's health: how often it is read and the limits that raise a warning in the
    status and the log (once when crossed, once when cleared). Below ``min_state_free_mib``
    the intake also pauses until space is back."""

    interval_seconds: float = Field(
        default=10.0, gt=0, le=3600, description="Seconds between two health readings."
    )
    max_soc_temp_c: float = Field(
        default=90.0,
        ge=30,
        le=150,
        description="SoC temperature (Jetson tj-thermal; elsewhere the hottest non-GPU thermal "
        "zone) above which the status warns, in °C.",
    )
    min_state_free_mib: int = Field(
        default=1024,
        ge=0,
        description="Free MiB on state_dir's file system below which the status warns AND the "
        "intake pauses (the state database, the outbox and C-STORE copies live there); 0: off.",
    )
    min_state_free_percent: float = Field(
        default=5.0, ge=0, le=100, description="Free percent on state_dir's file system: warning."
    )
    min_watch_free_mib: int = Field(
        default=2048,
        ge=0,
        description="Free MiB on watch_dir's file system below which the status warns (the "
        "modality writes there; the agent only reads); 0: off.",
    )
    min_watch_free_percent: float = Field(
        default=5.0, ge=0, le=100, description="Free percent on watch_dir's file system: warning."
    )
    min_available_memory_mib: int = Field(
        default=512,
        ge=0,
        description="MemAvailable (MiB; a Jetson's GPU shares it) below which the status warns.",
    )


class NarrativeProfile(_Section):
    """MedGemma's draft narrative for urgent studies (bundles with a ``report`` section)."""

    enabled: bool = Field(
        default=False,
        description="Write draft narratives on this device (config narrative.enabled "
        "overrides). Off where the language model does not fit beside the encoder.",
    )
    time_budget_seconds: NarrativeBudget = Field(
        default=120.0,
        description="From the flag's commit: a narrative not ready by then is published as "
        "narrative_status 'timeout'.",
    )
    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Tokens generated at most; None: the bundle's report.max_new_tokens.",
    )
    providers: list[ProviderName] = Field(
        default=["CPUExecutionProvider"],
        min_length=1,
        description="ONNX Runtime providers for the language model, most preferred first "
        "(TensorRT is not used for it: its KV cache shapes change every token).",
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="Threads inside one operator; 0 lets ONNX Runtime choose."
    )
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU priority of the narrative thread and its ONNX Runtime threads, "
        "relative to the rest of the agent (Linux nice): the encoder's threads win the cores.",
    )

    @model_validator(mode="after")
    def _no_tensorrt(self) -> NarrativeProfile:
        if "TensorrtExecutionProvider" in self.providers:
            raise _KeyedProblem(
                "narrative.providers",
                "TensorrtExecutionProvider is not supported for the language model; use "
                "CUDAExecutionProvider",
            )
        return self


def narrative_wanted(settings: NarrativeSettings, profile: Profile) -> tuple[bool, float]:
    """(narratives enabled, time budget in seconds): the agent config's ``[narrative]`` where
    it sets them, else the profile's."""
    enabled = settings.enabled if settings.enabled is not None else profile.narrative.enabled
    budget = settings.time_budget_seconds or profile.narrative.time_budget_seconds
    return enabled, budget


class Profile(_Section):
    name: str
    description: str
    runtime: RuntimeProfile = Field(default_factory=RuntimeProfile)
    tensorrt: TensorRTProfile | None = Field(
        default=None,
        description="TensorRT engine settings; needed by runner 'tensorrt' and by "
        "the TensorrtExecutionProvider.",
    )
    narrative: NarrativeProfile = Field(default_factory=NarrativeProfile)
    health: HealthProfile = Field(default_factory=HealthProfile)
    source: str = Field(default="", description="File the profile was read from.")

    @model_validator(mode="before")
    @classmethod
    def _engine_follows_runner(cls, data: Any) -> Any:
        """A [tensorrt] section without ``engine`` takes the one its runner uses."""
        if not isinstance(data, dict):
            return data
        trt, runtime = data.get("tensorrt"), data.get("runtime")
        if isinstance(trt, dict) and "engine" not in trt:
            runner = runtime.get("runner") if isinstance(runtime, dict) else None
            data = {
                **data,
                "tensorrt": {**trt, "engine": "bundle" if runner == "tensorrt" else "ort-cache"},
            }
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        runtime, trt = self.runtime, self.tensorrt
        if runtime.runner == "tensorrt":
            if trt is None:
                raise _KeyedProblem(
                    "tensorrt", "runtime.runner = 'tensorrt' needs a [tensorrt] section"
                )
            if trt.engine != "bundle":
                raise _KeyedProblem(
                    "tensorrt.engine",
                    "runtime.runner = 'tensorrt' runs the bundle's engine: set engine = 'bundle'",
                )
        elif "TensorrtExecutionProvider" in runtime.providers:
            if trt is None:
                raise _KeyedProblem(
                    "tensorrt",
                    "TensorrtExecutionProvider needs a [tensorrt] "
                    "section (precision, workspace, batch shapes)",
                )
            if trt.engine != "ort-cache":
                raise _KeyedProblem(
                    "tensorrt.engine",
                    "with runtime.runner = 'onnxruntime' the "
                    "TensorRT provider builds and caches its own engines: set "
                    "engine = 'ort-cache' (or runtime.runner = 'tensorrt')",
                )
        if trt is not None and trt.max_batch < runtime.batch_size:
            raise _KeyedProblem(
                "tensorrt.max_batch", f"must be at least runtime.batch_size ({runtime.batch_size})"
            )
        return self


def load_profile_file(path: Path) -> Profile:
    data = read_toml(path, "profile")
    data.setdefault("name", path.stem)
    try:
        return Profile.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, _KeyedProblem):
            key, msg = cause.key, str(cause)
        else:
            key = ".".join(str(p) for p in err["loc"])
            msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"profile({path.name}).{key}", msg) from exc


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


def detect_profile_name(
    device_tree_model: Path = Path("/proc/device-tree/model"),
    nvidia_driver: Path = Path("/proc/driver/nvidia/version"),
    providers: Callable[[], list[str]] = _ort_providers,
) -> tuple[str, str]:
    """(profile name, why). Jetson boards are told apart by their device-tree model string;
    elsewhere an NVIDIA driver plus an ONNX Runtime with the CUDA provider means x86-cuda,
    anything else the CPU profile."""
    model = read_model(device_tree_model) or ""
    lowered = model.lower()
    if "orin nano" in lowered:
        return "jetson-orin-nano", f"device-tree model {model!r}"
    if "orin nx" in lowered:
        return "jetson-orin-nx", f"device-tree model {model!r}"
    if "agx orin" in lowered or "jetson-agx-orin" in lowered:
        return "jetson-agx-orin", f"device-tree model {model!r}"
    machine = platform.machine()
    if nvidia_driver.exists():
        if "CUDAExecutionProvider" in providers():
            return "x86-cuda", f"no Jetson device-tree model; NVIDIA driver loaded ({machine})"
        return "x86-cpu", (
            f"NVIDIA driver loaded but this ONNX Runtime has no CUDA provider (install the "
            f"'gpu' extra for x86-cuda); machine {machine}"
        )
    return "x86-cpu", f"no Jetson device-tree model, no NVIDIA driver; machine {machine}"


def resolve_profile(spec: str) -> tuple[Profile, str]:
    """Load the profile a config names: 'auto', a name in firmware_configs/, or a path."""
    why = "named in config"
    name = spec
    if spec == "auto":
        name, why = detect_profile_name()
        why = f"auto: {why}"
    candidate = Path(name)
    if candidate.suffix == ".toml" or "/" in name:
        if not candidate.is_file():
            raise ConfigError("profile", f"profile file {candidate} does not exist")
        return load_profile_file(candidate), why
    for folder in profile_dirs():
        path = folder / f"{name}.toml"
        if path.is_file():
            return load_profile_file(path), why
    known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise ConfigError("profile", f"no profile named {name!r} ({why}); known: {', '.join(known)}")
