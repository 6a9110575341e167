"""A full-size MedSigLIP-448 checkpoint folder with random weights, for benchmarks that need the
real model's cost through the export and the daemon (the real weights are gated).

    .venv/bin/python benchmarks/medsiglip_checkpoint.py --out /tmp/medsiglip-random

Writes what ``save_pretrained`` writes for ``transformers.SiglipModel``: both towers of SigLIP
so400m at 448 px (hidden 1152, MLP 4304, 27 layers, 16 heads, patch 14), the vision tower
exactly as MedSigLIP-448's; the text tower with a small SentencePiece vocabulary trained on
the findings' prompts (the tests' tokenizer: the text tower only embeds the prompts once at
export, so its vocabulary does not change what the daemon runs), and the image processor's
config. ``edge-export siglip --checkpoint`` reads the folder as it reads the real one.
``--tiny`` writes a small configuration of the same architecture in seconds (its test).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tokenizer helper

from encoder import FULL, TINY  # benchmarks/encoder.py: the one copy of the shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a small configuration, in seconds")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else FULL
    image_size = shape["image_size"]

    import torch
    from helpers.image_processor import write_image_processor
    from helpers.tiny_siglip import train_tokenizer
    from transformers import SiglipConfig, SiglipModel

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    text = {k: v for k, v in shape.items() if k not in ("patch_size", "image_size")}
    config = SiglipConfig(
        text_config={**text, "vocab_size": 64, "max_position_embeddings": 64, "eos_token_id": 1},
        vision_config=shape,
    )
    model = SiglipModel(config)
    with torch.no_grad():  # SigLIP's own init of the head: logit scale log(10), bias -10
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-10.0)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    train_tokenizer(args.out)
    write_image_processor(args.out, image_size, "SiglipImageProcessor")
    vision = sum(p.numel() for p in model.vision_model.parameters())
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{args.out}: SigLIP {'tiny' if args.tiny else 'so400m'} at {image_size} px, random "
        f"weights (seed {args.seed}); "
        f"vision tower {vision / 1e6:.0f} M parameters, both towers {total / 1e6:.0f} M; "
        f"written in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
