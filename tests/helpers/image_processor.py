"""The ``preprocessor_config.json`` a random checkpoint folder carries, as ``save_pretrained``
of the model's image processor writes it: the one copy for the tiny SigLIP and Gemma 3
checkpoints of the tests and the full-size one of the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_image_processor(
    folder: Path, image_size: int, image_processor_type: str, **extra: Any
) -> None:
    """``folder/preprocessor_config.json``: resize to ``image_size`` square, rescale to
    [0, 1], normalise with mean and std 0.5 (SigLIP's), plus ``extra`` keys."""
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": image_processor_type,
                **extra,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "size": {"height": image_size, "width": image_size},
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
            }
        )
    )
