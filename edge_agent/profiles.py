"""Device profiles (``firmware_configs/*.toml``): how this box runs the models.

A profile names the runner, the ONNX Runtime execution providers in order of preference and
their options, thread counts and batch size. ``profile = "auto"`` detects the device from
``/proc/device-tree/model`` (Jetson) and otherwise picks the x86 profile.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import read_toml
from .errors import ConfigError

logger = logging.getLogger(__name__)

ProviderName = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def profile_dirs() -> list[Path]:
    """Where named profiles live: in the wheel, then in a source checkout."""
    here = Path(__file__).resolve().parent
    return [here / "firmware_configs", here.parent / "firmware_configs"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeProfile(_Section):
    runner: Literal["onnxruntime"] = Field(
        default="onnxruntime", description="Runner family that executes the encoder."
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


class Profile(_Section):
    name: str
    description: str
    runtime: RuntimeProfile = Field(default_factory=RuntimeProfile)
    source: str = Field(default="", description="File the profile was read from.")


def load_profile_file(path: Path) -> Profile:
    data = read_toml(path, "profile")
    data.setdefault("name", path.stem)
    try:
        return Profile.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown setting" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"profile({path.name}).{key}", msg) from exc


def detect_profile_name(
    device_tree_model: Path = Path("/proc/device-tree/model"),
) -> tuple[str, str]:
    """(profile name, why). Jetson boards are told apart by their device-tree model string."""
    try:
        model = device_tree_model.read_bytes().rstrip(b"\0").decode(errors="replace")
    except OSError:
        model = ""
    lowered = model.lower()
    if "orin nano" in lowered:
        return "jetson-orin-nano", f"device-tree model {model!r}"
    if "orin nx" in lowered:
        return "jetson-orin-nx", f"device-tree model {model!r}"
    if "agx orin" in lowered or "jetson-agx-orin" in lowered:
        return "jetson-agx-orin", f"device-tree model {model!r}"
    machine = platform.machine()
    return "x86-cpu", f"no Jetson device-tree model; machine {machine}"


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
