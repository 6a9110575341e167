"""The service as installed: the unit passes systemd's own checks, its exposure score stays at
or below 2.0, and systemd/install.sh puts the files in place idempotently and takes them away.

systemd-analyze runs offline on the unit file (no running systemd needed); install.sh runs
with --root into a temporary folder (no user is created, no systemctl is called).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.systemd import EXPOSURE_LIMIT, REPO, analyze

UNIT = REPO / "systemd" / "edge-agent.service"
INSTALL = REPO / "systemd" / "install.sh"


def unit_copy(folder: Path, dropin: str | None = None) -> Path:
    """The shipped unit with ExecStart pointing at this venv's edge-agent (verify checks that
    the program exists), plus an optional drop-in next to it."""
    folder.mkdir(parents=True, exist_ok=True)
    agent = Path(sys.executable).parent / "edge-agent"
    text = UNIT.read_text().replace("/opt/edge-triage/venv/bin/edge-agent", str(agent))
    unit = folder / "edge-agent.service"
    unit.write_text(text)
    if dropin is not None:
        (folder / "edge-agent.service.d").mkdir()
        (folder / "edge-agent.service.d" / "10-watch-dir.conf").write_text(dropin)
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    done = subprocess.run(
        [analyze(), "verify", str(unit_copy(tmp_path))], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [analyze(), "security", "--offline=yes", str(unit_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", done.stdout)
    assert match, done.stdout[-2000:] + done.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= EXPOSURE_LIMIT
    assert "Unknown key" not in done.stderr and "Failed to parse" not in done.stderr


def test_unit_keeps_what_the_jetson_gpu_and_the_protocol_need() -> None:
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["WatchdogSec"] and settings["Restart"] == "on-failure"
    assert settings["SupplementaryGroups"] == "video"
    assert "PrivateDevices" not in settings  # would hide /dev/nvhost-* and /dev/nvmap
    assert settings["CapabilityBoundingSet"] == "" and settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["LoadCredential"].startswith("mqtt_password:")
    assert "AF_UNIX" in settings["RestrictAddressFamilies"]  # the notify socket
    assert "ProcSubset" not in settings  # the health thread reads /proc/meminfo


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(INSTALL), *args], capture_output=True, text=True, cwd=REPO, check=False
    )


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_install_puts_files_in_place_idempotently_and_uninstall_removes_them(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = run_install("--root", str(root), "--watch-dir", "/srv/modality out")
    assert first.returncode == 0, first.stderr
    placed = files_under(root)
    assert set(placed) == {
        "etc/edge-agent/agent.toml",
        "etc/edge-agent/mqtt_password",
        "etc/systemd/system/edge-agent.service",
        "etc/systemd/system/edge-agent.service.d/10-watch-dir.conf",
        "usr/lib/sysusers.d/edge-agent.conf",
    }
    assert placed["etc/systemd/system/edge-agent.service"] == UNIT.read_bytes()
    assert b'watch_dir = "/srv/modality out"' in placed["etc/edge-agent/agent.toml"]
    assert (root / "etc/edge-agent/mqtt_password").stat().st_mode & 0o077 == 0
    assert (root / "etc/edge-agent/agent.toml").stat().st_mode & 0o007 == 0

    # The drop-in parses (systemd reads drop-ins next to the unit offline) and keeps the space.
    dropin = str(placed["etc/systemd/system/edge-agent.service.d/10-watch-dir.conf"], "utf-8")
    assert 'ReadOnlyPaths="-/srv/modality out"' in dropin
    done = subprocess.run(
        [analyze(), "security", "--offline=yes", str(unit_copy(tmp_path / "u", dropin))],
        capture_output=True,
        text=True,
    )
    assert "10-watch-dir.conf" not in done.stderr, done.stderr

    # Again, after the site edited its config: nothing changes, the edit survives.
    edited = (root / "etc/edge-agent/agent.toml").read_text() + 'site = "st-marys"\n'
    (root / "etc/edge-agent/agent.toml").write_text(edited)
    second = run_install("--root", str(root), "--watch-dir", "/srv/modality out")
    assert second.returncode == 0, second.stderr
    assert (root / "etc/edge-agent/agent.toml").read_text() == edited
    assert set(files_under(root)) == set(placed)

    removed = run_install("--uninstall", "--root", str(root))
    assert removed.returncode == 0, removed.stderr
    assert set(files_under(root)) == {"etc/edge-agent/agent.toml", "etc/edge-agent/mqtt_password"}
    assert run_install("--uninstall", "--root", str(root)).returncode == 0  # idempotent too
    assert run_install("--uninstall", "--purge", "--root", str(root)).returncode == 0
    assert files_under(root) == {}


def test_install_dry_run_writes_nothing_and_bad_options_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    dry = run_install("--dry-run", "--root", str(root))
    assert dry.returncode == 0 and "+ install" in dry.stdout
    assert files_under(root) == {}
    assert run_install("--extra", "cuda").returncode == 2
    assert run_install("--watch-dir", "relative/path").returncode == 2
    assert run_install("--watch-dir", '/srv/a"b').returncode == 2
    assert run_install("--purge").returncode == 2
    assert run_install("--bogus").returncode == 2


def test_install_applies_the_profile_memory_ceiling(tmp_path: Path) -> None:
    from edge_agent.profiles import resolve_profile

    root = tmp_path / "root"
    root.mkdir()
    done = run_install("--root", str(root), "--profile", "jetson-orin-nano")
    assert done.returncode == 0, done.stderr
    ceiling = resolve_profile("jetson-orin-nano")[0].runtime.memory_max_mib
    assert ceiling is not None
    memory = root / "etc/systemd/system/edge-agent.service.d/20-memory.conf"
    text = memory.read_text()
    assert f"MemoryMax={ceiling}M" in text and f"MemoryHigh={ceiling * 9 // 10}M" in text
    folder = tmp_path / "u"
    unit_copy(folder, dropin="[Service]\n")
    (folder / "edge-agent.service.d" / "20-memory.conf").write_text(text)
    checked = subprocess.run(
        [analyze(), "security", "--offline=yes", str(folder / "edge-agent.service")],
        capture_output=True,
        text=True,
    )
    assert "20-memory.conf" not in checked.stderr, checked.stderr
    assert run_install("--root", str(root), "--profile", "no-such-board").returncode == 2
    assert run_install("--uninstall", "--root", str(root)).returncode == 0
    assert not memory.exists()


# -- a Jetson -----------------------------------------------------------------------------------

FIXTURES = REPO / "tests" / "fixtures"
PYTHON_DIR = f"python{sys.version_info[0]}.{sys.version_info[1]}"


def jetson_root(tmp_path: Path) -> Path:
    """The fixture Orin Nano (device tree, nv_tegra_release, JetPack's tensorrt module in the
    system dist-packages) with that folder named for this Python (JetPack 6: python3.10)."""
    root = Path(shutil.copytree(FIXTURES / "jetson-orin-nano", tmp_path / "root"))
    (root / "usr/lib/python3.10").rename(root / "usr/lib" / PYTHON_DIR)
    return root


def fake_wheel(folder: Path, distribution: str, version: str = "1.20.0") -> Path:
    """A wheel that installs an ``onnxruntime`` module under ``distribution``'s name, as
    PyPI's onnxruntime and NVIDIA's onnxruntime-gpu both do (offline: no dependencies)."""
    import base64
    import hashlib
    import zipfile

    stem = f"{distribution.replace('-', '_')}-{version}"
    files = {
        "onnxruntime/__init__.py": (
            f'__version__ = "{version}"\n\n\ndef get_available_providers():\n'
            "    return ['TensorrtExecutionProvider', 'CUDAExecutionProvider', "
            "'CPUExecutionProvider']\n"
        ).encode(),
        f"{stem}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n".encode()
        ),
        f"{stem}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = ""
    for name, data in files.items():
        digest = str(base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"="), "ascii")
        record += f"{name},sha256={digest},{len(data)}\n"
    record += f"{stem}.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{stem}.dist-info/RECORD", record)
    return path


def run_offline(*args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(
        ["sh", str(INSTALL), *args], capture_output=True, text=True, cwd=REPO, env=env
    )


def venv_python(root: Path, code: str) -> str:
    done = subprocess.run(
        [str(root / "opt/edge-triage/venv/bin/python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.slow
def test_install_on_a_jetson_uses_jetpacks_tensorrt_and_nvidias_onnxruntime(
    tmp_path: Path,
) -> None:
    root = jetson_root(tmp_path)
    wheel = fake_wheel(tmp_path / "wheels", "onnxruntime-gpu")
    common = ["--root", str(root), "--with-venv", "--no-package", "--python", sys.executable]
    done = run_offline(*common, "--profile", "jetson-orin-nano", "--ort-wheel", str(wheel))
    assert done.returncode == 0, done.stderr
    assert "Jetson: NVIDIA Jetson Orin Nano Engineering Reference Developer Kit; # R36" in (
        done.stdout
    )
    assert "ONNX Runtime: onnxruntime-gpu 1.20.0" in done.stdout
    assert "ONNX Runtime providers: TensorrtExecutionProvider, CUDAExecutionProvider" in (
        done.stdout
    )
    assert "warning" not in done.stderr, done.stderr
    assert "TensorRT: 10.3.0 from " in done.stdout
    # The venv sees JetPack's tensorrt (through the .pth, from the root's dist-packages) and
    # NVIDIA's onnxruntime-gpu, and no CPU-only onnxruntime.
    seen = venv_python(
        root,
        "import importlib.metadata as md, tensorrt, onnxruntime\n"
        "names = {d.metadata['Name'] for d in md.distributions()}\n"
        "print(tensorrt.__version__, tensorrt.__file__, onnxruntime.__version__,\n"
        "      'onnxruntime' in names, 'onnxruntime-gpu' in names)",
    )
    version, module, ort, cpu, gpu = seen.split()
    assert version == "10.3.0"
    assert Path(module).is_relative_to(root / "usr/lib" / PYTHON_DIR / "dist-packages")
    assert (ort, cpu, gpu) == ("1.20.0", "False", "True")
    dropin = root / "etc/systemd/system/edge-agent.service.d/30-jetson.conf"
    assert "TimeoutStartSec=1800" in dropin.read_text()

    # A CPU-only onnxruntime in the venv (a `pip install onnxruntime` by hand) is refused.
    pip = root / "opt/edge-triage/venv/bin/pip"
    cpu_wheel = fake_wheel(tmp_path / "wheels", "onnxruntime", "1.22.0")
    subprocess.run(
        [str(pip), "install", "--quiet", "--no-index", str(cpu_wheel)], check=True, timeout=120
    )
    again = run_offline(*common)
    assert again.returncode == 3
    assert "the venv has the CPU-only onnxruntime 1.22.0" in again.stderr
    assert "pip uninstall onnxruntime" in again.stderr


def test_install_on_a_jetson_refuses_pypis_onnxruntime_extras(tmp_path: Path) -> None:
    root = jetson_root(tmp_path)
    for extra in ("cpu", "gpu"):
        done = run_install("--root", str(root), "--extra", extra)
        assert done.returncode == 2
        assert "shadows NVIDIA's onnxruntime-gpu" in done.stderr and "--ort-wheel" in done.stderr
    # Off a Jetson, NVIDIA's Jetson wheel makes no sense; a wheel that is not there neither.
    plain = tmp_path / "plain"
    plain.mkdir()
    wheel = fake_wheel(tmp_path / "wheels", "onnxruntime-gpu")
    assert run_install("--root", str(plain), "--ort-wheel", str(wheel)).returncode == 2
    assert run_install("--root", str(root), "--ort-wheel", "/nonexistent.whl").returncode == 2
    assert run_install("--with-venv").returncode == 2  # only with --root
    dry = run_install("--root", str(root), "--with-venv", "--dry-run", "--python", sys.executable)
    assert dry.returncode == 0, dry.stderr
    assert "jetpack-tensorrt.pth" in dry.stdout and "30-jetson.conf" in dry.stdout
    assert "[cpu]" not in dry.stdout  # the package goes in without an ONNX Runtime extra
    assert not (root / "opt").exists()


@pytest.mark.slow
def test_a_jetson_python_mismatch_is_refused(tmp_path: Path) -> None:
    """JetPack's tensorrt is a compiled module for one Python (3.10 on JetPack 6): a venv of
    another Python would not import it, so install.sh says which interpreter to use."""
    root = Path(shutil.copytree(FIXTURES / "jetson-orin-nano", tmp_path / "root"))
    other = "python3.10" if PYTHON_DIR != "python3.10" else "python3.99"
    if other != "python3.10":
        (root / "usr/lib/python3.10").rename(root / "usr/lib" / other)
    done = run_offline(
        "--root", str(root), "--with-venv", "--no-package", "--python", sys.executable
    )
    assert done.returncode == 2
    assert f"built for {other}, the venv is {PYTHON_DIR}" in done.stderr
    assert f"--python /usr/bin/{other}" in done.stderr
