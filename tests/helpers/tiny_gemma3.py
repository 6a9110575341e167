"""Tiny random Gemma 3 multimodal checkpoints of the real architecture (MedGemma's family).

The model is ``transformers.Gemma3ForConditionalGeneration`` with a small config that keeps
what matters to the export: a SigLIP vision tower, the multimodal projector's average pooling
(64 patches pooled to 16 image tokens), grouped-query attention, local (sliding window) and
global layers with their two RoPE bases, the bidirectional mask over image tokens, tied
embeddings. The sliding window (8) is shorter than the test prompts, so it is exercised.

The tokenizer is a real ``GemmaTokenizer`` (byte-fallback BPE, character level here) whose
vocabulary holds Gemma 3's special tokens, with ``extra_special_tokens`` for the image
tokens, as the Gemma 3 processor needs, and Gemma 3's own chat template
(:data:`CHAT_TEMPLATE`, saved as chat_template.jinja). Weights are drawn with a larger spread
than the default initialisation so that the next-token distribution is peaked: greedy
decoding of a random model with near-uniform logits would hang on float noise. Only the
export tests import this (it needs the [export] extra).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizer

from .image_processor import write_image_processor

IMAGE_SIZE = 64
PATCH_SIZE = 8
TOKENS_PER_IMAGE = 16
SLIDING_WINDOW = 8
SPECIAL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
EXTRA_SPECIAL_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
PROMPTS = [
    "Describe this chest X-ray.",
    "Is there a pneumothorax?",
    "Findings:",
]
# google/gemma-3-4b-it's chat template, verbatim (tokenizer_config.json "chat_template"; its
# '\n\n' and '\n' are real newlines there too): bos, a system prompt folded into the first
# user turn, alternating roles (assistant -> "model"), an image item -> <start_of_image>,
# which the processor then expands (see export.medgemma.image_prompt).
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def _vocab() -> dict[str, int]:
    tokens = list(SPECIAL)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["▁", *string.ascii_letters, *string.digits, *".,:;?!-'()/"]
    return {t: i for i, t in enumerate(tokens)}


def make_tokenizer(folder: Path) -> GemmaTokenizer:
    vocab = _vocab()
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=[],
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[5:]})
    tokenizer.chat_template = CHAT_TEMPLATE  # saved as chat_template.jinja
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def tiny_config(vocab_size: int) -> Gemma3Config:
    vocab = _vocab()
    return Gemma3Config(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": SLIDING_WINDOW,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "max_position_embeddings": 512,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {
                    "rope_type": "linear",
                    "rope_theta": 1_000_000.0,
                    "factor": 8.0,
                },
            },
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "vision_use_head": False,
        },
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
    )


def make_checkpoint(folder: Path, *, seed: int = 0, spread: float = 0.05) -> Path:
    """Save a tiny Gemma 3 multimodal checkpoint (model, tokenizer, preprocessor_config.json)
    as ``save_pretrained`` writes one. ``spread``: std of the random weights."""
    tokenizer = make_tokenizer(folder)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(tiny_config(len(tokenizer)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, spread)
            elif "norm" in name:
                param.normal_(0.0, 0.1)
    model.eval()
    model.save_pretrained(str(folder))
    write_image_processor(
        folder, IMAGE_SIZE, "Gemma3ImageProcessor", processor_class="Gemma3Processor"
    )
    return folder
