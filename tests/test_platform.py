"""The platform as `edge-agent check` reports it, and ONNX Runtime's TensorRT provider as the
Jetson profiles use it: readers run against the fixture boards in tests/fixtures (files of the
same names and formats as on an Orin) and against this machine; the runner's provider options
are inspected as they would be passed on a Jetson, and its fallback on this CPU-only ONNX
Runtime runs for real."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny_bundle import SIZE, make_bundle
from hypothesis import given
from hypothesis import strategies as st

from edge_agent import platform
from edge_agent.bundle import load_bundle
from edge_agent.check import platform_report
from edge_agent.profiles import resolve_profile
from edge_agent.runners import open_runner
from edge_agent.runners.onnxruntime import ort_engine_cache_dir, session_providers

FIXTURES = Path(__file__).parent / "fixtures"
NANO = FIXTURES / "jetson-orin-nano"
AGX = FIXTURES / "jetson-agx-orin"
ALL_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_fixture_boards_are_jetsons_with_their_jetpack_release() -> None:
    assert platform.is_jetson(NANO) and platform.is_jetson(AGX)
    assert platform.device_tree_model(NANO) == (
        "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit"
    )
    nano, agx = platform.l4t_release(NANO), platform.l4t_release(AGX)
    assert nano is not None and nano.version == "36.4.0" and nano.jetpack == "6.1"
    assert agx is not None and agx.version == "36.4.3" and agx.jetpack == "6.2"
    assert nano.describe() == "L4T R36.4.0 (JetPack 6.1)"
    assert platform.cuda_version(NANO) == "12.6.68"


def test_a_box_without_the_files_is_not_a_jetson(tmp_path: Path) -> None:
    assert not platform.is_jetson(tmp_path)
    assert platform.l4t_release(tmp_path) is None and platform.cuda_version(tmp_path) is None
    # A device tree alone (any ARM board) is not enough: JetPack's release file is needed too.
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano\0")
    assert not platform.is_jetson(tmp_path)
    (tmp_path / "sys/firmware/devicetree/base").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("garbage\n")
    assert platform.is_jetson(tmp_path) and platform.l4t_release(tmp_path) is None


def test_nv_tegra_release_lines() -> None:
    parse = platform.parse_nv_tegra_release
    r36 = parse("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64")
    assert r36 is not None and r36.version == "36.4.0" and r36.jetpack == "6.1"
    r35 = parse("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64")
    assert r35 is not None and r35.version == "35.4.1" and r35.jetpack == "5.1.2"
    unknown = parse("# R38 (release), REVISION: 1.0, GCID: 1")
    assert unknown is not None and unknown.jetpack is None
    assert "not known" in unknown.describe()
    assert parse("R36 REVISION 4.0") is None and parse("") is None


@given(st.text(max_size=200))
def test_nv_tegra_release_parser_takes_any_text(text: str) -> None:
    release = platform.parse_nv_tegra_release(text)
    assert release is None or release.version.count(".") == 2


@given(st.integers(0, 99), st.integers(0, 9), st.integers(0, 9))
def test_nv_tegra_release_versions_round_trip(major: int, minor: int, patch: int) -> None:
    release = platform.parse_nv_tegra_release(
        f"# R{major} (release), REVISION: {minor}.{patch}, GCID: 1, BOARD: generic"
    )
    assert release is not None and release.version == f"{major}.{minor}.{patch}"


def test_this_machines_onnxruntime_build() -> None:
    build = platform.ort_build()
    assert build.name == "onnxruntime" and build.version is not None  # the cpu extra here
    assert "CPUExecutionProvider" in build.providers and build.problem is None
    assert build.describe().startswith(f"onnxruntime {build.distributions['onnxruntime']}")
    both = platform.OrtBuild({"onnxruntime": "1.20", "onnxruntime-gpu": "1.20"}, "1.20", [])
    assert both.name == "onnxruntime-gpu" and "pip uninstall onnxruntime" in (both.problem or "")


def test_check_reports_the_fixture_jetson_and_what_the_profile_misses() -> None:
    profile, _ = resolve_profile("jetson-orin-nano")
    lines = {what: (ok, detail) for ok, what, detail in platform_report(profile, NANO)}
    assert lines["platform"] == (
        True,
        "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit; L4T R36.4.0 (JetPack 6.1)",
    )
    assert lines["cuda"] == (True, "CUDA 12.6.68")
    ok, detail = lines["ort"]  # this Python has the CPU-only build: wrong on a Jetson
    assert not ok and "CPU-only onnxruntime" in detail and "--ort-wheel" in detail
    ok, detail = lines["missing"]
    assert not ok and "TensorrtExecutionProvider, CUDAExecutionProvider" in detail
    assert detail.endswith("runs on CPUExecutionProvider")
    assert lines["tensorrt"] == (False, "the tensorrt module does not import")


def test_check_on_this_machine_with_the_cpu_profile() -> None:
    profile, _ = resolve_profile("x86-cpu")
    lines = {what: (ok, detail) for ok, what, detail in platform_report(profile)}
    assert lines["platform"][0] and "not a Jetson" in lines["platform"][1]
    assert lines["ort"][0] and "CPUExecutionProvider" in lines["ort"][1]
    assert "missing" not in lines and "tensorrt" not in lines


# -- ONNX Runtime's TensorRT provider on the Jetson profiles -----------------------------------


@pytest.mark.parametrize("name", ["jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"])
def test_jetson_profiles_pass_tensorrt_then_cuda_options(tmp_path: Path, name: str) -> None:
    """What the runner hands ONNX Runtime on a Jetson, where all three providers exist."""
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    profile, _ = resolve_profile(name)
    trt = profile.tensorrt
    assert trt is not None and trt.engine == "ort-cache"
    cache = tmp_path / "state" / "engine-cache"
    providers = session_providers(bundle, profile, ALL_PROVIDERS, cache, "1.20.0")
    assert [p if isinstance(p, str) else p[0] for p in providers] == ALL_PROVIDERS
    (_, trt_options), (_, cuda_options) = providers[0], providers[1]
    assert isinstance(trt_options, dict) and isinstance(cuda_options, dict)
    engines = ort_engine_cache_dir(cache, bundle, profile, "1.20.0")
    assert engines.is_dir() and engines.is_relative_to(cache)
    assert trt_options["trt_engine_cache_enable"] == "True"
    assert trt_options["trt_engine_cache_path"] == str(engines)
    assert trt_options["trt_timing_cache_enable"] == "True"
    assert trt_options["trt_timing_cache_path"] == str(engines)
    assert trt_options["trt_fp16_enable"] == "True" and trt_options["trt_int8_enable"] == "False"
    assert trt_options["trt_max_workspace_size"] == str(trt.workspace_mib * 2**20)
    assert trt_options["trt_profile_max_shapes"] == f"pixel_values:{trt.max_batch}x3x{SIZE}x{SIZE}"
    assert cuda_options["arena_extend_strategy"] == "kSameAsRequested"
    assert providers[2] == "CPUExecutionProvider"


def test_jetson_profile_falls_back_to_the_cpu_with_a_clear_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """This machine's ONNX Runtime is the CPU build: no TensorRT or CUDA provider. The Jetson
    profile still runs, says so in one line that names the build and the fix, and makes no
    engine cache for a provider it does not use."""
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    profile, _ = resolve_profile("jetson-orin-nano")
    with caplog.at_level(logging.WARNING, logger="edge_agent.runners.onnxruntime"):
        runner = open_runner(bundle, profile, cache_dir=tmp_path / "engine-cache")
    assert runner.provider == "CPUExecutionProvider"
    emb = runner.embed(np.ones((1, 3, SIZE, SIZE), dtype=np.float32))
    assert emb.shape == (1, 3)
    (line,) = [r.getMessage() for r in caplog.records]
    version = platform.ort_build().distributions["onnxruntime"]
    assert line.startswith(
        "profile jetson-orin-nano: TensorrtExecutionProvider and CUDAExecutionProvider not in "
        f"this ONNX Runtime build (onnxruntime {version}; it has "
    )
    assert "running on CPUExecutionProvider" in line
    assert "NVIDIA's onnxruntime-gpu wheel" in line
    assert not (tmp_path / "engine-cache").exists()
