"""Tiny random SigLIP checkpoints of the real architecture, as ``save_pretrained`` writes them.

The model is ``transformers.SiglipModel`` with a small config; the tokenizer is a real
SentencePiece model trained on the findings' prompts (SigLIP's tokenizer: ``</s>`` as eos and
pad, ``<unk>``, lower-casing), saved with ``SiglipTokenizer.save_pretrained``. Only the
export tests import this (it needs the [export] extra).
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

from .image_processor import write_image_processor

IMAGE_SIZE = 32
PROMPTS = [
    "apical pneumothorax",
    "no pneumothorax",
    "left pleural effusion",
    "no evidence of pleural effusion",
    "lung nodule",
    "lung mass",
    "no focal lung lesion",
    "no acute cardiopulmonary process",
    "normal study",
    "free air under the diaphragm",
    "consolidation",
]


def tiny_config(image_size: int = IMAGE_SIZE) -> SiglipConfig:
    return SiglipConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 8,
        },
    )


def train_tokenizer(folder: Path) -> SiglipTokenizer:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PROMPTS * 10),
        model_writer=model,
        vocab_size=60,
        hard_vocab_limit=False,
        model_type="unigram",
        unk_id=2,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def make_checkpoint(folder: Path, *, seed: int = 0, patch_scale: float = 1.0) -> Path:
    """Save a tiny SigLIP checkpoint (model, tokenizer, preprocessor_config.json).

    ``patch_scale`` multiplies the patch embedding weights: a large value makes activations
    overflow fp16 (a model that does not survive lower precision)."""
    torch.manual_seed(seed)
    model = SiglipModel(tiny_config())
    with torch.no_grad():
        # SigLIP's own init: logit_scale log(10), bias -10; keep scores away from 0.
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.0)
        model.vision_model.embeddings.patch_embedding.weight.mul_(patch_scale)
    model.eval()
    model.save_pretrained(str(folder))
    train_tokenizer(folder)
    write_image_processor(folder, IMAGE_SIZE, "SiglipImageProcessor")
    return folder


FINDINGS_TOML = """
[[finding]]
code = "pneumothorax"
label = "Pneumothorax"
present = ["Apical Pneumothorax"]
absent = ["no pneumothorax"]
review_threshold = 0.4
urgent_threshold = 0.6

[[finding]]
code = "lung_nodule"
label = "Lung nodule or mass"
present = ["lung nodule", "lung mass"]
absent = ["no focal lung lesion", "normal study"]
review_threshold = 0.5
"""
