"""TensorRT: `edge-export tensorrt`, the [tensorrt] profile section, the ONNX Runtime TensorRT
provider's options, engines in the bundle manifest, and the native runner's engine choice.

Without TensorRT and a GPU (this machine) the command's exit paths, the pure functions and the
manifest handling are tested for real; the build-and-run test at the end needs both.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.jetson_profiles import native_runner_profile
from helpers.tiny_bundle import SIZE, make_bundle

from edge_agent.bundle import Engine, engine_key, engine_slug, load_bundle, read_manifest
from edge_agent.errors import BundleError, ConfigError, ProviderUnavailable
from edge_agent.profiles import (
    Profile,
    detect_profile_name,
    load_profile_file,
    resolve_profile,
)
from edge_agent.runners import open_runner
from edge_agent.runners.onnxruntime import (
    cuda_provider_options,
    ort_engine_cache_dir,
    tensorrt_provider_options,
)
from edge_agent.runners.tensorrt import (
    TensorRTUnavailable,
    identify_device,
    select_engine,
    version_tuple,
)
from export.cli import main
from export.tensorrt import (
    builder_flags,
    check_precision,
    count_qdq_nodes,
    default_timing_cache,
    install_engine,
)

JETSON_PROFILES = ["jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin"]


def _record(
    device: str = "NVIDIA Test GPU", cc: str = "8.9", trt: str = "10.3.0", max_batch: int = 4
) -> Engine:
    return Engine(
        file="-",
        device=device,
        compute_capability=cc,
        tensorrt_version=trt,
        precision="fp16",
        profile="x86-cuda",
        min_batch=1,
        opt_batch=1,
        max_batch=max_batch,
        workspace_mib=1024,
        built_at="2026-01-01T00:00:00+00:00",
        build_seconds=12.5,
    )


def _profile(tmp_path: Path, body: str, name: str = "p.toml") -> Path:
    path = tmp_path / name
    path.write_text(f'name = "p"\ndescription = "test"\n{body}')
    return path


# -- the command's exit paths ----------------------------------------------------------------


def test_command_exits_3_without_tensorrt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_bundle(tmp_path / "b")
    manifest_before = (root / "manifest.json").read_bytes()
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert main(["tensorrt", str(root), "--profile", "x86-cuda"]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "edge-export: TensorRT's Python API (module 'tensorrt') is not installed"
    )
    assert "python3-libnvinfer" in last and "pip install tensorrt" in last
    assert (root / "manifest.json").read_bytes() == manifest_before
    assert not (root / "engines").exists()


def test_command_refuses_a_profile_without_tensorrt_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_bundle(tmp_path / "b")
    assert main(["tensorrt", str(root), "--profile", "x86-cpu"]) == 2
    assert "profile(x86-cpu).tensorrt: missing" in capsys.readouterr().err


def test_command_refuses_int8_for_a_float_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_bundle(tmp_path / "b")
    profile = _profile(tmp_path, '[tensorrt]\nprecision = "int8"\n', "int8.toml")
    assert main(["tensorrt", str(root), "--profile", str(profile)]) == 2
    err = capsys.readouterr().err
    assert "profile(p).tensorrt.precision: int8 needs a bundle quantized with explicit Q/DQ" in err


def test_command_missing_bundle_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tensorrt", str(tmp_path / "nowhere"), "--profile", "x86-cuda"]) == 3
    assert "does not exist" in capsys.readouterr().err


# -- profiles --------------------------------------------------------------------------------


def test_tensorrt_section_parses(tmp_path: Path) -> None:
    path = _profile(
        tmp_path,
        '[runtime]\nrunner = "tensorrt"\nbatch_size = 2\n'
        '[tensorrt]\nengine = "bundle"\nprecision = "fp32"\nworkspace_mib = 512\n'
        "min_batch = 1\nopt_batch = 2\nmax_batch = 4\nbuilder_optimization_level = 5\n"
        "timing_cache = false\n",
    )
    profile = load_profile_file(path)
    assert profile.runtime.runner == "tensorrt"
    assert profile.tensorrt is not None
    assert (profile.tensorrt.precision, profile.tensorrt.workspace_mib) == ("fp32", 512)
    assert (profile.tensorrt.min_batch, profile.tensorrt.opt_batch, profile.tensorrt.max_batch) == (
        1,
        2,
        4,
    )
    assert profile.tensorrt.builder_optimization_level == 5 and not profile.tensorrt.timing_cache


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('[tensorrt]\nprecision = "bf16"\n', "tensorrt.precision"),
        ("[tensorrt]\nworkspace = 512\n", "tensorrt.workspace"),
        ("[tensorrt]\nworkspace_mib = 1\n", "tensorrt.workspace_mib"),
        ("[tensorrt]\nbuilder_optimization_level = 6\n", "tensorrt.builder_optimization_level"),
        ('[tensorrt]\nengine = "disk"\n', "tensorrt.engine"),
        ("[tensorrt]\nmin_batch = 2\nopt_batch = 1\nmax_batch = 2\n", "tensorrt.opt_batch"),
        ("[tensorrt]\nmin_batch = 1\nopt_batch = 4\nmax_batch = 2\n", "tensorrt.max_batch"),
        ('[runtime]\nrunner = "tensorrt"\n', "tensorrt"),
        ('[runtime]\nrunner = "tensorrt"\n[tensorrt]\nengine = "ort-cache"\n', "tensorrt.engine"),
        ('[runtime]\nrunner = "cuda"\n', "runtime.runner"),
        (
            '[runtime]\nproviders = ["TensorrtExecutionProvider", "CPUExecutionProvider"]\n',
            "tensorrt",
        ),
        (
            '[runtime]\nproviders = ["TensorrtExecutionProvider"]\n[tensorrt]\nengine = "bundle"\n',
            "tensorrt.engine",
        ),
        (
            "[runtime]\nbatch_size = 4\n[tensorrt]\nmax_batch = 2\nopt_batch = 2\n",
            "tensorrt.max_batch",
        ),
    ],
)
def test_tensorrt_section_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = _profile(tmp_path, body, "bad.toml")
    with pytest.raises(ConfigError) as info:
        load_profile_file(path)
    assert info.value.key == f"profile(bad.toml).{key}"


def test_shipped_gpu_profiles_load() -> None:
    cuda, _ = resolve_profile("x86-cuda")
    assert cuda.runtime.runner == "onnxruntime"
    assert cuda.runtime.providers[0] == "TensorrtExecutionProvider"
    assert cuda.tensorrt is not None and cuda.tensorrt.engine == "ort-cache"
    jetsons = {name: resolve_profile(name)[0] for name in JETSON_PROFILES}
    for profile in jetsons.values():
        # ONNX Runtime's TensorRT provider until the native runner has run on a GPU.
        assert profile.runtime.runner == "onnxruntime"
        assert profile.runtime.providers == [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ]
        assert profile.tensorrt is not None
        assert profile.tensorrt.engine == "ort-cache" and profile.tensorrt.precision == "fp16"
    nano, agx = jetsons["jetson-orin-nano"].tensorrt, jetsons["jetson-agx-orin"].tensorrt
    assert nano is not None and agx is not None
    assert nano.workspace_mib < agx.workspace_mib and nano.max_batch < agx.max_batch
    x86, _ = resolve_profile("x86-cpu")
    assert x86.tensorrt is None and x86.runtime.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    "model",
    [
        b"NVIDIA Jetson Orin Nano Developer Kit\0",
        b"NVIDIA Jetson Orin NX Engineering Reference Developer Kit\0",
        b"Jetson AGX Orin Developer Kit\0",
    ],
)
def test_auto_detected_jetson_profiles_exist(tmp_path: Path, model: bytes) -> None:
    (tmp_path / "model").write_bytes(model)
    name, _ = detect_profile_name(tmp_path / "model")
    profile, _ = resolve_profile(name)
    assert profile.name == name and profile.runtime.runner == "onnxruntime"


# -- ONNX Runtime's TensorRT provider --------------------------------------------------------


def test_tensorrt_provider_options(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    profile, _ = resolve_profile("x86-cuda")
    shape = f"pixel_values:{{}}x3x{SIZE}x{SIZE}"
    options = tensorrt_provider_options(bundle, profile, tmp_path / "cache")
    assert options == {
        "device_id": "0",
        "trt_max_workspace_size": str(4096 * 1024 * 1024),
        "trt_fp16_enable": "True",
        "trt_int8_enable": "False",
        "trt_builder_optimization_level": "3",
        "trt_profile_min_shapes": shape.format(1),
        "trt_profile_opt_shapes": shape.format(1),
        "trt_profile_max_shapes": shape.format(4),
        "trt_dla_enable": "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path / "cache"),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(tmp_path / "cache"),
    }
    uncached = tensorrt_provider_options(bundle, profile, None)
    assert uncached["trt_engine_cache_enable"] == "False"
    assert uncached["trt_timing_cache_enable"] == "False"
    assert "trt_engine_cache_path" not in uncached and "trt_timing_cache_path" not in uncached


def test_tensorrt_provider_options_precision(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b"))  # fp32
    providers = '[runtime]\nproviders = ["TensorrtExecutionProvider"]\n'
    fp32 = load_profile_file(
        _profile(tmp_path, providers + '[tensorrt]\nengine = "ort-cache"\nprecision = "fp32"\n')
    )
    options = tensorrt_provider_options(bundle, fp32, None)
    assert options["trt_fp16_enable"] == options["trt_int8_enable"] == "False"
    int8 = load_profile_file(
        _profile(tmp_path, providers + '[tensorrt]\nengine = "ort-cache"\nprecision = "int8"\n')
    )
    with pytest.raises(ConfigError, match=r"tensorrt\.precision: is int8 but the bundle is fp32"):
        tensorrt_provider_options(bundle, int8, None)


def test_engine_cache_folder_is_per_model_settings_and_runtime(tmp_path: Path) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    profile, _ = resolve_profile("x86-cuda")
    assert profile.tensorrt is not None
    here = ort_engine_cache_dir(tmp_path, bundle, profile, "1.22.0")
    assert here.parent == tmp_path / "tensorrt"
    assert here.name.startswith(f"{bundle.sha256[:16]}-fp16-") and here.name.endswith("-ort1.22.0")
    assert ort_engine_cache_dir(tmp_path, bundle, profile, "1.23.0") != here
    wider = profile.model_copy(
        update={"tensorrt": profile.tensorrt.model_copy(update={"max_batch": 8})}
    )
    assert ort_engine_cache_dir(tmp_path, bundle, wider, "1.22.0") != here


def test_cuda_provider_options() -> None:
    assert cuda_provider_options() == {
        "device_id": "0",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
    }


def test_gpu_profile_runs_on_cpu_only_onnxruntime(tmp_path: Path) -> None:
    """x86-cuda on a machine without GPU providers: TensorRT and CUDA are skipped, CPU runs,
    and no engine cache folder is made for a provider that is not used."""
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    profile, _ = resolve_profile("x86-cuda")
    runner = open_runner(bundle, profile, cache_dir=tmp_path / "cache")
    assert runner.provider == "CPUExecutionProvider"
    emb = runner.embed(np.ones((2, 3, SIZE, SIZE), dtype=np.float32))
    np.testing.assert_allclose(emb, np.full((2, 3), 1 / np.sqrt(3)), rtol=1e-6)
    assert not (tmp_path / "cache").exists()


# -- engines in the manifest -----------------------------------------------------------------


def test_install_engine_records_it_and_keeps_the_model_identity(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    before = load_bundle(root).sha256
    record = _record()
    entry, replaced = install_engine(root, b"engine bytes", record)
    key = engine_key("NVIDIA Test GPU", "8.9", "10.3.0")
    assert key == record.key == "NVIDIA Test GPU sm8.9 trt10.3.0"
    assert (
        entry.file
        == f"engines/{engine_slug(key)}.plan"
        == "engines/nvidia-test-gpu-sm8.9-trt10.3.0.plan"
    )
    assert replaced is None
    bundle = load_bundle(root)
    assert bundle.sha256 == before
    assert bundle.manifest.engines == {key: entry}
    assert (root / entry.file).read_bytes() == b"engine bytes"
    assert bundle.manifest.files[entry.file].size == len(b"engine bytes")


def test_replacing_an_engine_removes_the_old_file_after_the_manifest(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    first, _ = install_engine(root, b"first", _record())
    other, _ = install_engine(root, b"other device", _record(device="Orin", cc="8.7"))
    second, replaced = install_engine(root, b"second", _record(max_batch=8))
    assert replaced == first.file and second.file != first.file
    assert not (root / first.file).exists()
    third, replaced = install_engine(root, b"third", _record())
    assert replaced == second.file and third.file == first.file  # the plain name is free again
    manifest = read_manifest(root)
    assert {e.file for e in manifest.engines.values()} == {third.file, other.file}
    assert sorted(p.relative_to(root).as_posix() for p in (root / "engines").iterdir()) == sorted(
        [third.file, other.file]
    )
    load_bundle(root)


def test_failed_manifest_update_leaves_the_bundle_as_it_was(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    install_engine(root, b"first", _record())
    manifest_before = (root / "manifest.json").read_bytes()
    encoder = root / "encoder.onnx"
    encoder.write_bytes(encoder.read_bytes() + b"tampered")
    with pytest.raises(BundleError, match=r"encoder\.onnx"):
        install_engine(root, b"second", _record())
    assert (root / "manifest.json").read_bytes() == manifest_before
    assert [p.name for p in (root / "engines").iterdir()] == [
        "nvidia-test-gpu-sm8.9-trt10.3.0.plan"
    ]


def test_engine_with_wrong_hash_is_refused(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    entry, _ = install_engine(root, b"engine bytes", _record())
    (root / entry.file).write_bytes(b"engine bytez")
    with pytest.raises(BundleError, match=rf"sha256 of {entry.file} does not match"):
        load_bundle(root)


def test_manifest_engine_entries_are_validated(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    entry, _ = install_engine(root, b"engine bytes", _record())
    manifest = json.loads((root / "manifest.json").read_text())
    good = json.dumps(manifest)
    key = next(iter(manifest["engines"]))
    manifest["engines"]["Some Other GPU sm8.9 trt10.3.0"] = manifest["engines"].pop(key)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="key does not match its device"):
        load_bundle(root)
    manifest = json.loads(good)
    del manifest["files"][entry.file]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="is not listed in files"):
        load_bundle(root)
    manifest = json.loads(good)
    manifest["engines"][key]["opt_batch"] = 9
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="min_batch <= opt_batch <= max_batch"):
        load_bundle(root)


# -- the native runner's choice of engine ----------------------------------------------------


def test_select_engine_by_device_key(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    manifest = read_manifest(root)
    with pytest.raises(ProviderUnavailable, match=r"it has: none\. Build one on this device"):
        select_engine(manifest, "X sm8.7 trt10.3.0", bundle_root=root, profile_name="p")
    install_engine(root, b"orin", _record(device="NVIDIA Jetson Orin Nano Developer Kit", cc="8.7"))
    install_engine(root, b"h200", _record(device="NVIDIA H200", cc="9.0"))
    manifest = read_manifest(root)
    nano = "NVIDIA Jetson Orin Nano Developer Kit sm8.7 trt10.3.0"
    assert select_engine(manifest, nano, bundle_root=root, profile_name="p").device.endswith("Kit")
    wanted = "NVIDIA Jetson Orin Nano Developer Kit sm8.7 trt10.7.0"
    with pytest.raises(ProviderUnavailable) as info:
        select_engine(manifest, wanted, bundle_root=root, profile_name="jetson-orin-nano")
    message = str(info.value)
    assert f"no TensorRT engine for this device ({wanted})" in message
    assert f"it has: NVIDIA H200 sm9.0 trt10.3.0; {nano}." in message
    assert f"edge-export tensorrt {root} --profile jetson-orin-nano" in message


def test_device_identity_from_each_source() -> None:
    cuda = identify_device(cuda=("NVIDIA H200", "9.0"), nvidia_smi=None, device_tree_model=None)
    assert (cuda.name, cuda.compute_capability, cuda.source) == (
        "NVIDIA H200",
        "9.0",
        "cuda-python",
    )
    assert cuda.key("10.3.0") == "NVIDIA H200 sm9.0 trt10.3.0"
    smi = identify_device(
        cuda=None, nvidia_smi="NVIDIA H200, 9.0\nNVIDIA H200, 9.0\n", device_tree_model=None
    )
    assert (smi.name, smi.compute_capability, smi.source) == ("NVIDIA H200", "9.0", "nvidia-smi")
    # A Jetson: CUDA calls every Orin "Orin"; the device tree tells the boards apart, and the
    # key comes out the same whichever probe answered.
    model = "NVIDIA Jetson Orin Nano Developer Kit"
    keys = {
        identify_device(cuda=("Orin", "8.7"), nvidia_smi=None, device_tree_model=model).key("10"),
        identify_device(cuda=None, nvidia_smi="Orin (nvgpu), [N/A]", device_tree_model=model).key(
            "10"
        ),
        identify_device(cuda=None, nvidia_smi=None, device_tree_model=model).key("10"),
    }
    assert keys == {f"{model} sm8.7 trt10"}
    with pytest.raises(ProviderUnavailable, match="cannot identify the NVIDIA GPU"):
        identify_device(cuda=None, nvidia_smi=None, device_tree_model="Raspberry Pi 5 Model B")
    with pytest.raises(ProviderUnavailable, match="cannot identify the NVIDIA GPU"):
        identify_device(cuda=None, nvidia_smi="", device_tree_model=None)


def test_native_runner_without_tensorrt_is_a_missing_resource(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = load_bundle(make_bundle(tmp_path / "b"))
    profile = load_profile_file(native_runner_profile(tmp_path / "profiles"))
    assert profile.runtime.runner == "tensorrt" and profile.tensorrt is not None
    assert profile.tensorrt.engine == "bundle"  # follows the runner: one line opts in
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match="module 'tensorrt'") as info:
        open_runner(bundle, profile)
    assert info.value.exit_code == 3


def test_native_runner_is_imported_only_when_chosen() -> None:
    code = (
        "import sys\n"
        "from helpers.tiny_bundle import make_bundle\n"
        "import tempfile, pathlib\n"
        "from edge_agent.bundle import load_bundle\n"
        "from edge_agent.profiles import resolve_profile\n"
        "from edge_agent.runners import open_runner\n"
        "root = make_bundle(pathlib.Path(tempfile.mkdtemp()) / 'b')\n"
        "open_runner(load_bundle(root), resolve_profile('x86-cuda')[0])\n"
        "print('edge_agent.runners.tensorrt' in sys.modules, 'tensorrt' in sys.modules)\n"
    )
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tests.parent,
        env={"PYTHONPATH": f"{tests}:{tests.parent}", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.stdout.split() == ["False", "False"]


# -- precision rules and small helpers -------------------------------------------------------


def test_precision_rules() -> None:
    check_precision("fp16", "fp32", None, "p")
    check_precision("fp32", "fp32", None, "p")
    check_precision("int8", "int8", 12, "p")
    check_precision("int8", "int8", None, "p")  # counted again on TensorRT's parsed network
    for requested, bundle, qdq, text in [
        ("int8", "fp32", None, "int8 needs a bundle quantized with explicit Q/DQ"),
        ("int8", "int8", 0, "this int8 bundle's encoder has none"),
        ("fp16", "int8", 10, "the bundle is int8 (Q/DQ): set it to int8"),
        ("fp32", "fp16", None, "the bundle's encoder is fp16"),
    ]:
        with pytest.raises(ConfigError, match=r"profile\(p\)\.tensorrt\.precision") as info:
            check_precision(requested, bundle, qdq, "p")  # type: ignore[arg-type]
        assert text in str(info.value)

    def flags(requested: str, bundle: str, weak: bool) -> list[str]:
        return builder_flags(
            requested,  # type: ignore[arg-type]
            bundle,  # type: ignore[arg-type]
            weak_typing=weak,
            tensorrt_version="11.0.0",
            profile_name="p",
        )

    assert flags("fp32", "fp32", True) == []
    assert flags("fp16", "fp32", True) == ["FP16"]
    assert flags("int8", "int8", True) == ["INT8", "FP16"]
    # TensorRT 11: strongly typed, the graph's types decide
    assert flags("fp16", "fp16", False) == flags("int8", "int8", False) == []
    with pytest.raises(ConfigError, match="builds strongly typed networks only"):
        flags("fp16", "fp32", False)


def test_qdq_nodes_are_counted(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    root = make_bundle(tmp_path / "b")
    assert count_qdq_nodes(root / "encoder.onnx") == 0
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qdq", [x], [y], initializer=[scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "qdq.onnx")
    assert count_qdq_nodes(tmp_path / "qdq.onnx") == 2


def test_small_helpers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert version_tuple("10.0.0b6") == (10, 0, 0)
    assert version_tuple("11.1") >= (10, 0) > version_tuple("8.6.2")
    assert engine_slug("NVIDIA GeForce RTX 4090 sm8.9 trt10.3.0") == (
        "nvidia-geforce-rtx-4090-sm8.9-trt10.3.0"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_timing_cache("NVIDIA H200 sm9.0 trt10.3.0") == (
        tmp_path / "edge-triage" / "tensorrt" / "nvidia-h200-sm9.0-trt10.3.0.timing"
    )


# -- on a GPU with TensorRT ------------------------------------------------------------------


def _gpu_with_tensorrt() -> str | None:
    """Why the GPU test cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT's Python API is not installed"
    from edge_agent.runners.tensorrt import device_identity, import_cudart

    try:
        import_cudart()
        device_identity()
    except ProviderUnavailable as exc:
        return str(exc)
    return None


@pytest.mark.skipif(_gpu_with_tensorrt() is not None, reason=str(_gpu_with_tensorrt()))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_an_engine_on_this_gpu(tmp_path: Path, precision: str) -> None:
    root = make_bundle(tmp_path / "b")
    before = load_bundle(root).sha256
    path = _profile(
        tmp_path,
        '[runtime]\nrunner = "tensorrt"\nbatch_size = 2\n'
        f'[tensorrt]\nengine = "bundle"\nprecision = "{precision}"\nworkspace_mib = 256\n'
        "min_batch = 1\nopt_batch = 1\nmax_batch = 2\n",
    )
    code = main(["tensorrt", str(root), "--profile", str(path), "--no-timing-cache"])
    if code == 2 and precision == "fp16":
        pytest.skip("this TensorRT is strongly typed: fp16 needs an fp16 bundle")
    assert code == 0
    bundle = load_bundle(root)
    assert bundle.sha256 == before and len(bundle.manifest.engines) == 1
    profile: Profile = load_profile_file(path)
    runner = open_runner(bundle, profile)
    assert runner.provider == "TensorRT"
    images = np.stack(
        [
            np.full((3, SIZE, SIZE), 1.0, np.float32),
            np.full((3, SIZE, SIZE), -1.0, np.float32),
            np.linspace(-1, 1, 3 * SIZE * SIZE, dtype=np.float32).reshape(3, SIZE, SIZE),
        ]
    )
    emb = runner.embed(images)  # 3 images: split into batches of 2 and 1
    means = images.mean(axis=(2, 3))
    expected = means / np.linalg.norm(means, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, expected, atol=1e-5 if precision == "fp32" else 2e-3)
