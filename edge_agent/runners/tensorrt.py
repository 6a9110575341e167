"""Native TensorRT runner: the bundle's engine for this device, run with cuda-python buffers.

Chosen by ``runner = "tensorrt"`` in the profile; :func:`edge_agent.runners.open_runner`
imports this module only then. ``edge-export tensorrt`` imports it for the device identity
and the import helpers, so that the engine is recorded under exactly the key the runner
looks for. Importing the module imports neither TensorRT nor CUDA: they are loaded when a
runner is opened (or an engine built).

The device identity is (GPU name, compute capability): from cuda-python when it imports,
else ``nvidia-smi``; on a Jetson the device-tree model names the board instead (CUDA calls
every Orin "Orin"), so an engine built on an Orin Nano is not taken for an AGX Orin's.
"""

from __future__ import annotations

import importlib
import logging
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, Engine, Manifest, engine_key
from ..errors import InferenceError, ProviderUnavailable
from ..platform import read_model
from ..profiles import Profile

logger = logging.getLogger(__name__)

MIN_TENSORRT = (10, 0)
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")
# Every Jetson Orin module (Nano, NX, AGX) is compute capability 8.7.
_ORIN_COMPUTE_CAPABILITY = "8.7"


class TensorRTUnavailable(ProviderUnavailable):
    """TensorRT's or CUDA's Python API is missing or too old (exit 3)."""


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying how to install it."""
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, libnvinfer is not
        raise TensorRTUnavailable(
            f"TensorRT's Python API (module 'tensorrt') is not installed ({exc}): on a Jetson "
            "install JetPack's python3-libnvinfer (apt) and use the Python it is built for; on "
            "x86 pip install tensorrt matching your CUDA version (e.g. tensorrt-cu12)"
        ) from exc
    version = str(getattr(trt, "__version__", "0"))
    if version_tuple(version) < MIN_TENSORRT:
        raise TensorRTUnavailable(
            f"TensorRT {version} is too old: {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer is "
            "needed (JetPack 6 on a Jetson)"
        )
    return trt


def import_cudart(*, required: bool = True) -> Any:
    """cuda-python's runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    if not required:
        return None
    raise TensorRTUnavailable(
        "CUDA's Python bindings (module 'cuda.bindings', package cuda-python) are not "
        "installed: pip install cuda-python matching your CUDA major version (12 on JetPack 6)"
    )


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); non-numeric tails are dropped ('10.0.0b6' -> (10, 0))."""
    parts: list[int] = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


_BRIDGES: dict[int, Any] = {}


def trt_logger(trt: Any) -> Any:
    """The process's TensorRT ILogger, forwarding to this module's logger (TensorRT's INFO
    chatter goes to DEBUG).

    One per process, kept for its lifetime: TensorRT remembers the first logger it is given
    as its global one, so a logger that was garbage-collected could still be called."""
    bridge = _BRIDGES.get(id(trt))
    if bridge is not None:
        return bridge
    severity = trt.ILogger.Severity

    class _Bridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, level: Any, msg: str) -> None:
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                logger.error("TensorRT: %s", msg)
            elif level == severity.WARNING:
                logger.warning("TensorRT: %s", msg)
            elif level == severity.INFO:
                logger.debug("TensorRT: %s", msg)

    bridge = _BRIDGES[id(trt)] = _Bridge()
    return bridge


# -- device identity -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceIdentity:
    name: str
    compute_capability: str
    source: str
    """Where the name and compute capability came from (for logs)."""

    def key(self, tensorrt_version: str) -> str:
        return engine_key(self.name, self.compute_capability, tensorrt_version)


def identify_device(
    *,
    cuda: tuple[str, str] | None,
    nvidia_smi: str | None,
    device_tree_model: str | None,
) -> DeviceIdentity:
    """Combine what the probes found (pure; see :func:`device_identity`).

    ``cuda``: (name, "major.minor") from cuda-python; ``nvidia_smi``: the output of
    ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader``; ``device_tree_model``:
    ``/proc/device-tree/model``. Raises :class:`ProviderUnavailable` when no GPU is found.
    """
    name: str | None = None
    capability: str | None = None
    sources: list[str] = []
    if cuda is not None:
        name, capability = cuda[0].strip(), cuda[1].strip()
        sources.append("cuda-python")
    elif nvidia_smi:
        first = nvidia_smi.strip().splitlines()[0] if nvidia_smi.strip() else ""
        smi_name, _, smi_cap = first.rpartition(",")
        if smi_name.strip():
            name = smi_name.strip()
            sources.append("nvidia-smi")
        if re.fullmatch(r"\d+\.\d+", smi_cap.strip()):
            capability = smi_cap.strip()
    model = (device_tree_model or "").strip()
    if "jetson" in model.lower():
        name = model
        sources.append("device-tree")
        if capability is None and "orin" in model.lower():
            capability = _ORIN_COMPUTE_CAPABILITY
    if not name or not capability or not re.fullmatch(r"\d+\.\d+", capability):
        raise ProviderUnavailable(
            "cannot identify the NVIDIA GPU: cuda-python is not installed or sees no GPU, "
            f"nvidia-smi gave {(nvidia_smi or 'nothing').strip()[:80]!r}, and "
            f"{DEVICE_TREE_MODEL} names no Jetson"
        )
    return DeviceIdentity(name=name, compute_capability=capability, source="+".join(sources))


def query_cuda(cudart: Any, index: int = 0) -> tuple[str, str] | None:
    """(name, 'major.minor') of CUDA device ``index`` via cuda-python, None if it fails."""
    if cudart is None:
        return None
    err, props = cudart.cudaGetDeviceProperties(index)
    if err != cudart.cudaError_t.cudaSuccess:
        logger.debug("cudaGetDeviceProperties(%d) failed: %s", index, err)
        return None
    raw = props.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return name, f"{props.major}.{props.minor}"


def query_nvidia_smi(index: int = 0) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, "-i", str(index), "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("nvidia-smi failed: %s", exc)
        return None
    if done.returncode != 0:
        logger.debug("nvidia-smi exited %d: %s", done.returncode, done.stderr.strip())
        return None
    return done.stdout


def read_device_tree_model(path: Path = DEVICE_TREE_MODEL) -> str | None:
    return read_model(path)


def device_identity(index: int = 0, *, cudart: Any = None) -> DeviceIdentity:
    """This machine's GPU as engines are keyed: cuda-python, else nvidia-smi, plus Jetson's
    device tree. ``cudart`` defaults to cuda-python's runtime module when it imports."""
    if cudart is None:
        cudart = import_cudart(required=False)
    cuda = query_cuda(cudart, index)
    smi = None if cuda is not None else query_nvidia_smi(index)
    return identify_device(cuda=cuda, nvidia_smi=smi, device_tree_model=read_device_tree_model())


# -- engine selection ------------------------------------------------------------------------


def select_engine(manifest: Manifest, key: str, *, bundle_root: Path, profile_name: str) -> Engine:
    """The bundle's engine for ``key``, or an error that says which keys it has and how to
    build the missing one."""
    engine = manifest.engines.get(key)
    if engine is None:
        have = "; ".join(sorted(manifest.engines)) or "none"
        raise ProviderUnavailable(
            f"bundle {bundle_root} has no TensorRT engine for this device ({key}); it has: "
            f"{have}. Build one on this device with: edge-export tensorrt {bundle_root} "
            f"--profile {profile_name}"
        )
    return engine


def locate_engine(bundle: Bundle, profile: Profile) -> tuple[DeviceIdentity, str, Engine]:
    """(this device, its engine key, the bundle's engine for it) without loading the engine:
    what the runner will load, for ``edge-agent check``. Raises ProviderUnavailable."""
    trt = import_tensorrt()
    identity = device_identity()
    key = identity.key(trt.__version__)
    engine = select_engine(bundle.manifest, key, bundle_root=bundle.root, profile_name=profile.name)
    return identity, key, engine


# -- the runner ------------------------------------------------------------------------------


class _CudaError(Exception):
    pass


def _cuda(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python call's (error, value...) tuple, raising on an error."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise _CudaError(f"{what}: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else None


class TensorRTRunner:
    """Runs the bundle's TensorRT engine for this GPU (TensorRT 10 API: set_input_shape,
    set_tensor_address, execute_async_v3), with device buffers sized for the engine's
    largest batch. Larger batches are split; smaller than the engine's smallest are padded."""

    provider = "TensorRT"

    def __init__(self, bundle: Bundle, profile: Profile) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        self._cudart = cudart
        self._lock = threading.Lock()
        self._buffers: list[int] = []
        self._stream: Any = None
        identity, _, entry = locate_engine(bundle, profile)
        self._warn_if_stale(entry, profile)
        encoder = bundle.manifest.encoder
        self._input, self._output = encoder.input_name, encoder.output_name
        self._trt_logger = trt_logger(trt)
        self._runtime = trt.Runtime(self._trt_logger)
        engine = self._runtime.deserialize_cuda_engine((bundle.root / entry.file).read_bytes())
        if engine is None:
            raise ProviderUnavailable(
                f"TensorRT {trt.__version__} cannot load {entry.file} (see its messages above); "
                f"rebuild it with: edge-export tensorrt {bundle.root} --profile {profile.name}"
            )
        self._engine = engine
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if {self._input, self._output} - names:
            raise ProviderUnavailable(
                f"engine {entry.file} has tensors {sorted(names)}, not the encoder's "
                f"{self._input!r} -> {self._output!r}"
            )
        low, _, high = engine.get_tensor_profile_shape(self._input, 0)
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output)))
        self._size = encoder.preprocessing.input_size
        self._dim = encoder.embedding_dim
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ProviderUnavailable(
                f"TensorRT cannot create an execution context for {entry.file} "
                "(not enough GPU memory?)"
            )
        try:
            self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            per_image = 3 * self._size * self._size * self._in_dtype.itemsize
            self._d_in = self._malloc(self.max_batch * per_image)
            self._d_out = self._malloc(self.max_batch * self._dim * self._out_dtype.itemsize)
        except _CudaError as exc:
            self.close()
            raise ProviderUnavailable(f"CUDA cannot allocate the engine's buffers: {exc}") from exc
        self._context.set_tensor_address(self._input, self._d_in)
        self._context.set_tensor_address(self._output, self._d_out)
        logger.info(
            "TensorRT %s engine %s for %s (%s), batch %d..%d, %s",
            trt.__version__,
            entry.file,
            identity.name,
            identity.source,
            self.min_batch,
            self.max_batch,
            entry.precision,
        )
        start = time.perf_counter()
        try:
            self.embed(np.zeros((1, 3, self._size, self._size), dtype=np.float32))
        except InferenceError as exc:
            self.close()
            raise ProviderUnavailable(f"TensorRT engine {entry.file} fails to run: {exc}") from exc
        logger.info(
            "encoder %s loaded on TensorRT, warm-up %.0f ms",
            bundle.manifest.model.name,
            (time.perf_counter() - start) * 1000,
        )

    @staticmethod
    def _warn_if_stale(entry: Engine, profile: Profile) -> None:
        wanted = profile.tensorrt
        if wanted is None:
            return
        built = (entry.precision, entry.min_batch, entry.opt_batch, entry.max_batch)
        asked = (wanted.precision, wanted.min_batch, wanted.opt_batch, wanted.max_batch)
        if built != asked:
            logger.warning(
                "engine %s was built as (precision, min/opt/max batch) %s for profile %s; "
                "profile %s asks %s: rebuild it with edge-export tensorrt to match",
                entry.file,
                built,
                entry.profile,
                profile.name,
                asked,
            )

    def _malloc(self, nbytes: int) -> int:
        ptr = int(_cuda(self._cudart, self._cudart.cudaMalloc(nbytes), "cudaMalloc"))
        self._buffers.append(ptr)
        return ptr

    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[1:] != (3, self._size, self._size):
            raise InferenceError(
                f"encoder expects (B, 3, {self._size}, {self._size}) images, got {images.shape}"
            )
        out = [
            self._run(images[i : i + self.max_batch]) for i in range(0, len(images), self.max_batch)
        ]
        result = np.concatenate(out).astype(np.float32, copy=False)
        if not np.all(np.isfinite(result)):
            raise InferenceError("encoder returned non-finite embeddings")
        return result

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        batch = max(n, self.min_batch)
        x = np.zeros((batch, *chunk.shape[1:]), dtype=self._in_dtype)
        x[:n] = chunk
        out = np.empty((batch, self._dim), dtype=self._out_dtype)
        cudart = self._cudart
        with self._lock:
            try:
                if not self._context.set_input_shape(self._input, x.shape):
                    raise InferenceError(f"engine refuses input shape {x.shape}")
                shape = tuple(self._context.get_tensor_shape(self._output))
                if shape != out.shape:
                    raise InferenceError(f"engine output shape {shape}, expected {out.shape}")
                h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
                stream = self._stream
                _cuda(
                    cudart,
                    cudart.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, stream),
                    "copy to GPU",
                )
                if not self._context.execute_async_v3(int(stream)):
                    raise InferenceError("TensorRT execute_async_v3 failed (see its messages)")
                _cuda(
                    cudart,
                    cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes, d2h, stream),
                    "copy from GPU",
                )
                _cuda(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            except _CudaError as exc:
                raise InferenceError(f"CUDA error on a batch of {n}: {exc}") from exc
        return out[:n]

    def close(self) -> None:
        """Free the GPU buffers and the stream (the process exiting does the same)."""
        cudart = self._cudart
        while self._buffers:
            cudart.cudaFree(self._buffers.pop())
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
