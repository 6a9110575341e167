"""What every part of the simulator shares: the findings, modalities, matrices, random
streams and UIDs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.uid import generate_uid

FINDINGS: tuple[str, ...] = ("pneumothorax", "lung_nodule")

Modality = Literal["CR", "DX", "CT"]
View = Literal["PA", "AP", "LL"]
Layout = Literal["flat", "nested"]
Photometric = Literal["MONOCHROME1", "MONOCHROME2"]

MANUFACTURER = "edge-triage simulator"
MAX_STORED = 4095  # BitsStored 12
RADIOGRAPH_MATRIX = (2048, 1664)
CT_MATRIX = (256, 256)
CT_SLICES = 48

_ASPECT = 2048 / 1664  # height of the patient frame, in units of its width
_MARGIN = 0.12  # canvas margin around the frame, units
_WORK_PX_PER_UNIT = 320.0  # working resolution cap
_F32 = np.float32


# --------------------------------------------------------------------------- small helpers


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _streams(rng: np.random.Generator, n: int) -> list[np.random.Generator]:
    """Independent child generators; the parent advances by the same amount every time."""
    return [np.random.default_rng(int(s)) for s in rng.integers(0, 2**63 - 1, size=n)]


def _uid(rng: np.random.Generator) -> str:
    """A UID under pydicom's root, deterministic for the generator's state."""
    return str(generate_uid(entropy_srcs=[rng.bytes(16).hex()]))


@dataclass(frozen=True)
class _Canvas:
    """The patient frame sampled at working resolution: x in [-m, 1+m], y in [-m, H+m]."""

    px_per_unit: float
    x: np.ndarray  # (1, W) unit coordinates of the columns
    y: np.ndarray  # (R, 1) unit coordinates of the rows

    @classmethod
    def make(cls, px_per_unit: float, height: float) -> _Canvas:
        w = round((1 + 2 * _MARGIN) * px_per_unit)
        h = round((height + 2 * _MARGIN) * px_per_unit)
        x = (np.arange(w, dtype=_F32) + 0.5) / px_per_unit - _MARGIN
        y = (np.arange(h, dtype=_F32) + 0.5) / px_per_unit - _MARGIN
        return cls(px_per_unit, x[None, :], y[:, None])

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape[0], self.x.shape[1]

    def rows(self, y0: float, y1: float) -> slice:
        p = self.px_per_unit
        return slice(
            max(0, int((y0 + _MARGIN) * p)), min(self.shape[0], int((y1 + _MARGIN) * p) + 2)
        )

    def cols(self, x0: float, x1: float) -> slice:
        p = self.px_per_unit
        return slice(
            max(0, int((x0 + _MARGIN) * p)), min(self.shape[1], int((x1 + _MARGIN) * p) + 2)
        )

    def disc(
        self, a: np.ndarray, cx: float, cy: float, r: float, amount: float
    ) -> tuple[slice, slice, np.ndarray]:
        """Adds a sphere's projection (path length profile) of radius ``r`` to ``a``; returns
        the block it touched and the profile (0..1) there."""
        rs, cs = self.rows(cy - r - 0.01, cy + r + 0.01), self.cols(cx - r - 0.01, cx + r + 0.01)
        d2 = ((self.x[:, cs] - cx) ** 2 + (self.y[rs] - cy) ** 2) / (r * r)
        prof = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
        a[rs, cs] += amount * prof
        return rs, cs, prof
