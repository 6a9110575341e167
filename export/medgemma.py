"""``edge-export medgemma``: a local Gemma 3 multimodal checkpoint (MedGemma 4B or a distilled
student of the same family) → the ONNX graphs that generation needs, with a parity gate.

Three graphs, all exported with ``torch.onnx.export(dynamo=True)`` (opset 18):

``vision.onnx``
    ``pixel_values`` float32 (B, 3, N, N), preprocessed → ``image_features`` float32
    (B, T, D): the SigLIP tower and the multimodal projector (average pooling to T image
    tokens, RMS norm, projection to the decoder's width).
``embed.onnx``
    ``input_ids`` int64 (B, S) → ``inputs_embeds`` float32 (B, S, D), Gemma's scaled token
    embedding.
``decoder.onnx``
    ``inputs_embeds`` (B, S, D), ``position_ids`` int64 (B, S), ``full_attention_mask`` and
    ``sliding_attention_mask`` float32 (B, 1, S, P + S) additive masks (0 or a large
    negative), and ``past_key_values.{i}.key|value`` (B, kv_heads, P, head_dim) →
    ``logits`` (B, S, V) and ``present.{i}.key|value`` (B, kv_heads, P + S, head_dim).
    Batch, sequence and past axes are dynamic; P = 0 is the prefill.

The masks are inputs, computed by the caller (:func:`edge_agent.gemma.attention_masks`),
because Gemma 3's prefill is not causal: image tokens attend to each other both ways (the block mask
transformers builds from ``token_type_ids``), and local layers see only the last
``sliding_window`` positions. Every layer keeps its whole past; the sliding window is
applied by the mask, which gives the same attention as transformers' sliding cache.

Weights: fp32 everywhere, or the decoder's MatMul weights in int4 (or int8) with ONNX
Runtime's weight-only ``MatMulNBits`` (symmetric, per block). fp16 is refused: Gemma 3 is
known to produce empty output in fp16.

Parity: for each test prompt (an image and a question), the ONNX pipeline's greedy tokens
(:class:`edge_agent.gemma.OnnxGemma3`, plain numpy + ONNX Runtime, the loop the daemon
runs) must equal PyTorch's
``generate(do_sample=False)`` token for token (fp32); the quantized decoder's mean
log-likelihood of those tokens and its teacher-forced token agreement are recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_agent.bundle import sha256_file
from edge_agent.errors import ConfigError, ExtraMissing, ResourceMissing
from edge_agent.gemma import OnnxGemma3, TextConfig, expand_image, kv_names

from .checkpoint import (
    CheckpointError,
    go_offline,
    image_normalisation,
    load_model,
    load_tokenizer,
    read_config,
    refuse_remote_code,
    require_tokenizer,
    weight_paths,
    weights_sha256,
)
from .onnx_export import (
    _import_onnx,
    _import_torch,
    _normalise_layout,
    _strip_debug_metadata,
    onnx_files,
    remove_onnx,
)
from .parity import ParityFailed

logger = logging.getLogger(__name__)

Weights = Literal["int4", "int8", "fp16", "fp32"]
FORMAT = "edge-triage-medgemma/1"
DESCRIPTION = "medgemma.json"
NOTICE = "NOTICE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_COPY = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
)
# Always written: the template the model was trained with, which the daemon renders.
CHAT_TEMPLATE = "chat_template.jinja"
IMAGE_TOKENS = ("boi_token", "image_token", "eoi_token")
OPSET = 18
# Protobuf refuses messages over 2 GiB; larger graphs keep their weights in <name>.data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
PROMPTS = (
    "Describe this chest X-ray.",
    "Is there a pneumothorax?",
    "List the findings.",
)


# --- 1. checkpoint --------------------------------------------------------------------------


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's config.json, after checking the folder has what an offline load of a
    Gemma 3 multimodal model needs. Raises :class:`CheckpointError` (or
    :class:`ResourceMissing` for a missing folder) naming the missing or wrong file."""
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type == "gemma3_text":
        raise CheckpointError(
            f"checkpoint {path}: config.json describes a text-only Gemma 3 (gemma3_text); "
            "the medgemma export needs the multimodal model (model_type 'gemma3', with a "
            "vision_config)"
        )
    if model_type != "gemma3":
        raise CheckpointError(
            f"checkpoint {path}: model_type in config.json is {model_type!r}, not 'gemma3' "
            "(MedGemma 4B is a Gemma3ForConditionalGeneration)"
        )
    if not isinstance(config.get("vision_config"), dict):
        raise CheckpointError(f"checkpoint {path}: config.json has no vision_config")
    refuse_remote_code(path, config)
    weight_paths(path)
    require_tokenizer(path, TOKENIZER_FILES, "prompts cannot be tokenised without it")
    if read_chat_template(path) is None:
        raise CheckpointError(
            f"checkpoint {path}: no chat template ({CHAT_TEMPLATE}, or chat_template in "
            "tokenizer_config.json or chat_template.json); refusing: generation must use the "
            "template the model was trained with"
        )
    return config


def read_chat_template(path: Path) -> str | None:
    """The checkpoint's chat template (Jinja text), where transformers looks for it:
    chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list
    of named templates: "default"), else the processor's chat_template.json. None if none."""

    def pick(value: Any) -> str | None:
        if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        return value if isinstance(value, str) and value.strip() else None

    jinja = path / CHAT_TEMPLATE
    if jinja.is_file():
        try:
            return pick(jinja.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"checkpoint {path}: {CHAT_TEMPLATE} is not readable: {exc}"
            ) from exc
    for name in ("tokenizer_config.json", "chat_template.json"):
        if not (path / name).is_file():
            continue
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {path}: {name} is not valid JSON: {exc}") from exc
        template = pick(data.get("chat_template")) if isinstance(data, dict) else None
        if template is not None:
            return template
    return None


@dataclass
class Checkpoint:
    path: Path
    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a Gemma 3 multimodal checkpoint offline: the model in fp32 (eager attention, the
    plainest graph to export) and its tokenizer, which must name the image tokens."""
    path = Path(path)
    check_checkpoint(path)
    go_offline()
    try:
        import torch
        from transformers import Gemma3ForConditionalGeneration
    except ImportError as exc:
        raise ExtraMissing(exc.name or "transformers", "export") from exc
    model = load_model(
        path, Gemma3ForConditionalGeneration, dtype=torch.float32, attn_implementation="eager"
    )
    tokenizer = load_tokenizer(path)
    for attr in IMAGE_TOKENS:
        token = getattr(tokenizer, attr, None)
        if not token or tokenizer.convert_tokens_to_ids(token) == tokenizer.unk_token_id:
            raise CheckpointError(
                f"checkpoint {path}: tokenizer_config.json does not define {attr} "
                "(Gemma 3 needs extra_special_tokens boi_token, image_token, eoi_token)"
            )
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    if image_id != model.config.image_token_id:
        raise CheckpointError(
            f"checkpoint {path}: the tokenizer's image_token id {image_id} != config.json's "
            f"image_token_id {model.config.image_token_id}"
        )
    _warn_if_template_differs(path, tokenizer, int(model.config.mm_tokens_per_image))
    vision: Any = model.config.vision_config
    image_size = int(vision.image_size)
    mean, std = image_normalisation(path, image_size)
    return Checkpoint(
        path=path,
        model=model,
        tokenizer=tokenizer,
        image_size=image_size,
        mean=(float(mean[0]), float(mean[1]), float(mean[2])),
        std=(float(std[0]), float(std[1]), float(std[2])),
    )


def _warn_if_template_differs(path: Path, tokenizer: Any, tokens_per_image: int) -> None:
    """The parity gate's prompts are :func:`image_prompt`; the daemon renders the chat
    template. Say so if the checkpoint's template writes an image turn otherwise."""
    template = read_chat_template(path)
    question = "Describe this image."
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    try:
        rendered = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja2 and transformers raise many types
        raise CheckpointError(
            f"checkpoint {path}: the chat template does not render an image turn "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    expanded = expand_image(
        str(rendered),
        tokenizer.boi_token,
        tokenizer.image_token,
        tokenizer.eoi_token,
        tokens_per_image,
    )
    if expanded != image_prompt(tokenizer, question, tokens_per_image):
        logger.warning(
            "checkpoint %s: its chat template writes an image turn differently from Gemma 3's; "
            "the parity gate's prompts follow Gemma 3's, the daemon will follow the template",
            path,
        )


# --- 2. prompts and masks (shared by the ONNX pipeline and the PyTorch reference) ------------


def text_config(model: Any, tokenizer: Any) -> TextConfig:
    """What the generation loop needs to know about the checkpoint's decoder."""
    text = model.config.text_config
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
        eos_ids = tuple(dict.fromkeys((*eos_ids, end_of_turn)))
    return TextConfig(
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        layer_types=tuple(text.layer_types),
        sliding_window=int(text.sliding_window),
        num_key_value_heads=int(text.num_key_value_heads),
        head_dim=int(text.head_dim),
        image_token_id=int(model.config.image_token_id),
        tokens_per_image=int(model.config.mm_tokens_per_image),
        eos_token_ids=eos_ids,
    )


def image_prompt(tokenizer: Any, question: str, tokens_per_image: int) -> str:
    """One user turn with one image, as Gemma 3's chat template and processor write it (the
    processor expands the boi token into ``\\n\\n<boi><image>×T<eoi>\\n\\n``)."""
    image = f"\n\n{tokenizer.boi_token}{tokenizer.image_token * tokens_per_image}"
    image += f"{tokenizer.eoi_token}\n\n"
    return (
        f"{tokenizer.bos_token}<start_of_turn>user\n{image}{question}<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return np.asarray(x - np.log(np.exp(x).sum(-1, keepdims=True)))


# --- 3. ONNX graphs -------------------------------------------------------------------------


@contextmanager
def _quiet_warnings(label: str) -> Iterator[None]:
    """torch's exporter, generate and the quantizer warn about their own internals; keep
    them in the debug log (the parity gate tells whether the result is right)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        logger.debug("torch.onnx (%s) warned: %s: %s", label, w.category.__name__, w.message)


def _export(module: Any, args: tuple[Any, ...], path: Path, label: str, **kwargs: Any) -> list[str]:
    """``torch.onnx.export(dynamo=True)`` straight to ``path`` (weights over the protobuf
    limit go to one ``<name>.data`` file beside it), without the exporter's per-node debug
    metadata (local paths, stack traces). Returns the files written."""
    torch = _import_torch()
    remove_onnx(path)
    external = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD
    with _quiet_warnings(label), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            opset_version=OPSET,
            dynamo=True,
            external_data=external,
            verbose=False,
            **kwargs,
        )
    _normalise_layout(path, external=external)
    _strip_debug_metadata(path)
    return onnx_files(path)


def _param_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_vision(model: Any, image_size: int, path: Path) -> list[str]:
    """``pixel_values`` (B, 3, N, N) → ``image_features`` (B, T, D): tower + projector."""
    torch = _import_torch()

    class Vision(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: Any) -> Any:
            return self.inner.get_image_features(pixel_values, return_dict=True).pooler_output

    module = Vision(model.model).eval()
    example = torch.zeros(2, 3, image_size, image_size)
    return _export(
        module,
        (example,),
        path,
        "vision",
        input_names=["pixel_values"],
        output_names=["image_features"],
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=64)}},
    )


def export_embedding(model: Any, path: Path) -> list[str]:
    """``input_ids`` (B, S) → ``inputs_embeds`` (B, S, D), scaled by √D as Gemma does."""
    torch = _import_torch()

    class Embed(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any) -> Any:
            return self.inner(input_ids)

    module = Embed(model.model.language_model.embed_tokens).eval()
    example = torch.zeros(2, 3, dtype=torch.long)
    dims = {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("sequence")}
    return _export(
        module,
        (example,),
        path,
        "embedding",
        input_names=["input_ids"],
        output_names=["inputs_embeds"],
        dynamic_shapes={"input_ids": dims},
    )


def export_decoder(model: Any, path: Path) -> list[str]:
    """The language model and LM head with a KV cache; see the module docstring."""
    torch = _import_torch()
    from transformers import DynamicCache

    text = model.config.text_config
    layers = int(text.num_hidden_layers)

    class Decoder(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self, language_model: Any, lm_head: Any) -> None:
            super().__init__()
            self.language_model = language_model
            self.lm_head = lm_head

        def forward(
            self,
            inputs_embeds: Any,
            position_ids: Any,
            full: Any,
            sliding: Any,
            logits_positions: Any,
            *past: Any,
        ) -> Any:
            # A cache without a config keeps every layer's whole past (no sliding layers):
            # the window is in the mask.
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                attention_mask={"full_attention": full, "sliding_attention": sliding},
                cache=cache,
                use_cache=True,
            )
            # The LM head only where asked: the last position while generating, every
            # position for the parity gate's teacher-forced scoring.
            logits = self.lm_head(out.last_hidden_state.index_select(1, logits_positions))
            presents = []
            for layer in out.cache.layers:
                presents += [layer.keys, layer.values]
            return (logits, *presents)

    module = Decoder(model.model.language_model, model.lm_head).eval()
    batch, seq, past_len = 1, 3, 2
    hidden = int(text.hidden_size)
    kv_shape = (batch, int(text.num_key_value_heads), past_len, int(text.head_dim))
    past = [torch.zeros(kv_shape) for _ in range(2 * layers)]
    example = (
        torch.zeros(batch, seq, hidden),
        torch.arange(past_len, past_len + seq)[None],
        torch.zeros(batch, 1, seq, past_len + seq),
        torch.zeros(batch, 1, seq, past_len + seq),
        torch.arange(1, seq),  # fewer than seq: torch.export must not tie the two axes
        *past,
    )
    b = torch.export.Dim("batch", min=1, max=64)
    s = torch.export.Dim("sequence", min=1, max=int(text.max_position_embeddings))
    p = torch.export.Dim("past", min=0, max=int(text.max_position_embeddings))
    # The masks' key axis is past + sequence: left for torch.export to relate (DYNAMIC).
    total = torch.export.Dim.DYNAMIC
    k = torch.export.Dim("logits", min=1, max=int(text.max_position_embeddings))
    shapes: list[Any] = [
        {0: b, 1: s},
        {0: b, 1: s},
        {0: b, 2: s, 3: total},
        {0: b, 2: s, 3: total},
        {0: k},
    ]
    shapes.append(tuple({0: b, 2: p} for _ in past))  # *past is one tuple to torch.export
    past_names, present_names = kv_names(layers)
    return _export(
        module,
        example,
        path,
        "decoder",
        input_names=[
            "inputs_embeds",
            "position_ids",
            "full_attention_mask",
            "sliding_attention_mask",
            "logits_positions",
            *past_names,
        ],
        output_names=["logits", *present_names],
        dynamic_shapes=tuple(shapes),
    )


# --- 4. the ONNX pipeline: edge_agent.gemma.OnnxGemma3 (the daemon runs the same loop) --


# --- 5. int4 / int8 -------------------------------------------------------------------------


def quantize_decoder(
    src: Path, dst: Path, *, bits: int, block_size: int, accuracy_level: int | None = None
) -> list[str]:
    """Weight-only MatMulNBits (symmetric, per ``block_size`` along K) for every MatMul with
    a constant weight, the LM head included; activations and everything else stay fp32.
    ``accuracy_level``: MatMulNBits' minimum compute precision (None: fp32; 4: int8
    activations, quantized per block at run time)."""
    onnx = _import_onnx()
    from onnx.external_data_helper import (
        _get_all_tensors,
        load_external_data_for_tensor,
        uses_external_data,
    )
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    # The fp32 weights stay on disk: the quantizer reads each one through onnx_ir, which
    # memory-maps it, resolving its location from the current directory (hence absolute
    # locations here). Loading them all would hold the fp32 decoder (~16 GB for 4B) in memory
    # beside the quantized one.
    folder = src.resolve().parent
    model = onnx.load(str(src), load_external_data=False)
    for tensor in _get_all_tensors(model):
        for entry in tensor.external_data if uses_external_data(tensor) else []:
            if entry.key == "location":
                entry.value = str(folder / entry.value)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level, bits=bits
    )
    quantized = _weight_only(model, config)
    # What was not quantized (norms, small constants) is read into the model from src.
    for tensor in _get_all_tensors(quantized):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = os.path.relpath(entry.value, folder)
            load_external_data_for_tensor(tensor, str(folder))
    return _save_quantized(quantized, dst)


def quantize_embedding(src: Path, dst: Path, *, bits: int = 4, block_size: int = 32) -> list[str]:
    """The token embedding's ``Gather`` as ONNX Runtime's ``GatherBlockQuantized``
    (com.microsoft): weights int4, symmetric, one fp32 scale per ``block_size`` values along
    the hidden axis; the √D scale stays fp32. ONNX Runtime's quantizer makes int4 only."""
    if bits != 4:
        raise ValueError("GatherBlockQuantized is made in int4 only (ONNX Runtime's quantizer)")
    onnx = _import_onnx()
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    model = onnx.load(str(src), load_external_data=True)  # one table: 2.7 GB for 4B
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        bits=bits,
        op_types_to_quantize=("Gather",),
        quant_axes=(("Gather", 1),),  # blocks along the hidden axis of (vocabulary, hidden)
    )
    quantized = _weight_only(model, config)
    ops = [n.op_type for n in quantized.graph.node]
    if "Gather" in ops or "GatherBlockQuantized" not in ops:
        raise RuntimeError(f"{src}: the embedding's Gather was not quantized ({ops})")
    return _save_quantized(quantized, dst)


def _weight_only(model: Any, config: Any) -> Any:
    """Run ONNX Runtime's weight-only quantizer (``MatMulNBitsQuantizer``) on ``model``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantizer narrates through the root logger
    try:
        with _quiet_warnings("MatMulNBits"):
            quantizer.process()
    finally:
        root.setLevel(level)
    return quantizer.model.model


def _save_quantized(quantized: Any, dst: Path) -> list[str]:
    onnx = _import_onnx()
    remove_onnx(dst)
    # ByteSize() itself fails past 2 GiB: count the weights.
    weights = sum(len(t.raw_data) for t in quantized.graph.initializer)
    if weights > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            quantized,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{dst.name}.data",
        )
    else:
        onnx.save_model(quantized, str(dst))
    return onnx_files(dst)


# --- 6. reference and parity ----------------------------------------------------------------


@dataclass
class PromptParity:
    question: str
    torch_tokens: list[int]
    onnx_tokens: list[int]
    torch_log_likelihood: float
    onnx_log_likelihood: float
    quantized_tokens: list[int] | None = None
    quantized_log_likelihood: float | None = None
    quantized_agreement: float | None = None


@dataclass
class Parity:
    tokens: int
    prompts: list[PromptParity] = field(default_factory=list)

    @property
    def fp32_equal(self) -> bool:
        return all(p.torch_tokens == p.onnx_tokens for p in self.prompts)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reference": "pytorch fp32 generate(do_sample=False)",
            "prompts": len(self.prompts),
            "max_new_tokens": self.tokens,
            "fp32_greedy_equal": self.fp32_equal,
            "fp32_log_likelihood_delta_max": max(
                abs(p.onnx_log_likelihood - p.torch_log_likelihood) for p in self.prompts
            ),
        }
        if all(p.quantized_log_likelihood is not None for p in self.prompts):
            deltas = [
                float(p.quantized_log_likelihood) - p.onnx_log_likelihood  # type: ignore[arg-type]
                for p in self.prompts
            ]
            out["quantized_log_likelihood_delta_mean"] = float(np.mean(deltas))
            out["quantized_token_agreement"] = float(
                np.mean([p.quantized_agreement for p in self.prompts])
            )
            out["quantized_greedy_equal_prompts"] = sum(
                p.quantized_tokens == p.torch_tokens for p in self.prompts
            )
        return out


def stand_in_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Preprocessed stand-in images in [-1, 1] (smooth blobs, not noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        cx, cy, r = rng.uniform(0.3, 0.7, 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.2 * r))
        grey = 2.0 * (0.7 * blob + 0.3 * rng.uniform(0, 1, (size, size))) - 1.0
        images.append(np.repeat(grey[None].astype(np.float32), 3, axis=0))
    return np.stack(images)


def torch_reference(
    ckpt: Checkpoint, input_ids: np.ndarray, pixel_values: np.ndarray, max_new_tokens: int
) -> tuple[list[int], float]:
    """PyTorch's greedy tokens (``generate(do_sample=False)``) and their mean log-likelihood."""
    torch = _import_torch()
    model = ckpt.model
    ids = torch.from_numpy(input_ids[None].astype(np.int64))
    pixels = torch.from_numpy(pixel_values.astype(np.float32))
    token_type = (ids == model.config.image_token_id).long()
    with torch.no_grad(), _quiet_warnings("generate"):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            token_type_ids=token_type,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=ckpt.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    tokens = [int(t) for t in out.sequences[0, ids.shape[1] :]]
    logits = torch.cat([step[:1] for step in out.logits]).numpy()
    return tokens, _mean_log_likelihood(logits, tokens)


def _mean_log_likelihood(logits: np.ndarray, tokens: Sequence[int]) -> float:
    logp = log_softmax(logits)
    return float(np.mean(logp[np.arange(len(tokens)), list(tokens)]))


def check_parity(
    ckpt: Checkpoint,
    fp32: OnnxGemma3,
    quantized: OnnxGemma3 | None,
    *,
    questions: Sequence[str] = PROMPTS,
    max_new_tokens: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> Parity:
    cfg = fp32.config
    images = stand_in_images(len(questions), ckpt.image_size)
    parity = Parity(tokens=max_new_tokens)
    for i, question in enumerate(questions):
        text = image_prompt(ckpt.tokenizer, question, cfg.tokens_per_image)
        ids = np.asarray(
            ckpt.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64
        )
        pixels = images[i : i + 1]
        ref_tokens, ref_ll = torch_reference(ckpt, ids, pixels, max_new_tokens)
        onnx_tokens = fp32.generate(ids, pixels, max_new_tokens)
        onnx_ll = _mean_log_likelihood(
            fp32.continuation_logits(ids, pixels, ref_tokens), ref_tokens
        )
        result = PromptParity(question, ref_tokens, onnx_tokens, ref_ll, onnx_ll)
        if quantized is not None:
            logits = quantized.continuation_logits(ids, pixels, ref_tokens)
            result.quantized_tokens = quantized.generate(ids, pixels, max_new_tokens)
            result.quantized_log_likelihood = _mean_log_likelihood(logits, ref_tokens)
            result.quantized_agreement = float(np.mean(logits.argmax(-1) == ref_tokens))
        parity.prompts.append(result)
        if progress is not None:
            progress(i + 1, len(questions))
    return parity


def parity_gate(parity: Parity) -> None:
    """Raise :class:`ParityFailed` unless the ONNX fp32 greedy tokens equal PyTorch's on
    every prompt."""
    for p in parity.prompts:
        if p.torch_tokens != p.onnx_tokens:
            raise ParityFailed(
                f"parity gate: ONNX fp32 greedy tokens differ from PyTorch's for "
                f"{p.question!r} ({p.onnx_tokens} vs {p.torch_tokens}); no export written"
            )


# --- 7. the command -------------------------------------------------------------------------


@dataclass
class MedgemmaSettings:
    checkpoint: Path
    out: Path
    weights: Weights = "int4"
    block_size: int = 32
    parity_tokens: int = 16
    overwrite: bool = False
    threads: int = 0
    notice: Path | None = None
    """The weights' licence NOTICE, shipped as NOTICE (MedGemma's terms ask for it)."""
    compute: Literal["fp32", "int8"] = "int8"
    """int4/int8 decoders: MatMulNBits' compute on CPUs (int8: accuracy_level 4, activations
    quantized per block at run time; GPU providers ignore it)."""


@dataclass
class MedgemmaResult:
    out: Path
    description: dict[str, Any]
    parity: Parity
    stages: list[tuple[str, float]]


@contextmanager
def _stage(stages: list[tuple[str, float]], name: str) -> Iterator[None]:
    logger.info("%s…", name)
    start = time.monotonic()
    yield
    seconds = time.monotonic() - start
    stages.append((name, seconds))
    logger.info("%s: done in %.1f s", name, seconds)


def _sizes(folder: Path, files: Sequence[str]) -> int:
    return sum((folder / n).stat().st_size for n in files)


def _replace_folder(staging: Path, out: Path, *, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
        if not (out / DESCRIPTION).is_file():
            raise FileExistsError(f"{out} exists and is not a medgemma export: refusing")
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / out.name)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)


def export_medgemma(settings: MedgemmaSettings) -> MedgemmaResult:
    """Export, check parity, write ``settings.out`` whole (or nothing)."""
    if settings.weights == "fp16":
        raise ConfigError(
            "--weights",
            "fp16 is refused: Gemma 3 is known to give empty output in fp16; use int4 "
            "(weight-only, fp32 compute), int8 or fp32",
        )
    out = Path(settings.out)
    if out.exists() and not settings.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if settings.notice is not None and not settings.notice.is_file():
        raise ResourceMissing(f"notice file {settings.notice} does not exist")
    torch = _import_torch()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    stages: list[tuple[str, float]] = []
    with _stage(stages, f"loading checkpoint {settings.checkpoint}"):
        ckpt = load_checkpoint(settings.checkpoint)
    cfg = text_config(ckpt.model, ckpt.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        files: dict[str, list[str]] = {}
        with _stage(stages, "exporting vision encoder + projector (torch.onnx dynamo)"):
            files["vision"] = export_vision(ckpt.model, ckpt.image_size, staging / "vision.onnx")
        quantize = settings.weights in ("int4", "int8")
        embed = staging / "embed.onnx"
        # int4: the embedding table too (a quarter of MedGemma's 2.7 GB fp32 table would
        # still be ~0.7 GB in int8; ONNX Runtime's GatherBlockQuantized takes int4).
        fp32_embed = staging / "embed.fp32.onnx" if settings.weights == "int4" else embed
        with _stage(stages, "exporting token embedding (torch.onnx dynamo)"):
            files["embed"] = export_embedding(ckpt.model, fp32_embed)
        if fp32_embed != embed:
            with _stage(stages, "quantizing the token embedding to int4 (GatherBlockQuantized)"):
                files["embed"] = quantize_embedding(
                    fp32_embed, embed, bits=4, block_size=settings.block_size
                )
        decoder = staging / "decoder.onnx"
        # The fp32 decoder is the parity reference; with int4/int8 it is dropped afterwards.
        fp32_decoder = staging / "decoder.fp32.onnx" if quantize else decoder
        with _stage(stages, "exporting decoder with KV cache (torch.onnx dynamo)"):
            files["decoder"] = export_decoder(ckpt.model, fp32_decoder)
        if quantize:
            with _stage(stages, f"quantizing decoder weights to {settings.weights}"):
                files["decoder"] = quantize_decoder(
                    fp32_decoder,
                    decoder,
                    bits=4 if settings.weights == "int4" else 8,
                    block_size=settings.block_size,
                    accuracy_level=4 if settings.compute == "int8" else None,
                )

        def pipeline(embed_path: Path, decoder_path: Path) -> OnnxGemma3:
            return OnnxGemma3(
                staging / "vision.onnx",
                embed_path,
                decoder_path,
                cfg,
                threads=settings.threads,
            )

        with _stage(stages, "parity: greedy tokens, ONNX Runtime vs PyTorch"):
            parity = check_parity(
                ckpt,
                pipeline(fp32_embed, fp32_decoder),
                pipeline(embed, decoder) if quantize else None,
                max_new_tokens=settings.parity_tokens,
            )
        parity_gate(parity)
        if quantize:
            remove_onnx(fp32_decoder)
        if fp32_embed != embed:
            remove_onnx(fp32_embed)
        for name in TOKENIZER_COPY:
            if (ckpt.path / name).is_file():
                shutil.copy2(ckpt.path / name, staging / name)
        if settings.notice is not None:
            shutil.copy2(settings.notice, staging / NOTICE)
        if not (staging / CHAT_TEMPLATE).is_file():  # it was in tokenizer_config.json
            template = read_chat_template(ckpt.path)
            assert template is not None  # check_checkpoint refuses a checkpoint without one
            (staging / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
        backend = getattr(ckpt.tokenizer, "backend_tokenizer", None)
        if not (staging / "tokenizer.json").is_file() and backend is not None:
            backend.save(str(staging / "tokenizer.json"))  # the daemon reads tokenizer.json
        description = describe(ckpt, cfg, settings, files, parity, staging)
        (staging / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
        _replace_folder(staging, out, overwrite=settings.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return MedgemmaResult(out=out, description=description, parity=parity, stages=stages)


def describe(
    ckpt: Checkpoint,
    cfg: TextConfig,
    settings: MedgemmaSettings,
    files: dict[str, list[str]],
    parity: Parity,
    folder: Path,
) -> dict[str, Any]:
    """The contents of ``medgemma.json``: what each graph is, how to drive it, parity."""
    everything = [n for names in files.values() for n in names]
    everything += [n for n in (*TOKENIZER_COPY, NOTICE) if (folder / n).is_file()]
    weights = settings.weights
    return {
        "format": FORMAT,
        "source": ckpt.path.name,
        "notice": NOTICE if (folder / NOTICE).is_file() else None,
        "graphs": {
            "vision": {"file": files["vision"][0], "precision": "fp32"},
            "embed": {
                "file": files["embed"][0],
                "precision": f"int4 weights (GatherBlockQuantized, block {settings.block_size}, "
                "symmetric)"
                if weights == "int4"
                else "fp32",
            },
            "decoder": {
                "file": files["decoder"][0],
                "precision": f"{weights} weights (MatMulNBits, block {settings.block_size}, "
                f"symmetric), {settings.compute} compute on CPUs"
                if weights in ("int4", "int8")
                else "fp32",
            },
        },
        "exporter": f"torch.onnx dynamo, opset {OPSET}",
        "image": {
            "size": ckpt.image_size,
            "mean": list(ckpt.mean),
            "std": list(ckpt.std),
            "tokens_per_image": cfg.tokens_per_image,
        },
        "text": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "tokens": {
            "bos": ckpt.tokenizer.bos_token,
            "boi": ckpt.tokenizer.boi_token,
            "image": ckpt.tokenizer.image_token,
            "eoi": ckpt.tokenizer.eoi_token,
        },
        "chat_template": CHAT_TEMPLATE,
        "parity": parity.summary(),
        "files": {n: sha256_file(folder / n) for n in everything},
        "bytes": _sizes(folder, everything),
        "weights_sha256": weights_sha256(weight_paths(ckpt.path)),
    }


def summary(result: MedgemmaResult) -> str:
    p = result.parity.summary()
    lines = [
        f"export     {result.out}: {len(result.description['files'])} files, "
        f"{result.description['bytes'] / 1e6:.1f} MB",
        f"parity     {p['prompts']} prompts × {p['max_new_tokens']} tokens: ONNX fp32 greedy "
        f"== PyTorch; |log-likelihood delta| ≤ {p['fp32_log_likelihood_delta_max']:.2g}",
    ]
    if "quantized_log_likelihood_delta_mean" in p:
        lines.append(
            f"quantized  mean log-likelihood delta {p['quantized_log_likelihood_delta_mean']:+.4f}"
            f", token agreement {p['quantized_token_agreement']:.1%}, greedy equal on "
            f"{p['quantized_greedy_equal_prompts']}/{p['prompts']} prompts"
        )
    lines.append(
        "stages     " + ", ".join(f"{n.split(' (')[0]} {s:.1f} s" for n, s in result.stages)
    )
    return "\n".join(lines)


def _cmd(args: argparse.Namespace) -> int:
    settings = MedgemmaSettings(
        checkpoint=args.checkpoint,
        out=args.out,
        weights=args.weights,
        block_size=args.block_size,
        parity_tokens=args.parity_tokens,
        overwrite=args.overwrite,
        threads=args.threads,
        compute=args.compute,
        notice=args.notice,
    )
    print(summary(export_medgemma(settings)))
    return 0


def _block_size(text: str) -> int:
    value = int(text)
    if value < 16 or value & (value - 1):
        raise argparse.ArgumentTypeError("must be a power of two, at least 16")
    return value


def token_count(text: str) -> int:
    """argparse type: a number of tokens, 1..1024."""
    value = int(text)
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError("must be within 1..1024")
    return value


def register(sub: Any) -> None:
    """Add the ``medgemma`` subcommand to edge-export's subparsers."""
    p = sub.add_parser(
        "medgemma",
        help="export a local MedGemma (Gemma 3 multimodal) checkpoint to ONNX (int4 decoder)",
        description="Export a local Gemma 3 multimodal checkpoint (MedGemma 4B or a distilled "
        "student) to the ONNX graphs generation needs: vision encoder + projector, token "
        "embedding, decoder with KV cache (weights int4 or int8 with MatMulNBits, or fp32). "
        "A parity gate requires the ONNX fp32 pipeline's greedy tokens to equal PyTorch's; "
        "the quantized decoder's log-likelihood delta is recorded in medgemma.json.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="local checkpoint folder")
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument(
        "--weights",
        choices=["int4", "int8", "fp16", "fp32"],
        default="int4",
        help="decoder weights (default int4); fp16 is refused: Gemma 3 breaks in fp16",
    )
    p.add_argument(
        "--block-size",
        type=_block_size,
        default=32,
        help="int4/int8 quantization block along K (default 32)",
    )
    p.add_argument(
        "--parity-tokens",
        type=token_count,
        default=16,
        help="greedy tokens compared per test prompt (default 16)",
    )
    p.add_argument(
        "--compute",
        choices=["int8", "fp32"],
        default="int8",
        help="int4/int8 decoders on CPUs: int8 (default; ONNX Runtime's accuracy_level 4, "
        "activations quantized per block, ~1.5x the tokens/s of fp32 compute on the 4B "
        "architecture) or fp32; GPU providers ignore it",
    )
    p.add_argument(
        "--notice",
        type=Path,
        help="the weights' licence NOTICE file, shipped with the export and the bundle "
        "(MedGemma's terms ask for it)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd)
