"""Gemma 3 generation on ONNX Runtime: the graphs ``edge-export medgemma`` writes, driven by
plain numpy (batch 1, greedy, KV cache).

The export's parity gate runs this same loop against PyTorch's ``generate``, so what the
daemon generates is what the gate checked. Three graphs (see docs/medgemma.md):
``vision`` (image → image token embeddings), ``embed`` (token ids → embeddings) and
``decoder`` (embeddings, positions, two additive attention masks, past keys/values →
logits, present keys/values).

The prompt is the checkpoint's own chat template (Jinja, rendered as transformers'
``apply_chat_template`` does) with the image written as Gemma 3's processor writes it, and
tokenized with the checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``; no
transformers or torch on the device).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, ExtraMissing

logger = logging.getLogger(__name__)

MASKED = float(np.finfo(np.float32).min)


class GenerationTimeout(Exception):
    """The deadline passed before generation ended; ``tokens`` holds what was generated."""

    def __init__(self, tokens: list[int]) -> None:
        super().__init__(f"deadline passed after {len(tokens)} tokens")
        self.tokens = tokens


class GenerationStopped(Exception):
    """Asked to stop (the daemon is shutting down)."""


@dataclass(frozen=True)
class TextConfig:
    """What the generation loop needs to know about the decoder."""

    hidden_size: int
    vocab_size: int
    layer_types: tuple[str, ...]
    sliding_window: int
    num_key_value_heads: int
    head_dim: int
    image_token_id: int
    tokens_per_image: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_fields(cls, fields: Any) -> TextConfig:
        """From any object with the same attributes (the manifest's ``report.text``)."""
        return cls(
            hidden_size=int(fields.hidden_size),
            vocab_size=int(fields.vocab_size),
            layer_types=tuple(fields.layer_types),
            sliding_window=int(fields.sliding_window),
            num_key_value_heads=int(fields.num_key_value_heads),
            head_dim=int(fields.head_dim),
            image_token_id=int(fields.image_token_id),
            tokens_per_image=int(fields.tokens_per_image),
            eos_token_ids=tuple(int(i) for i in fields.eos_token_ids),
        )


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names) of the decoder graph."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def attention_masks(
    token_type: np.ndarray, past: int, sliding_window: int
) -> tuple[np.ndarray, np.ndarray]:
    """(full, sliding) additive masks (1, 1, S, past + S) for S new tokens after ``past``.

    ``token_type``: (past + S,) 1 where the token is an image token. As transformers builds
    them for Gemma 3: global layers OR(causal, same image block); local layers additionally
    AND a window of ``sliding_window`` positions.
    """
    total = token_type.shape[0]
    q = np.arange(past, total)[:, None]
    k = np.arange(total)[None, :]
    is_image = token_type.astype(bool)
    starts = is_image & ~np.concatenate([[False], is_image[:-1]])
    block = np.where(is_image, np.cumsum(starts) - 1, -1)
    same_block = (block[past:, None] == block[None, :]) & (block[past:, None] >= 0)
    full = (k <= q) | same_block
    sliding = full & (k > q - sliding_window)

    def additive(allowed: np.ndarray) -> np.ndarray:
        return np.where(allowed, 0.0, MASKED).astype(np.float32)[None, None]

    return additive(full), additive(sliding)


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExtraMissing("onnxruntime", "cpu") from exc
    return onnxruntime


class OnnxGemma3:
    """Greedy generation with the three graphs on ONNX Runtime, in plain numpy, batch 1.

    ``providers``: ONNX Runtime execution providers, most preferred first (CPU by default).
    """

    def __init__(
        self,
        vision: Path,
        embed: Path,
        decoder: Path,
        config: TextConfig,
        *,
        threads: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        ort = _import_ort()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3

        def session(path: Path) -> Any:
            return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))

        self.vision = session(vision)
        self.embed = session(embed)
        self.decoder = session(decoder)
        self.provider = str(self.decoder.get_providers()[0])
        # Decoders exported with a ``logits_positions`` input compute the LM head only where
        # asked (the last position while generating): for MedGemma's 262k vocabulary that
        # saves ~300 MB and a sixth of the prefill's work on a 300-token prompt.
        self.selects_logits = "logits_positions" in {i.name for i in self.decoder.get_inputs()}
        self.config = config
        self.past_names, self.present_names = kv_names(len(config.layer_types))

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        out = self.vision.run(["image_features"], {"pixel_values": pixel_values.astype(np.float32)})
        return np.asarray(out[0])

    def token_embeds(self, input_ids: np.ndarray) -> np.ndarray:
        """(S,) ids → (S, D) embeddings. An image token id outside the vocabulary reads as 0
        (its embedding is replaced by an image feature)."""
        cfg = self.config
        ids = input_ids.astype(np.int64)
        out_of_vocabulary = (ids == cfg.image_token_id) & (cfg.image_token_id >= cfg.vocab_size)
        lookup = np.where(out_of_vocabulary, 0, ids)
        return np.asarray(self.embed.run(["inputs_embeds"], {"input_ids": lookup[None]})[0][0])

    def prompt_embeds(
        self, input_ids: np.ndarray, pixel_values: np.ndarray, image_positions: np.ndarray
    ) -> np.ndarray:
        """Token embeddings with the image features put at ``image_positions`` (a boolean
        mask over ``input_ids`` (S,)), in order, as transformers' ``masked_scatter`` does."""
        embeds = self.token_embeds(input_ids)
        if image_positions.any():
            features = self.image_features(pixel_values).reshape(-1, self.config.hidden_size)
            if features.shape[0] != int(image_positions.sum()):
                raise ValueError(
                    f"{int(image_positions.sum())} image tokens in the prompt, "
                    f"{features.shape[0]} image features"
                )
            embeds[image_positions] = features
        return embeds

    def _step(
        self,
        embeds: np.ndarray,
        token_type: np.ndarray,
        past: list[np.ndarray],
        *,
        last_only: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: (logits (S, V), or (1, V) for the last position only when
        ``last_only`` and the graph can, present keys/values)."""
        cfg = self.config
        past_len = past[0].shape[2]
        seq = embeds.shape[0]
        full, sliding = attention_masks(token_type, past_len, cfg.sliding_window)
        feeds = {
            "inputs_embeds": embeds[None].astype(np.float32),
            "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None],
            "full_attention_mask": full,
            "sliding_attention_mask": sliding,
        }
        if self.selects_logits:
            first = seq - 1 if last_only else 0
            feeds["logits_positions"] = np.arange(first, seq, dtype=np.int64)
        feeds.update(zip(self.past_names, past, strict=True))
        logits, *present = self.decoder.run(["logits", *self.present_names], feeds)
        return logits[0], present

    def _empty_past(self) -> list[np.ndarray]:
        cfg = self.config
        shape = (1, cfg.num_key_value_heads, 0, cfg.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    def generate(
        self,
        input_ids: np.ndarray,
        pixel_values: np.ndarray,
        max_new_tokens: int,
        *,
        deadline: float | None = None,
        before_step: Callable[[], None] | None = None,
    ) -> list[int]:
        """Greedy tokens after the prompt (stops at an end-of-turn/eos token, included).

        ``deadline`` (``time.monotonic()``): checked before every step; past it,
        :class:`GenerationTimeout` with the tokens so far. ``before_step`` runs before every
        step (the daemon pauses there while a study is being scored, or raises
        :class:`GenerationStopped`).
        """

        def checkpoint(tokens: list[int]) -> None:
            if before_step is not None:
                before_step()
            if deadline is not None and time.monotonic() > deadline:
                raise GenerationTimeout(tokens)

        cfg = self.config
        tokens: list[int] = []
        checkpoint(tokens)
        token_type = (input_ids == cfg.image_token_id).astype(np.int64)
        embeds = self.prompt_embeds(input_ids, pixel_values, token_type.astype(bool))
        checkpoint(tokens)
        logits, past = self._step(embeds, token_type, self._empty_past(), last_only=True)
        while len(tokens) < max_new_tokens:
            token = int(np.argmax(logits[-1]))
            tokens.append(token)
            if token in cfg.eos_token_ids:
                break
            checkpoint(tokens)
            token_type = np.append(token_type, 0)  # a generated image token is a plain token
            embeds = self.token_embeds(np.array([token]))
            logits, past = self._step(embeds, token_type, past)
        return tokens

    def continuation_logits(
        self, input_ids: np.ndarray, pixel_values: np.ndarray, continuation: Sequence[int]
    ) -> np.ndarray:
        """Logits (len(continuation), V) predicting each continuation token, teacher-forced
        in one pass over prompt + continuation. Only the prompt's image tokens take image
        features (a generated image token is a plain token, as in generation)."""
        ids = np.concatenate([input_ids, np.asarray(continuation[:-1], np.int64)])
        token_type = np.zeros(len(ids), np.int64)
        token_type[: len(input_ids)] = input_ids == self.config.image_token_id
        embeds = self.prompt_embeds(ids, pixel_values, token_type.astype(bool))
        logits, _ = self._step(embeds, token_type, self._empty_past())
        return logits[len(input_ids) - 1 :]


# --- the prompt ------------------------------------------------------------------------------


def expand_image(text: str, boi: str, image: str, eoi: str, tokens_per_image: int) -> str:
    """Gemma 3's processor: each ``boi`` the chat template wrote becomes
    ``\\n\\n{boi}{image × T}{eoi}\\n\\n``."""
    return text.replace(boi, f"\n\n{boi}{image * tokens_per_image}{eoi}\n\n")


class ChatPrompt:
    """The checkpoint's chat template and tokenizer, without transformers.

    The template is rendered the way transformers' ``apply_chat_template`` renders it (a
    sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, and
    ``raise_exception``); the text is tokenized without adding special tokens (the template
    writes ``bos`` itself).
    """

    def __init__(
        self,
        tokenizer_file: Path,
        template_file: Path,
        *,
        bos: str,
        boi: str,
        image: str,
        eoi: str,
        tokens_per_image: int,
    ) -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            from tokenizers import Tokenizer
        except ImportError as exc:  # both are dependencies of the daemon
            raise ExtraMissing("tokenizers/jinja2", "cpu") from exc
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise BundleError(f"{tokenizer_file.name} is not a readable tokenizer: {exc}") from exc

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(template_file.read_text())
        except (OSError, jinja2.exceptions.TemplateError) as exc:
            raise BundleError(f"{template_file.name} is not a usable chat template: {exc}") from exc
        self.bos, self.boi, self.image, self.eoi = bos, boi, image, eoi
        self.tokens_per_image = tokens_per_image

    def text(self, question: str) -> str:
        """One user turn: the image, then ``question``; then the model's turn begins."""
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        rendered = self.template.render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos
        )
        return expand_image(rendered, self.boi, self.image, self.eoi, self.tokens_per_image)

    def input_ids(self, question: str) -> np.ndarray:
        encoding = self.tokenizer.encode(self.text(question), add_special_tokens=False)
        return np.asarray(encoding.ids, dtype=np.int64)

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=True)).strip()
