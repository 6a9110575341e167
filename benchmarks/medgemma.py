"""MedGemma decoder benchmark: the Gemma 3 4B text decoder, int4 against fp32, on a CPU.

    nice -n 10 .venv/bin/python benchmarks/medgemma.py [--variants fp32,int4,int4-acc4]
        [--layers 34] [--prompt 300] [--decode 32] [--threads 2] [--embedding]
        [--work-dir /tmp/medgemma-bench] [--json FILE]

Builds MedGemma 4B's language model (Gemma 3 4B text: hidden 2560, 34 layers (5 local : 1
global), MLP 10240, 8 query / 4 KV heads of 256, vocabulary 262,208, sliding window 1024,
RoPE 10k local / 1M ×8 linear global, tied embeddings) with random weights inside a
``Gemma3ForConditionalGeneration`` with a tiny vision tower, exports its decoder with the
export stage's own code (``export.medgemma.export_decoder``, what ``edge-export medgemma``
runs), quantizes it with ``export.medgemma.quantize_decoder`` (MatMulNBits, block 32) and
measures on ONNX Runtime's CPU provider, each variant in its own process, text only:

  size        bytes of decoder.onnx + decoder.onnx.data
  TTFT        time to first token: one prefill of --prompt random embeddings (the KV-cache
              inputs empty) and the argmax of the last position's logits
  tokens/s    1 / the median time of the --decode greedy steps with the KV cache (one token
              each; masks and position ids as edge_agent.gemma.OnnxGemma3 builds them; the
              next token's embedding is a random vector); the mean is shown too
  peak RSS    of the measuring process (session load + warm-up + prefill + decode)

Variants: fp32 (the baseline of every ratio; ONNX Runtime's weight prepacking off, since it
would keep a second copy of the 15.5 GB of weights: --fp32-prepacking turns it on), int4
(int4 weights, fp32 compute: ``edge-export medgemma --compute fp32``), int4-acc4 (the same
with MatMulNBits ``accuracy_level=4``, int8 activations: what ``edge-export medgemma``
ships by default), int8. ``--embedding`` adds the token
embedding (262,208 × 2560): fp32 ``Gather`` against int4 ``GatherBlockQuantized``
(``export.medgemma.quantize_embedding``): size, lookup time, error.

Every heavy stage (build + export, quantize, each measurement) runs in its own process, one
after the other, so their peaks do not add up. The exported files are kept in --work-dir and
reused by the next run with the same architecture (--rebuild to redo them). The fp32 model
is ~15.5 GB: the stages that hold it (build + export, the fp32 measurement) are refused when
it does not fit in the memory available less 2 GB, naming the largest ``--layers N`` that
would (full width and vocabulary, fewer layers). ``--tiny`` runs a small model of the same
architecture in seconds (used by the tests). Prints the goal check (int4 ≥ 3× fp32's
tokens/s, ≤ 3 GB on disk) without failing on it; exits 1 if a stage fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encoder import _ort_version, _peak_rss_mb, cpu_description, cpu_session

FULL = {
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "vocab_size": 262208,
    "sliding_window": 1024,
    "max_position_embeddings": 131072,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "vocab_size": 512,
    "sliding_window": 8,
    "max_position_embeddings": 512,
}
# variant → (bits, accuracy_level); fp32 is the baseline of every ratio.
VARIANTS: dict[str, tuple[int, int | None]] = {
    "fp32": (32, None),
    "int4": (4, None),
    "int4-acc4": (4, 4),
    "int8": (8, None),
}
BLOCK_SIZE = 32
STAGES = ("build", "quantize", "measure", "embed-build", "embed-quantize", "embed-measure")
GOAL_SPEEDUP = 3.0
GOAL_BYTES = 3e9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def text_config(tiny: bool, layers: int | None) -> dict[str, Any]:
    config: dict[str, Any] = dict(TINY if tiny else FULL)
    if layers is not None:
        config["num_hidden_layers"] = layers
    n = config["num_hidden_layers"]
    # Gemma 3: every sixth layer is global, the others local (sliding window).
    config["layer_types"] = [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)
    ]
    config["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
    }
    return config


def fp32_bytes(config: dict[str, Any], layers: int | None = None) -> int:
    """The text model's fp32 weights (the LM head tied to the embedding)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    per_layer = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * inter
    n = config["num_hidden_layers"] if layers is None else layers
    return 4 * (config["vocab_size"] * hidden + n * per_layer)


def _check_memory(config: dict[str, Any], what: str) -> None:
    """Refuse a stage that holds the fp32 weights (plus ~1 GB) when they do not fit in the
    memory available now less 2 GB left to whatever else runs, naming the largest --layers
    that would."""
    need = fp32_bytes(config) + 1e9
    available = available_gb() * 1e9 - 2e9
    if need <= available:
        return
    fits = [
        n for n in range(1, config["num_hidden_layers"]) if fp32_bytes(config, n) + 1e9 <= available
    ]
    hint = f"--layers {fits[-1]} fits" if fits else "not even one layer fits"
    raise RuntimeError(
        f"{what} needs ~{need / 1e9:.1f} GB, {available / 1e9:.1f} GB available (2 GB kept "
        f"free): {hint}"
    )


def file_bytes(onnx_path: Path) -> int:
    from export.onnx_export import onnx_files

    return sum((onnx_path.parent / n).stat().st_size for n in onnx_files(onnx_path))


# --- stage 1 (child): build + export --------------------------------------------------------


def build_model(config: dict[str, Any], seed: int, threads: int) -> Any:
    """A ``Gemma3ForConditionalGeneration`` with ``config`` as its text model, a tiny vision
    tower and random weights, in fp32, eager attention."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    full = _gemma3_config(config)
    # Built on the meta device, then given memory once: a plain construction allocates the
    # LM head (2.7 GB) before tying it to the embedding, and initialises every matrix twice.
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(full)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    # Buffers (RoPE frequencies, the embedding scale) from a small model of the same width.
    small = dict(config, vocab_size=16)
    small["layer_types"] = list(dict.fromkeys(config["layer_types"]))
    small["num_hidden_layers"] = len(small["layer_types"])
    reference = dict(Gemma3ForConditionalGeneration(_gemma3_config(small)).named_buffers())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(reference[name])
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)
            else:  # Gemma's RMS norms scale by (1 + weight)
                param.normal_(0.0, 0.1 if "norm" in name else 0.02)
    head, embed = model.lm_head.weight, model.model.language_model.embed_tokens.weight
    if head.data_ptr() != embed.data_ptr():
        raise RuntimeError("the LM head is not tied to the embedding")
    model.set_attn_implementation("eager")  # as export.medgemma loads checkpoints
    return model.eval()


def stage_build(config: dict[str, Any], out: Path, seed: int, threads: int) -> dict[str, Any]:
    from export.medgemma import export_decoder

    t0 = time.monotonic()
    model = build_model(config, seed, threads)
    params = sum(p.numel() for p in model.model.language_model.parameters())
    build_s = time.monotonic() - t0
    log(
        f"  built {params / 1e9:.2f} B text parameters in {build_s:.0f} s "
        f"(RSS peak {_size(_peak_rss_mb() * 2**20)}, {available_gb():.1f} GB available)"
    )
    log("  exporting the decoder with export.medgemma.export_decoder (torch.onnx dynamo)…")
    t0 = time.monotonic()
    files = export_decoder(model, out)
    return {
        "text_parameters": params,
        "build_s": build_s,
        "export_s": time.monotonic() - t0,
        "files": files,
        "rss_mb": _peak_rss_mb(),
    }


def _gemma3_config(text: dict[str, Any]) -> Any:
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config=text,
        # The vision tower is not benchmarked: the smallest that builds.
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
            "vision_use_head": False,
        },
        mm_tokens_per_image=16,
        boi_token_index=3,
        eoi_token_index=4,
        image_token_index=5,
    )


# --- stage 2 (child): quantize --------------------------------------------------------------


def stage_quantize(src: Path, dst: Path, bits: int, accuracy_level: int | None) -> dict[str, Any]:
    from export.medgemma import quantize_decoder

    t0 = time.monotonic()
    kwargs: dict[str, Any] = {"bits": bits, "block_size": BLOCK_SIZE}
    if accuracy_level is not None:
        kwargs["accuracy_level"] = accuracy_level
    files = quantize_decoder(src, dst, **kwargs)
    return {"quantize_s": time.monotonic() - t0, "files": files, "rss_mb": _peak_rss_mb()}


# --- stage 3 (child): measure ---------------------------------------------------------------


def stage_measure(
    model: Path,
    config: dict[str, Any],
    *,
    prompt: int,
    decode: int,
    threads: int,
    prepacking: bool,
    seed: int,
) -> dict[str, Any]:

    from edge_agent.gemma import attention_masks, kv_names

    layers = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    kv_heads, head_dim = int(config["num_key_value_heads"]), int(config["head_dim"])
    window = int(config["sliding_window"])
    past_names, present_names = kv_names(layers)
    config = {} if prepacking else {"session.disable_prepacking": "1"}
    session, load_s = cpu_session(model, threads, **config)
    rss_load = _peak_rss_mb()
    log(f"  session loaded in {load_s:.1f} s (RSS peak {_size(rss_load * 2**20)})")
    rng = np.random.default_rng(seed)
    last_only = "logits_positions" in {i.name for i in session.get_inputs()}

    def step(
        embeds: np.ndarray, token_type: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        past_len = past[0].shape[2]
        full, sliding = attention_masks(token_type, past_len, window)
        feeds = {
            "inputs_embeds": embeds[None],
            "position_ids": np.arange(past_len, past_len + len(embeds), dtype=np.int64)[None],
            "full_attention_mask": full,
            "sliding_attention_mask": sliding,
        }
        if last_only:  # as OnnxGemma3 generates: the LM head at the last position only
            feeds["logits_positions"] = np.array([len(embeds) - 1], np.int64)
        feeds.update(zip(past_names, past, strict=True))
        logits, *present = session.run(["logits", *present_names], feeds)
        return logits[0], present

    def empty() -> list[np.ndarray]:
        return [np.zeros((1, kv_heads, 0, head_dim), np.float32) for _ in past_names]

    def embeddings(n: int) -> np.ndarray:
        return rng.standard_normal((n, hidden), dtype=np.float32)

    # Warm-up: a short prefill and one decode step (first-run allocations, kernel selection).
    logits, past = step(embeddings(8), np.zeros(8, np.int64), empty())
    step(embeddings(1), np.zeros(9, np.int64), past)
    del logits, past
    log(f"  warm-up done; prefill of {prompt} tokens…")
    token_type = np.zeros(prompt, np.int64)  # text only
    t0 = time.perf_counter()
    logits, past = step(embeddings(prompt), token_type, empty())
    first = int(np.argmax(logits[-1]))
    ttft = time.perf_counter() - t0
    del logits
    log(f"  TTFT {ttft:.2f} s; {decode} decode steps…")
    tokens = [first]
    steps = []
    for _ in range(decode):
        token_type = np.append(token_type, 0)
        t0 = time.perf_counter()
        logits, past = step(embeddings(1), token_type, past)
        tokens.append(int(np.argmax(logits[-1])))
        steps.append(time.perf_counter() - t0)
    return {
        "load_s": load_s,
        "ttft_s": ttft,
        "decode_s": float(np.sum(steps)),
        # 1 / the median step: a few slow steps (pages of the memory-mapped fp32 weights
        # read back from disk) would otherwise decide the ratio.
        "tokens_per_s": 1.0 / float(np.median(steps)),
        "tokens_per_s_mean": decode / float(np.sum(steps)),
        "step_median_s": float(np.median(steps)),
        "step_max_s": float(np.max(steps)),
        "rss_load_mb": rss_load,
        "rss_mb": _peak_rss_mb(),
        "tokens": tokens,
        "prepacking": prepacking,
        "last_position_logits": last_only,
    }


# --- the token embedding (--embedding): fp32 Gather against int4 GatherBlockQuantized ------


def stage_embed_build(config: dict[str, Any], out: Path, seed: int, threads: int) -> dict[str, Any]:
    """embed.onnx of the full vocabulary (the decoder layers do not matter: one is built)."""
    from export.medgemma import export_embedding

    one = dict(config, num_hidden_layers=1, layer_types=config["layer_types"][:1])
    model = build_model(one, seed, threads)
    t0 = time.monotonic()
    files = export_embedding(model, out)
    return {"export_s": time.monotonic() - t0, "files": files, "rss_mb": _peak_rss_mb()}


def stage_embed_quantize(src: Path, dst: Path) -> dict[str, Any]:
    from export.medgemma import quantize_embedding

    t0 = time.monotonic()
    files = quantize_embedding(src, dst, bits=4, block_size=BLOCK_SIZE)
    return {"quantize_s": time.monotonic() - t0, "files": files, "rss_mb": _peak_rss_mb()}


def stage_embed_measure(
    model: Path, config: dict[str, Any], *, prompt: int, threads: int, seed: int
) -> dict[str, Any]:
    """Lookup latency of a prompt and of one token; the embeddings of fixed ids are saved
    beside the model for the parent to compare."""

    session, load_s = cpu_session(model, threads)
    rng = np.random.default_rng(seed)
    vocab = int(config["vocab_size"])

    def lookup(n: int, repeat: int) -> float:
        times = []
        for _ in range(repeat):
            ids = rng.integers(0, vocab, (1, n), dtype=np.int64)
            t0 = time.perf_counter()
            session.run(["inputs_embeds"], {"input_ids": ids})
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    # Warm-up: every row once, so that the whole table is resident (ONNX Runtime maps the
    # fp32 weights from disk; random ids would otherwise time page faults).
    for start in range(0, vocab, 8192):
        chunk = np.arange(start, min(vocab, start + 8192))[None]
        session.run(["inputs_embeds"], {"input_ids": chunk})
    lookup(prompt, 2)
    result = {"load_s": load_s, "prompt_s": lookup(prompt, 20), "token_s": lookup(1, 200)}
    ids = np.random.default_rng(1).integers(0, vocab, (1, 256), dtype=np.int64)
    (embeds,) = session.run(["inputs_embeds"], {"input_ids": ids})
    np.save(model.with_suffix(".check.npy"), embeds[0])
    result["rss_mb"] = _peak_rss_mb()
    return result


def run_embedding(args: argparse.Namespace, config: dict[str, Any], folder: Path) -> dict[str, Any]:
    paths = {v: folder / "embed" / v / "embed.onnx" for v in ("fp32", "int4")}
    built: dict[str, dict[str, Any]] = {}
    for variant, stage in (("fp32", "embed-build"), ("int4", "embed-quantize")):
        meta = paths[variant].with_name("built.json")
        if not args.rebuild and meta.is_file() and paths[variant].is_file():
            built[variant] = json.loads(meta.read_text())
            log(f"embedding {variant}: reusing {paths[variant]}")
            continue
        log(f"embedding {variant}: {stage} in a child process ({available_gb():.1f} GB available)…")
        paths[variant].parent.mkdir(parents=True, exist_ok=True)
        built[variant] = run_stage(args, stage)
        meta.write_text(json.dumps(built[variant]))
    rows = {}
    for variant, path in paths.items():
        log(f"measuring the {variant} embedding in a fresh process…")
        rows[variant] = run_stage(args, "embed-measure", variant=variant)
        rows[variant]["bytes"] = file_bytes(path)
    a = np.load(paths["fp32"].with_suffix(".check.npy"))
    b = np.load(paths["int4"].with_suffix(".check.npy"))
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
    base = rows["fp32"]
    print(
        f"\nToken embedding ({config['vocab_size']} × {config['hidden_size']}): fp32 Gather vs "
        f"int4 GatherBlockQuantized (block {BLOCK_SIZE}), lookup of {args.prompt} random ids "
        "(median of 20) and of 1 id (median of 200), the table resident\n"
    )
    print("| variant | size on disk | vs fp32 | prompt lookup | 1 token | peak RSS | build |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        how = built[name].get("export_s", built[name].get("quantize_s", 0.0))
        build_rss = _size(built[name]["rss_mb"] * 2**20)
        print(
            f"| {name} | {_size(r['bytes'])} | {r['bytes'] / base['bytes']:.0%} "
            f"| {_seconds(r['prompt_s'])} | {_seconds(r['token_s'])} "
            f"| {_size(r['rss_mb'] * 2**20)} | {how:.0f} s, {build_rss} |"
        )
    print(
        f"\nembedding int4 vs fp32 on 256 random ids: cosine mean {np.mean(cos):.5f} / min "
        f"{np.min(cos):.5f}, relative error mean {np.mean(rel):.4f}"
    )
    return {"rows": rows, "built": built, "cosine_mean": float(np.mean(cos))}


# --- parent ---------------------------------------------------------------------------------


def run_stage(args: argparse.Namespace, stage: str, **extra: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--stage", stage, "--threads", str(args.threads)]
    cmd += ["--seed", str(args.seed), "--prompt", str(args.prompt), "--decode", str(args.decode)]
    cmd += ["--work-dir", str(args.work_dir)]
    if args.tiny:
        cmd.append("--tiny")
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"stage {stage} {extra} failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def model_dir(args: argparse.Namespace, config: dict[str, Any]) -> Path:
    name = "tiny" if args.tiny else "gemma3-4b"
    return Path(args.work_dir) / f"{name}-{config['num_hidden_layers']}L-seed{args.seed}"


def variant_path(folder: Path, variant: str) -> Path:
    return folder / variant / "decoder.onnx"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="fp32,int4", help=", ".join(VARIANTS))
    parser.add_argument("--layers", type=int, help="decoder layers (default: 34, tiny 6)")
    parser.add_argument("--prompt", type=int, default=300, help="prompt tokens (default 300)")
    parser.add_argument("--decode", type=int, default=32, help="decode steps (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument(
        "--fp32-prepacking",
        action="store_true",
        help="let ONNX Runtime prepack fp32 MatMul weights (default off: it holds a second "
        "copy of the weights while loading)",
    )
    parser.add_argument(
        "--embedding",
        action="store_true",
        help="also the token embedding: fp32 against int4 GatherBlockQuantized",
    )
    parser.add_argument("--skip-decoder", action="store_true", help="only the embedding")
    parser.add_argument("--tiny", action="store_true", help="small config, for the tests")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/medgemma-bench"))
    parser.add_argument("--rebuild", action="store_true", help="ignore cached exports")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--prepacking", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = text_config(args.tiny, args.layers)
    folder = model_dir(args, config)
    if args.stage:
        return child(args, config, folder)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "fp32" not in variants:
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}, fp32 included")
    try:
        return run(args, config, folder, variants)
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 1


def child(args: argparse.Namespace, config: dict[str, Any], folder: Path) -> int:
    if args.stage == "build":
        out = variant_path(folder, "fp32")
        out.parent.mkdir(parents=True, exist_ok=True)
        result = stage_build(config, out, args.seed, args.threads)
    elif args.stage == "quantize":
        bits, level = VARIANTS[args.variant]
        dst = variant_path(folder, args.variant)
        dst.parent.mkdir(parents=True, exist_ok=True)
        result = stage_quantize(variant_path(folder, "fp32"), dst, bits, level)
    elif args.stage == "embed-build":
        out = folder / "embed" / "fp32" / "embed.onnx"
        result = stage_embed_build(config, out, args.seed, args.threads)
    elif args.stage == "embed-quantize":
        embed = folder / "embed"
        result = stage_embed_quantize(embed / "fp32" / "embed.onnx", embed / "int4" / "embed.onnx")
    elif args.stage == "embed-measure":
        result = stage_embed_measure(
            folder / "embed" / args.variant / "embed.onnx",
            config,
            prompt=args.prompt,
            threads=args.threads,
            seed=args.seed,
        )
    else:
        result = stage_measure(
            variant_path(folder, args.variant),
            config,
            prompt=args.prompt,
            decode=args.decode,
            threads=args.threads,
            prepacking=bool(args.prepacking),
            seed=args.seed,
        )
    print(json.dumps(result))
    return 0


def _cached(folder: Path, variant: str, rebuild: bool) -> dict[str, Any] | None:
    meta = folder / variant / "built.json"
    if rebuild or not meta.is_file() or not variant_path(folder, variant).is_file():
        return None
    cached: dict[str, Any] = json.loads(meta.read_text())
    return cached


def run(args: argparse.Namespace, config: dict[str, Any], folder: Path, variants: list[str]) -> int:
    shape = {k: v for k, v in config.items() if k not in ("layer_types", "rope_parameters")}
    local = config["layer_types"].count("sliding_attention")
    log(
        f"architecture {'tiny' if args.tiny else 'Gemma 3 4B text (MedGemma 4B)'}: {shape}, "
        f"{local} local / {len(config['layer_types']) - local} global layers"
    )
    log(f"CPU: {cpu_description()}, {os.cpu_count()} CPUs; threads {args.threads}")
    log(f"work dir {folder}; {available_gb():.1f} GB memory available")
    load_start = os.getloadavg()
    results: dict[str, Any] = {"config": config}
    if not args.skip_decoder:
        results.update(run_decoder(args, config, folder, variants))
    if args.embedding or args.skip_decoder:
        results["embedding"] = run_embedding(args, config, folder)
    load_end = os.getloadavg()
    print(
        "\nload average at start {:.2f}/{:.2f}/{:.2f}, at the end {:.2f}/{:.2f}/{:.2f} "
        "(the ratios need a quiet machine)".format(*load_start, *load_end)
    )
    results["load_average"] = {"start": load_start, "end": load_end}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def run_decoder(
    args: argparse.Namespace, config: dict[str, Any], folder: Path, variants: list[str]
) -> dict[str, Any]:
    built: dict[str, dict[str, Any]] = {}
    for variant in variants:
        cached = _cached(folder, variant, args.rebuild)
        if cached is not None:
            log(f"{variant}: reusing {variant_path(folder, variant)} (built {cached['when']})")
            built[variant] = cached
            continue
        if variant == "fp32" or "fp32" not in built:
            if (cached := _cached(folder, "fp32", args.rebuild)) is not None:
                built["fp32"] = cached
            else:
                _check_memory(config, "build + export")
                log(f"build + export fp32 in a child process ({available_gb():.1f} GB available)…")
                built["fp32"] = run_stage(args, "build")
                _save_meta(folder, "fp32", built["fp32"])
                log(
                    f"  fp32: exported in {built['fp32']['export_s']:.0f} s, "
                    f"peak RSS {_size(built['fp32']['rss_mb'] * 2**20)}"
                )
            if variant == "fp32":
                continue
        log(f"quantizing {variant} in a child process ({available_gb():.1f} GB available)…")
        built[variant] = run_stage(args, "quantize", variant=variant)
        _save_meta(folder, variant, built[variant])
        log(
            f"  {variant}: quantized in {built[variant]['quantize_s']:.0f} s, "
            f"peak RSS {_size(built[variant]['rss_mb'] * 2**20)}"
        )

    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        prepacking = variant != "fp32" or args.fp32_prepacking
        if variant == "fp32":
            _check_memory(config, "measuring fp32")
        log(
            f"measuring {variant} in a fresh process (prepacking {'on' if prepacking else 'off'}, "
            f"{available_gb():.1f} GB available)…"
        )
        row = run_stage(args, "measure", variant=variant, prepacking=int(prepacking))
        row["bytes"] = file_bytes(variant_path(folder, variant))
        rows[variant] = row
        log(
            f"  {variant}: TTFT {row['ttft_s']:.2f} s, {row['tokens_per_s']:.2f} tokens/s, "
            f"peak RSS {_size(row['rss_mb'] * 2**20)}, {_size(row['bytes'])} on disk"
        )

    report(args, config, rows, built)
    return {"built": built, "rows": rows}


def _save_meta(folder: Path, variant: str, result: dict[str, Any]) -> None:
    result["when"] = time.strftime("%Y-%m-%d %H:%M")
    (folder / variant / "built.json").write_text(json.dumps(result, indent=2))


def report(
    args: argparse.Namespace,
    config: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    built: dict[str, dict[str, Any]],
) -> None:
    layers = config["num_hidden_layers"]
    full = not args.tiny and layers == FULL["num_hidden_layers"]
    what = "tiny" if args.tiny else "full size" if full else f"full width, {layers} of 34 layers"
    params = float(built["fp32"]["text_parameters"])
    print(
        f"\nGemma 3 4B text decoder ({what}; {params / 1e9:.2f} B parameters), random "
        f"weights, ONNX Runtime {_ort_version()} CPU, {args.threads} threads, prompt "
        f"{args.prompt} tokens, {args.decode} decode steps, {os.cpu_count()} CPUs: "
        f"{cpu_description()}\n"
    )
    base = rows["fp32"]
    print(
        "| variant | size on disk | vs fp32 | TTFT | speed-up | tokens/s | speed-up | mean "
        "| peak RSS | vs fp32 | session load |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(
            f"| {name} | {_size(r['bytes'])} | {r['bytes'] / base['bytes']:.0%} "
            f"| {_seconds(r['ttft_s'])} | {base['ttft_s'] / r['ttft_s']:.2f}× "
            f"| {_rate(r['tokens_per_s'])} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}× "
            f"| {_rate(r['tokens_per_s_mean'])} "
            f"| {_size(r['rss_mb'] * 2**20)} | {r['rss_mb'] / base['rss_mb']:.0%} "
            f"| {r['load_s']:.1f} s |"
        )
    print()
    for name, b in built.items():
        how = (
            f"exported in {b['export_s']:.0f} s"
            if name == "fp32"
            else f"quantized in {b['quantize_s']:.0f} s"
        )
        print(f"build {name}: {how}, peak RSS {_size(b['rss_mb'] * 2**20)} ({b['when']})")
    print(f"fp32 session: prepacking {'on' if base['prepacking'] else 'off'}")
    for name, r in rows.items():
        logits = "last position only" if r.get("last_position_logits") else "every position"
        print(f"{name}: the prefill computes logits at {logits}")
    for name in rows:
        if name == "fp32":
            continue
        r = rows[name]
        same = sum(a == b for a, b in zip(r["tokens"], base["tokens"], strict=True))
        print(f"{name}: greedy tokens equal to fp32's {same}/{len(r['tokens'])} (random weights)")
    print()
    for name in ("int4", "int4-acc4"):
        if name not in rows:
            continue
        r = rows[name]
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        size = r["bytes"]
        scale = "" if full or args.tiny else f"; 34 layers: ~{_scaled(size, config):.2f} GB"
        print(
            f"goal ({name}): ≥ {GOAL_SPEEDUP:.0f}× fp32's tokens/s: "
            f"{'yes' if speedup >= GOAL_SPEEDUP else 'NO'} ({speedup:.2f}×); "
            f"≤ 3 GB on disk: {'yes' if size <= GOAL_BYTES else 'NO'} "
            f"({_size(size)}{scale})"
        )


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def _rate(r: float) -> str:
    return f"{r:.2f}" if r < 100 else f"{r:.0f}"


def _scaled(size: float, config: dict[str, Any]) -> float:
    """A size for fewer layers scaled to 34: per-layer part × 34/N, plus the LM head."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head = vocab * hidden * (0.5 + 4 / BLOCK_SIZE)  # int4 + one fp32 scale per block
    n = config["num_hidden_layers"]
    return (head + (size - head) * FULL["num_hidden_layers"] / n) / 1e9


if __name__ == "__main__":
    sys.exit(main())
