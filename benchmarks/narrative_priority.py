"""Does a narrative delay a flag? The encoder's latency while the language model generates.

    .venv/bin/python benchmarks/narrative_priority.py [--images 12] [--tiny]

The daemon scores studies (the encoder) and writes MedGemma narratives (the language model)
in two threads of one process. Before every generated token the narrative worker waits while
a study is being scored, so what can still compete with a flag is the one decoder step in
flight when the study arrives (the prefill, the longest, is one step). The worker therefore
also runs niced (profile ``narrative.nice``), and so do the ONNX Runtime threads it creates.

This measures the worst case, a decoder step always in flight: a thread runs the language
model without pause (a 300-token prefill, then decode steps, over and over) while the
encoder embeds images one at a time, on ONNX Runtime's CPU provider, both with all cores.
Three conditions, one process, one after the other:

  alone        encoder only (the baseline of every ratio)
  nice 0       the generating thread at the encoder's priority
  nice 10      the generating thread niced as NarrativeWorker does (the default)

Both models have random weights of the real architectures, exported with the export stage's
own code: a SigLIP vision tower (ViT-B size, 224 px: MedSigLIP-448 is ~4× the work) and a
Gemma 3 decoder with the KV-cache interface of ``edge-export medgemma`` (8 layers, width
1024: MedGemma 4B is ~15× the work per token). What is compared is how the scheduler shares
the cores, which the sizes do not change much. ``--tiny`` runs small configurations in
seconds (used by the tests). Prints the CPU, the latencies and the ratios to ``alone``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.encoder import cpu_description, cpu_session, log

ENCODER = {
    "full": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "patch_size": 16,
        "image_size": 224,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 8,
        "image_size": 32,
    },
}
DECODER = {
    "full": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 32768,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
    },
}
PROMPT, DECODE = {"full": 300, "tiny": 40}, 16


def build_encoder(size: str, path: Path) -> int:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from export.onnx_export import export_image_encoder

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**ENCODER[size])).eval()
    export_image_encoder(model, ENCODER[size]["image_size"], path)
    return sum(p.numel() for p in model.parameters())


def build_decoder(size: str, path: Path) -> int:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from export.medgemma import export_decoder

    cfg = DECODER[size]
    layers = cfg["num_hidden_layers"]
    text = {
        **cfg,
        "query_pre_attn_scalar": cfg["head_dim"],
        "sliding_window": 1024,
        "layer_types": [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)
        ],
        "max_position_embeddings": 4096,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "vision_use_head": False,
    }
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16)
    config.image_token_id = cfg["vocab_size"] - 1
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    export_decoder(model, path)
    return sum(p.numel() for p in model.model.language_model.parameters())


class Generating:
    """A thread running the decoder without pause, like a narrative always mid-step."""

    def __init__(self, decoder: Path, size: str, threads: int, nice: int) -> None:
        self.decoder, self.size, self.threads, self.nice = decoder, size, threads, nice
        self.stop = threading.Event()
        self.loaded = threading.Event()
        self.steps = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Generating:
        self.thread.start()
        self.loaded.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:

        from edge_agent.gemma import attention_masks, kv_names

        if self.nice:  # what NarrativeWorker._lower_priority does, before the session exists
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        session, _ = cpu_session(self.decoder, self.threads)
        cfg = DECODER[self.size]
        past_names, present_names = kv_names(cfg["num_hidden_layers"])
        selects_logits = "logits_positions" in {i.name for i in session.get_inputs()}
        rng = np.random.default_rng(0)
        self.loaded.set()
        while not self.stop.is_set():
            shape = (1, cfg["num_key_value_heads"], 0, cfg["head_dim"])
            past = [np.zeros(shape, np.float32) for _ in past_names]
            seq = PROMPT[self.size]
            for _ in range(DECODE + 1):
                if self.stop.is_set():
                    return
                done = past[0].shape[2]
                token_type = np.zeros(done + seq, np.int64)
                full, sliding = attention_masks(token_type, done, 1024)
                feeds: dict[str, Any] = {
                    "inputs_embeds": rng.standard_normal((1, seq, cfg["hidden_size"]), np.float32),
                    "position_ids": np.arange(done, done + seq, dtype=np.int64)[None],
                    "full_attention_mask": full,
                    "sliding_attention_mask": sliding,
                    **dict(zip(past_names, past, strict=True)),
                }
                if selects_logits:
                    feeds["logits_positions"] = np.array([seq - 1], np.int64)
                _, *past = session.run(["logits", *present_names], feeds)
                self.steps += 1
                seq = 1


def encoder_latencies(session: Any, images: np.ndarray) -> list[float]:
    out = []
    for image in images:
        start = time.perf_counter()
        session.run(None, {"pixel_values": image[None]})
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12, help="images per condition")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--tiny", action="store_true", help="small models, seconds")
    args = parser.parse_args()
    size = "tiny" if args.tiny else "full"

    import onnxruntime as ort

    print(f"CPU: {cpu_description()}, {os.cpu_count()} logical cores; ORT {ort.__version__}")
    with tempfile.TemporaryDirectory(prefix="narrative-priority-") as tmp:
        work = Path(tmp)
        log("exporting the encoder (SigLIP vision, random weights)")
        enc_params = build_encoder(size, work / "encoder.onnx")
        log("exporting the decoder (Gemma 3 text with KV cache, random weights)")
        dec_params = build_decoder(size, work / "decoder.onnx")
        print(
            f"encoder {enc_params / 1e6:.1f} M parameters, decoder {dec_params / 1e6:.1f} M; "
            f"prompt {PROMPT[size]} tokens then {DECODE} decode steps, repeated; "
            f"{args.threads} threads each"
        )
        encoder, _ = cpu_session(work / "encoder.onnx", args.threads)
        n = ENCODER[size]["image_size"]
        images = np.random.default_rng(1).standard_normal((args.images, 3, n, n), np.float32)
        encoder_latencies(encoder, images[:2])  # warm-up

        rows: list[tuple[str, list[float], int]] = []
        log("encoder alone")
        rows.append(("alone", encoder_latencies(encoder, images), 0))
        for nice in (0, 10):
            log(f"encoder while the decoder generates at nice {nice}")
            with Generating(work / "decoder.onnx", size, args.threads, nice) as gen:
                time.sleep(0.5)  # a step under way
                latencies = encoder_latencies(encoder, images)
                steps = gen.steps
            rows.append((f"nice {nice}", latencies, steps))

    base = statistics.median(rows[0][1])
    print()
    print("| condition | encoder median | p90 | vs alone | decoder steps meanwhile |")
    print("| --- | --- | --- | --- | --- |")
    for name, latencies, steps in rows:
        median = statistics.median(latencies)
        p90 = float(np.percentile(latencies, 90))
        print(
            f"| {name} | {median * 1000:.1f} ms | {p90 * 1000:.1f} ms | {median / base:.2f}× "
            f"| {steps if name != 'alone' else '–'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
