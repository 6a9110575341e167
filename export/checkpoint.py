"""Checks shared by every export that starts from a local ``save_pretrained`` folder.

Each raises :class:`CheckpointError` (exit 2) or :class:`ResourceMissing` (exit 3, for a
missing folder) with a one-line message that names the file at fault; nothing here needs
the network or the ``[export]`` extra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from edge_agent.bundle import sha256_file
from edge_agent.errors import EdgeTriageError, ResourceMissing

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class CheckpointError(EdgeTriageError):
    """The checkpoint folder cannot be used; the message says what is wrong with it."""

    exit_code = 2


def read_config(path: Path) -> dict[str, Any]:
    """The folder's config.json as a dict; refuses a config that asks for remote code."""
    if not path.exists():
        raise ResourceMissing(f"checkpoint folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is not a folder (give the folder save_pretrained wrote, "
            "with config.json, model.safetensors and the tokenizer)"
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {path}: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: config.json is not a JSON object")
    return config


def refuse_remote_code(path: Path, config: dict[str, Any]) -> None:
    if "auto_map" in config:
        raise CheckpointError(
            f"checkpoint {path}: config.json asks for remote code (auto_map); refusing: "
            "an offline export runs only the installed transformers code"
        )


def weight_paths(path: Path) -> list[Path]:
    """The weight files (every shard of a sharded checkpoint), checked to exist."""
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(
            f"checkpoint {path}: no weights ({' or '.join(WEIGHT_FILES)}); the download is "
            "incomplete"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            raise CheckpointError(
                f"checkpoint {path}: model.safetensors.index.json is not valid: {exc}"
            ) from exc
        for shard in shards:
            if not (path / shard).is_file():
                raise CheckpointError(f"checkpoint {path}: weight shard {shard} is missing")
        return [path / s for s in shards]
    return [path / n for n in WEIGHT_FILES if (path / n).is_file()][:1]


def require_tokenizer(path: Path, names: tuple[str, ...], why: str) -> None:
    if not any((path / name).is_file() for name in names):
        raise CheckpointError(f"checkpoint {path}: no tokenizer ({' or '.join(names)}); {why}")


def weights_sha256(paths: list[Path]) -> str:
    """One digest for the weights: the file's own sha256, or for shards the sha256 of their
    sha256s in name order."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def go_offline() -> None:
    """Make sure nothing from here on reaches for the Hugging Face hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def image_normalisation(path: Path, image_size: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from preprocessor_config.json, read as plain JSON (transformers' image
    processor needs torchvision), else SigLIP's 0.5; its size must be the vision tower's."""
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    config_path = path / "preprocessor_config.json"
    if not config_path.is_file():
        logger.warning(
            "checkpoint %s has no preprocessor_config.json; using SigLIP's mean = std = 0.5",
            path,
        )
        return mean, std
    try:
        pre = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: preprocessor_config.json is not valid JSON: {exc}"
        ) from exc
    size = pre.get("size", {})
    side = size.get("height") if isinstance(size, dict) else size
    if side is not None and int(side) != image_size:
        raise CheckpointError(
            f"checkpoint {path}: preprocessor_config.json size {side} != the vision tower's "
            f"image_size {image_size}"
        )
    return tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))


def load_model(path: Path, model_class: Any, **kwargs: Any) -> Any:
    """``model_class.from_pretrained`` from the local folder only, in eval mode; any failure
    becomes one CheckpointError line."""
    try:
        model = model_class.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as exc:  # safetensors, torch and transformers raise many types
        raise CheckpointError(
            f"checkpoint {path}: the model does not load ({type(exc).__name__}: {exc})"
        ) from exc
    model.eval()
    return model


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # sentencepiece and tokenizers raise many types
        raise CheckpointError(
            f"checkpoint {path}: the tokenizer does not load ({type(exc).__name__}: {exc})"
        ) from exc
