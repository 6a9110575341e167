"""What this box is and how it is doing, read from procfs, sysfs and a few files in /etc.

Two kinds of facts, each read by one small function:

* the platform, for ``edge-agent check``: the device-tree model, the L4T release in
  ``/etc/nv_tegra_release`` and the JetPack release it belongs to, CUDA's version file, and
  which ONNX Runtime build (``onnxruntime`` or ``onnxruntime-gpu``) and TensorRT module this
  Python sees;
* the box's health, for the health worker (:mod:`edge_agent.health`): thermal zones,
  Jetson over-current event counters (``soctherm_oc``), CPU and GPU clocks, the nvpmodel
  power mode, free memory and free space.

Every reader takes ``root`` (default ``/``) so that tests run them against fixture trees
with files of the same names and formats (``tests/fixtures/``). A file that is absent,
unreadable or malformed gives None (or an empty list): a box that lacks a sensor is not an
error, and nothing read here is ever executed or followed as a path outside ``root``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path("/")

# L4T (Jetson Linux) release -> JetPack release, as NVIDIA's JetPack release notes pair them
# (Orin's R35 and R36 only; not checked against a board). Releases not listed here (R36.5
# and later, say) are reported as L4T alone until added.
JETPACK_FOR_L4T = {
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
}

# "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: ..."
_NV_TEGRA_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)")
_NVPMODEL_STATUS = re.compile(r"pmode:\s*(\d+)")
_NVPMODEL_MODE = re.compile(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)")


def _read(root: Path, relative: str, limit: int = 65536) -> str | None:
    """A small text file under ``root``, or None when absent or unreadable."""
    try:
        with open(root / relative.lstrip("/"), "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# -- the platform ------------------------------------------------------------------------------


def read_model(path: Path) -> str | None:
    """A device-tree model file (NUL-terminated) as text, or None when absent or empty."""
    text = _read(path.parent, path.name, 4096)
    return None if text is None else (text.rstrip("\0\n ") or None)


def device_tree_model(root: Path = ROOT) -> str | None:
    """The board's model string from the device tree (``Jetson …`` on a Jetson), or None."""
    for relative in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        model = read_model(root / relative)
        if model is not None:
            return model
    return None


@dataclass(frozen=True)
class L4TRelease:
    major: int
    revision: str

    @property
    def version(self) -> str:
        """Like ``36.4.0``."""
        return f"{self.major}.{self.revision}"

    @property
    def jetpack(self) -> str | None:
        return JETPACK_FOR_L4T.get(self.version)

    def describe(self) -> str:
        jetpack = self.jetpack
        return f"L4T R{self.version}" + (
            f" (JetPack {jetpack})" if jetpack else " (JetPack release not known here)"
        )


def parse_nv_tegra_release(text: str) -> L4TRelease | None:
    """``# R36 (release), REVISION: 4.0, …`` -> L4T 36.4.0; None when the line is not there.
    A one-number revision (``REVISION: 4.0``) means patch 0."""
    match = _NV_TEGRA_RELEASE.search(text)
    if match is None:
        return None
    major, minor, patch = (int(g) for g in match.groups())
    return L4TRelease(major, f"{minor}.{patch}")


def l4t_release(root: Path = ROOT) -> L4TRelease | None:
    text = _read(root, "etc/nv_tegra_release", 4096)
    return None if text is None else parse_nv_tegra_release(text)


def is_jetson(root: Path = ROOT) -> bool:
    """A Jetson: an NVIDIA/Jetson device-tree model and JetPack's ``/etc/nv_tegra_release``
    (the same test systemd/install.sh makes)."""
    model = (device_tree_model(root) or "").lower()
    return ("jetson" in model or "nvidia" in model) and (root / "etc/nv_tegra_release").is_file()


def cuda_version(root: Path = ROOT) -> str | None:
    """The CUDA toolkit's version from ``/usr/local/cuda/version.json`` (CUDA 11.1+), or the
    older ``version.txt`` (``CUDA Version 10.2.300``)."""
    text = _read(root, "usr/local/cuda/version.json")
    if text is not None:
        try:
            version = json.loads(text)["cuda"]["version"]
        except (ValueError, KeyError, TypeError):
            version = None
        if isinstance(version, str):
            return version
    text = _read(root, "usr/local/cuda/version.txt", 4096)
    if text is not None:
        match = re.search(r"CUDA Version\s+([0-9.]+)", text)
        if match:
            return match.group(1)
    return None


ORT_DISTRIBUTIONS = ("onnxruntime-gpu", "onnxruntime")


@dataclass(frozen=True)
class OrtBuild:
    """Which ONNX Runtime this Python imports and which distributions provide it."""

    distributions: dict[str, str]
    """Installed distribution name -> version (both builds install the same module)."""
    version: str | None
    """The imported module's version (None: it does not import)."""
    providers: list[str]
    import_error: str | None = None

    @property
    def name(self) -> str | None:
        """``onnxruntime-gpu`` or ``onnxruntime``: the build in use (the GPU one when both are
        installed, which is itself a problem: :attr:`problem`)."""
        for dist in ORT_DISTRIBUTIONS:
            if dist in self.distributions:
                return dist
        return None

    @property
    def problem(self) -> str | None:
        if len(self.distributions) > 1:
            return (
                "both onnxruntime and onnxruntime-gpu are installed; they install the same "
                "module and the one installed last wins: pip uninstall onnxruntime"
            )
        if self.import_error is not None:
            return f"onnxruntime does not import: {self.import_error}"
        return None

    def describe(self) -> str:
        if not self.distributions:
            return "ONNX Runtime is not installed"
        installed = ", ".join(f"{n} {v}" for n, v in sorted(self.distributions.items()))
        if self.version is None:
            return f"{installed} (does not import)"
        return f"{installed}; providers {', '.join(self.providers) or 'none'}"


def ort_build() -> OrtBuild:
    distributions: dict[str, str] = {}
    for dist in ORT_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            distributions[dist] = importlib.metadata.version(dist)
    try:
        ort: Any = importlib.import_module("onnxruntime")
        return OrtBuild(distributions, str(ort.__version__), list(ort.get_available_providers()))
    except Exception as exc:  # ImportError, or a GPU build failing to load its libraries
        return OrtBuild(distributions, None, [], f"{type(exc).__name__}: {exc}")


def tensorrt_version() -> str | None:
    """The ``tensorrt`` Python module's version (JetPack's python3-libnvinfer on a Jetson),
    or None when it does not import."""
    try:
        trt: Any = importlib.import_module("tensorrt")
    except Exception:  # ImportError, or a module that fails to load libnvinfer
        return None
    version = getattr(trt, "__version__", None)
    return str(version) if version is not None else "unknown version"


# -- health readings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ThermalZone:
    type: str
    celsius: float | None


def thermal_zones(root: Path = ROOT) -> list[ThermalZone]:
    """Every ``/sys/class/thermal/thermal_zone*``: its ``type`` and ``temp`` (millidegrees C).
    A zone whose sensor is offline reads an error or a sentinel (-256 °C on some Tegra zones):
    its temperature is None."""
    zones: list[ThermalZone] = []
    base = root / "sys/class/thermal"
    try:
        entries = [p for p in base.iterdir() if re.fullmatch(r"thermal_zone\d+", p.name)]
        entries.sort(key=lambda p: int(p.name[len("thermal_zone") :]))
    except OSError:
        return zones
    for zone in entries:
        kind = _read(zone, "type", 256)
        if kind is None:
            continue
        kind = kind.strip()
        milli = _read_int(zone / "temp")
        celsius = None if milli is None or not -40_000 <= milli <= 200_000 else milli / 1000
        zones.append(ThermalZone(kind, celsius))
    return zones


def soc_temperature(zones: list[ThermalZone]) -> float | None:
    """The SoC's temperature: Tegra's ``tj-thermal`` (the hottest junction) where there is
    one, else the hottest zone that is not the GPU's (x86: ``x86_pkg_temp``, ``acpitz``)."""
    for zone in zones:
        if zone.type == "tj-thermal" and zone.celsius is not None:
            return zone.celsius
    others = [z.celsius for z in zones if z.celsius is not None and "gpu" not in z.type.lower()]
    return max(others) if others else None


def gpu_temperature(zones: list[ThermalZone]) -> float | None:
    temps = [z.celsius for z in zones if z.celsius is not None and "gpu" in z.type.lower()]
    return max(temps) if temps else None


def overcurrent_events(root: Path = ROOT) -> dict[str, int] | None:
    """Jetson Orin's over-current/under-voltage throttle event counters: the hwmon device
    named ``soctherm_oc`` (kernel driver tegra23x-oc-event) with ``oc1_event_cnt`` (under
    voltage), ``oc2_event_cnt`` (average over-current), ``oc3_event_cnt`` (instantaneous
    over-current). Counts since boot; a count that grows means the box throttled. None
    where there is no such device (not a Jetson Orin)."""
    base = root / "sys/class/hwmon"
    try:
        devices = sorted(base.iterdir())
    except OSError:
        return None
    for device in devices:
        if (_read(device, "name", 256) or "").strip() != "soctherm_oc":
            continue
        counts: dict[str, int] = {}
        for n in (1, 2, 3):
            value = _read_int(device / f"oc{n}_event_cnt")
            if value is not None:
                counts[f"oc{n}"] = value
        return counts
    return None


@dataclass(frozen=True)
class Clock:
    current_mhz: float | None
    max_mhz: float | None
    """The highest the hardware allows (cpufreq cpuinfo_max_freq; devfreq max_freq)."""
    limit_mhz: float | None = None
    """The ceiling in force now (cpufreq scaling_max_freq): lower than max_mhz when a power
    mode or thermal management caps the clock."""

    @property
    def capped(self) -> bool | None:
        if self.limit_mhz is None or self.max_mhz is None:
            return None
        return self.limit_mhz < self.max_mhz


def cpu_clock(root: Path = ROOT) -> Clock | None:
    """The fastest CPU policy's clocks (cpufreq, kHz in sysfs), or None without cpufreq (most
    VMs)."""
    base = root / "sys/devices/system/cpu/cpufreq"
    try:
        policies = sorted(p for p in base.iterdir() if p.name.startswith("policy"))
    except OSError:
        return None
    best: Clock | None = None
    for policy in policies:
        current = _read_int(policy / "scaling_cur_freq")
        hw_max = _read_int(policy / "cpuinfo_max_freq")
        limit = _read_int(policy / "scaling_max_freq")
        if current is None and hw_max is None:
            continue
        clock = Clock(
            None if current is None else current / 1000,
            None if hw_max is None else hw_max / 1000,
            None if limit is None else limit / 1000,
        )
        if best is None or (clock.max_mhz or 0, clock.current_mhz or 0) > (
            best.max_mhz or 0,
            best.current_mhz or 0,
        ):
            best = clock
    return best


def gpu_clock(root: Path = ROOT) -> Clock | None:
    """A Jetson GPU's clocks from devfreq (Hz): ``/sys/class/devfreq/<addr>.gpu`` (JetPack 6;
    ``<addr>.ga10b`` on JetPack 5). None where there is none."""
    base = root / "sys/class/devfreq"
    try:
        devices = sorted(base.iterdir())
    except OSError:
        return None
    for device in devices:
        if not device.name.endswith((".gpu", ".ga10b", "gpu")):
            continue
        current = _read_int(device / "cur_freq")
        hw_max = _read_int(device / "max_freq")
        if current is None and hw_max is None:
            continue
        return Clock(
            None if current is None else current / 1e6,
            None if hw_max is None else hw_max / 1e6,
        )
    return None


@dataclass(frozen=True)
class PowerMode:
    id: int
    name: str | None

    def describe(self) -> str:
        return f"{self.id} ({self.name})" if self.name else str(self.id)


def power_mode(root: Path = ROOT) -> PowerMode | None:
    """The nvpmodel power mode in force (``/var/lib/nvpmodel/status``: ``pmode:0001``) and its
    name from ``/etc/nvpmodel.conf`` (``< POWER_MODEL ID=1 NAME=15W >``). None off a Jetson."""
    status = _read(root, "var/lib/nvpmodel/status", 4096)
    match = _NVPMODEL_STATUS.search(status or "")
    if match is None:
        return None
    mode = int(match.group(1))
    names = dict(
        (int(i), name)
        for i, name in _NVPMODEL_MODE.findall(_read(root, "etc/nvpmodel.conf", 1 << 20) or "")
    )
    return PowerMode(mode, names.get(mode))


def memory_available_mib(root: Path = ROOT) -> float | None:
    """``MemAvailable`` from ``/proc/meminfo`` in MiB (on a Jetson the GPU shares it)."""
    text = _read(root, "proc/meminfo")
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text or "", re.MULTILINE)
    return None if match is None else int(match.group(1)) / 1024


@dataclass(frozen=True)
class FreeSpace:
    free_mib: float
    """Space an unprivileged writer can use (statvfs f_bavail)."""
    total_mib: float

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free_mib / self.total_mib if self.total_mib else 0.0


def free_space(path: Path) -> FreeSpace | None:
    """Free space on the file system holding ``path`` (the nearest existing folder above it),
    or None when it cannot be asked."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        st = os.statvfs(existing)
    except OSError:
        return None
    return FreeSpace(st.f_bavail * st.f_frsize / 2**20, st.f_blocks * st.f_frsize / 2**20)
