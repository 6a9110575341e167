"""The interface every runner implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    provider: str
    """The execution provider that actually runs the model (reported in results)."""

    def embed(self, images: np.ndarray) -> np.ndarray:
        """float32 (B, 3, N, N) preprocessed images -> float32 (B, D) normalised embeddings."""
        ...
