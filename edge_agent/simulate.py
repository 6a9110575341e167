"""Synthetic chest studies, written into a folder the way a modality writes them.

Three users: ``edge-agent simulate`` / ``edge-agent demo`` (feed the daemon), the export stage
(trains the demo model on these images) and the tests.

Images are drawn in a *patient frame* at a working resolution of at most 320 px per unit
(one unit = the width of a 14x17 inch detector field), as an attenuation map; the map is then
tone-mapped and warped once (zoom, a few degrees of rotation, shift) onto the output matrix,
and detector noise is added at full resolution. A 2048x1664 radiograph takes ~45 ms of one
CPU core.

Findings (``FINDINGS``), each independently present or not on the frontal view:

``pneumothorax``
    one lung is collapsed towards its medial base: a lucent apical/lateral crescent with no
    lung markings, bounded by a thin bright visceral pleural line.
``lung_nodule``
    one or two round soft-tissue opacities, 20-45 mm across (nodules and masses), inside a
    lung field.

Every random draw comes from ``numpy.random.Generator`` streams split off the caller's
generator, one stream per concern (anatomy, texture, findings, noise), so the same seed with
and without a finding gives the same patient: the images differ only where the finding is.

Files: each instance is written to ``.<SOPInstanceUID>.dcm.part`` in the target folder,
flushed and fsynced, then renamed with ``os.replace`` to ``<SOPInstanceUID>.dcm``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from . import __version__
from .fsutil import fsync_dir

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- frontal anatomy


@dataclass
class _Lung:
    """One lung field: the upper half of a superellipse standing on its base, apex shifted
    medially, cut from below by the diaphragm dome. ``u`` is the distance from the midline
    towards this lung's side, ``y`` runs down the patient."""

    side: int  # -1: patient right (image left), +1: patient left (image right)
    apex_y: float
    base_y: float  # level of the costophrenic angle
    medial: float
    lateral: float
    apex_shift: float
    dome_top: float
    dome_k: float
    hilum_y: float
    p: float = 2.4

    uc: float = field(init=False)  # centre, half width and height of the superellipse
    ax: float = field(init=False)
    ay: float = field(init=False)

    def __post_init__(self) -> None:
        for f in fields(self):  # plain floats: numpy scalars make the per-point checks slow
            if f.name != "side" and f.init:
                setattr(self, f.name, float(getattr(self, f.name)))
        self.uc = (self.medial + self.lateral) / 2
        self.ax = (self.lateral - self.medial) / 2
        self.ay = self.base_y - self.apex_y

    def _centre(self, y):
        t = np.clip((y - self.apex_y) / self.ay, 0.0, 1.0)
        return self.uc - self.apex_shift * (1.0 - t) ** 2

    def dome(self, u):
        return self.dome_top + self.dome_k * (u - self.uc) ** 2

    def metric(self, u, y):
        """< 1 inside the superellipse (the dome is not applied)."""
        du = np.abs(u - self._centre(y)) / self.ax
        dy = np.clip((self.base_y - y) / self.ay, 0.0, None)
        return du**self.p + dy * dy

    def inside_point(self, u: float, y: float, limit: float, above_dome: float) -> bool:
        """``metric(u, y) < limit`` and ``above_dome`` above the dome, for one point (fast,
        no numpy)."""
        uc, ay = self.uc, self.ay
        if y >= self.dome_top + self.dome_k * (u - uc) ** 2 - above_dome:
            return False
        t = (y - self.apex_y) / ay
        t = 0.0 if t < 0.0 else 1.0 if t > 1.0 else t
        du = abs(u - (uc - self.apex_shift * (1.0 - t) ** 2)) / self.ax
        dy = (self.base_y - y) / ay
        dy = dy if dy > 0.0 else 0.0
        return du**self.p + dy * dy < limit

    def shape(self, u, y, edge: float) -> tuple[np.ndarray, np.ndarray]:
        """Soft inside-ness (0..1, ramps ~``edge`` units wide) and relative depth (0..1)."""
        m = self.metric(u, y)
        inside = np.clip((1.0 - m) * (self.ax / (2.2 * edge)) + 0.5, 0.0, 1.0)
        inside *= np.clip((self.dome(u) - y) / edge + 0.5, 0.0, 1.0)
        depth = np.clip(1.0 - m, 0.0, 1.0) ** 0.3 * inside
        return inside, depth

    def lateral_edge(self, y: float) -> float:
        dy = min(1.0, max(0.0, (self.base_y - y) / self.ay))
        return float(self._centre(np.array(y))) + self.ax * (1.0 - dy * dy) ** (1.0 / self.p)

    def point_inside(self, rng: np.random.Generator, margin: float = 0.6) -> tuple[float, float]:
        """A point well inside the lung field (away from its edges and the diaphragm)."""
        for _ in range(500):
            u = self.uc + self.ax * rng.uniform(-0.8, 0.8)
            y = rng.uniform(self.apex_y + 0.08, self.base_y)
            if self.inside_point(u, y, margin, 0.05):
                return float(u), float(y)
        return self.uc, (self.apex_y + self.dome_top) / 2


@dataclass
class _Frontal:
    """Per-patient anatomy of a frontal chest radiograph, in patient-frame units."""

    view: str
    zoom: float
    angle_deg: float
    shift: tuple[float, float]
    frame_mm: float
    body_w: float
    c_body: float
    c_lung: float
    c_base: float
    lungs: tuple[_Lung, _Lung]
    heart: tuple[float, float, float, float, float]  # cx, cy, a, b, angle (rad)
    c_bone: float
    rib_top: float
    rib_step: float
    clavicle_y: float
    spine_phase: float
    gastric_bubble: bool
    exposure: tuple[float, float, float]  # air level, gain, gamma
    noise: float
    marker: bool

    @classmethod
    def draw(cls, rng: np.random.Generator, view: str) -> _Frontal:
        ap = view == "AP"
        apex = rng.uniform(0.12, 0.15) + (0.02 if ap else 0.0)
        base = rng.uniform(0.86, 0.91) - (0.05 if ap else 0.0)
        lateral = rng.uniform(0.37, 0.40)
        dome_r = base - rng.uniform(0.05, 0.08)
        lungs = tuple(
            _Lung(
                side=side,
                apex_y=apex + rng.normal(0, 0.004),
                base_y=base + (0.02 if side > 0 else 0.0) + rng.normal(0, 0.004),
                medial=rng.uniform(0.035, 0.05),
                lateral=lateral + rng.normal(0, 0.004) - (0.005 if side > 0 else 0.0),
                apex_shift=rng.uniform(0.02, 0.05),
                dome_top=dome_r + (rng.uniform(0.015, 0.04) if side > 0 else 0.0),
                dome_k=rng.uniform(2.0, 2.8),
                hilum_y=apex + (base - apex) * rng.uniform(0.38, 0.45),
            )
            for side in (-1, 1)
        )
        hs = 1.1 if ap else 1.0
        return cls(
            view=view,
            zoom=rng.uniform(0.93, 1.05),
            angle_deg=float(np.clip(rng.normal(0, 1.5), -4, 4)),
            shift=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
            frame_mm=rng.uniform(290, 340),
            body_w=lateral + rng.uniform(0.04, 0.07),
            c_body=rng.uniform(0.9, 1.0),
            c_lung=rng.uniform(0.42, 0.5),
            c_base=rng.uniform(0.0, 0.25),
            lungs=lungs,  # type: ignore[arg-type]
            heart=(
                0.5 + rng.uniform(0.045, 0.07),
                dome_r - rng.uniform(0.07, 0.1),
                rng.uniform(0.16, 0.19) * hs,
                rng.uniform(0.12, 0.14) * hs,
                math.radians(rng.uniform(15, 30)),
            ),
            c_bone=rng.uniform(0.8, 1.2),
            rib_top=apex + rng.uniform(0.0, 0.02),
            rib_step=(base - apex) * rng.uniform(0.095, 0.105),
            clavicle_y=apex + rng.uniform(0.05, 0.07) - (0.03 if ap else 0.0),
            spine_phase=rng.uniform(0, 1),
            gastric_bubble=bool(rng.random() < 0.7),
            exposure=(rng.uniform(150, 450), rng.uniform(2300, 2800), rng.uniform(0.9, 1.15)),
            noise=rng.uniform(12, 32),
            marker=bool(rng.random() < 0.7),
        )

    def behind_heart(self, x: float, y: float, scale: float = 1.0) -> bool:
        """Whether (x, y) lies within the heart's ellipse grown by ``scale``."""
        hx, hy, ha, hb, hang = self.heart
        ca, sa = math.cos(hang), math.sin(hang)
        a = ((x - hx) * ca + (y - hy) * sa) / (ha * scale)
        b = (-(x - hx) * sa + (y - hy) * ca) / (hb * scale)
        return a * a + b * b < 1.0


@dataclass
class _FindingDraws:
    """Parameters of every finding, drawn whether or not the finding is present, so that
    one seed gives the same patient with and without it."""

    ptx_side: int
    ptx_k: float  # scale of the collapsed lung; 1 - k is the size of the pneumothorax
    ptx_anchor: float  # the level the lung collapses towards (relative, apex 0, base 1)
    ptx_dark: float  # extra lucency of the pleural air
    ptx_line: float
    nodules: list[tuple[int, float, float, float, float]]  # side, u, y, diameter_mm, contrast

    @classmethod
    def draw(cls, rng: np.random.Generator, anatomy: _Frontal) -> _FindingDraws:
        ptx_side = int(rng.choice([-1, 1]))
        n_nod = 1 + int(rng.random() < 0.3)
        nodules = []
        for _ in range(2):
            side = int(rng.choice([-1, 1]))
            lung = anatomy.lungs[0 if side < 0 else 1]
            for _try in range(20):  # in the lung field, clear of the heart and mediastinum
                u, y = lung.point_inside(rng)
                if u > 0.11 and not anatomy.behind_heart(0.5 + side * u, y, 1.25):
                    break
            # 20-45 mm: nodules and masses big enough for the one-minute demo model to learn
            diameter = 20.0 + 25.0 * rng.random() ** 0.5
            contrast = rng.uniform(0.8, 1.0)
            nodules.append((side, u, y, diameter, contrast))
        return cls(
            ptx_side=ptx_side,
            ptx_k=rng.uniform(0.6, 0.86),
            ptx_anchor=rng.uniform(0.6, 0.95),
            ptx_dark=rng.uniform(0.08, 0.15),
            ptx_line=rng.uniform(0.05, 0.09),
            nodules=nodules[:n_nod],
        )


@dataclass
class ChestRendering:
    """A synthetic radiograph and where its structures are (masks in output pixels)."""

    image: np.ndarray  # uint16 stored values, MONOCHROME2 sense
    pixel_spacing_mm: float
    lung_mask: np.ndarray | None = None  # bool
    pneumothorax_mask: np.ndarray | None = None  # bool, all False when absent
    nodule_mask: np.ndarray | None = None  # bool, all False when absent


_MAX_VESSEL_SEGMENTS = 1200


def _vessel_tree(
    rng: np.random.Generator, lung: _Lung, hub: tuple[float, float], min_width: float
) -> np.ndarray:
    """Lung markings: a branching tree of pulmonary vessels growing out of the hilum ``hub``
    and tapering until they vanish near the periphery. Rows (u0, y0, u1, y1, width) in lung
    coordinates."""
    # Random numbers drawn up front, one row per grown segment: the loop stays cheap.
    n = _MAX_VESSEL_SEGMENTS * 2
    jitter = (rng.standard_normal(n) * 0.2).tolist()
    stretch = rng.uniform(0.6, 1.4, n).tolist()
    fork = (rng.random(n) < 0.45).tolist()
    spread = rng.uniform(0.35, 0.7, n).tolist()
    share = rng.uniform(0.4, 0.6, n).tolist()
    angles = np.radians(np.linspace(-120, 115, 16) + rng.normal(0, 5, 16)).tolist()
    widths = rng.uniform(0.007, 0.011, 16).tolist()
    hu, hy = float(hub[0]), float(hub[1])
    # Breadth first, so that every trunk grows before the segment budget runs out.
    stack = deque((hu, hy + 0.1 * math.sin(a), a, w) for a, w in zip(angles, widths, strict=True))
    segments: list[tuple[float, float, float, float, float]] = []
    i = 0
    while stack and len(segments) < _MAX_VESSEL_SEGMENTS and i < n:
        u0, y0, angle, width = stack.popleft()
        # Wander, but keep heading away from the hilum: vessels run outwards, not in loops.
        radial = math.atan2(y0 - hy, u0 - hu)
        drift = math.remainder(radial - angle, math.tau)
        angle += jitter[i] + 0.15 * drift
        length = 0.008 + 1.6 * width * stretch[i]
        u1, y1 = u0 + length * math.cos(angle), y0 + length * math.sin(angle)
        if lung.inside_point(u1, y1, 0.95, 0.01):
            segments.append((u0, y0, u1, y1, width))
            if width >= min_width:
                if fork[i]:
                    a, b = spread[i] * share[i], spread[i] * (1.0 - share[i])
                    stack.append((u1, y1, angle - a, width * 0.8))
                    stack.append((u1, y1, angle + b, width * 0.72))
                else:
                    stack.append((u1, y1, angle, width * 0.96))
        i += 1
    return np.array(segments, dtype=np.float64).reshape(-1, 5)


def _draw_vessels(cv: _Canvas, segments: np.ndarray, side: int, rs: slice, cs: slice):
    """Renders vessel segments into the block (rs, cs) of the canvas: 0..1, blurred. Wider
    vessels are denser (a longer path through blood)."""
    p, shift = cv.px_per_unit, 3  # cv2 drawing with 3 fractional bits
    img = np.zeros((rs.stop - rs.start, cs.stop - cs.start), np.uint8)
    px = ((0.5 + side * segments[:, [0, 2]] + _MARGIN) * p - 0.5 - cs.start) * (1 << shift)
    py = ((segments[:, [1, 3]] + _MARGIN) * p - 0.5 - rs.start) * (1 << shift)
    pts = np.stack([px, py], axis=-1).round().astype(np.int32)  # (n, 2 ends, xy)
    width = segments[:, 4]
    shade = (255 * np.minimum(1.0, 0.3 + width / 0.012 * 0.7) / 16).round() * 16
    thick = np.maximum(1, np.round(width * p)).astype(int)
    for t in np.unique(thick).tolist():
        for sh in np.unique(shade[thick == t]).tolist():
            group = pts[(thick == t) & (shade == sh)]
            cv2.polylines(img, list(group), False, min(255, int(sh)), t, cv2.LINE_AA, shift)
    out = img.astype(_F32) * (1.0 / 255.0)
    return cv2.GaussianBlur(out, (0, 0), 0.7)


def _frontal_attenuation(
    cv: _Canvas,
    an: _Frontal,
    fd: _FindingDraws,
    findings: Mapping[str, bool],
    tex_rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x, y, p = cv.x, cv.y, cv.px_per_unit
    u = x - 0.5
    edge = 1.0 / p  # ~1 working pixel ramps

    # Body: soft tissue, thicker in the middle; neck, shoulders and arms at the top.
    bw = an.body_w
    hw = np.interp(
        y[:, 0],
        [-0.2, 0.0, 0.05, 0.1, 0.16, 0.25, 0.5, 1.0, 1.5],
        [0.07, 0.075, 0.12, 0.34, bw + 0.05, bw + 0.03, bw, bw + 0.01, bw - 0.01],
    )[:, None].astype(_F32)
    thick = np.interp(y[:, 0], [-0.2, 0.05, 0.15, 1.5], [0.6, 0.65, 1.0, 1.0])[:, None]
    body = np.sqrt(np.clip(1.0 - (u / hw) ** 2, 0.0, 1.0)) ** 0.5 * thick.astype(_F32)
    att = an.c_body * body

    ptx_on = bool(findings.get("pneumothorax", False))
    lung_in = np.zeros(cv.shape, _F32)
    ptx = np.zeros(cv.shape, _F32)
    masks: dict[str, np.ndarray] = {}

    # Heart and upper mediastinum displace the lungs (their borders are the lungs' borders).
    hx, hy, ha, hb, hang = an.heart
    ca, sa = math.cos(hang), math.sin(hang)
    hd = (((x - hx) * ca + (y - hy) * sa) / ha) ** 2 + ((-(x - hx) * sa + (y - hy) * ca) / hb) ** 2
    heart = np.clip((1.0 - hd) * (hb / (2 * edge)) + 0.5, 0.0, 1.0)
    h_top = hy - hb
    med_w = np.interp(y[:, 0], [0.0, 0.3, h_top, h_top + 0.08], [0.05, 0.06, 0.08, 0.12])[:, None]
    med_off = np.interp(y[:, 0], [0.0, 0.3, h_top, h_top + 0.08], [0.0, 0.01, 0.03, 0.05])[:, None]
    mediast = np.clip((med_w.astype(_F32) - np.abs(u - med_off.astype(_F32))) / edge, 0.0, 1.0)
    knob = np.exp(-(((u - 0.07) / 0.035) ** 2 + ((y - (hy - hb - 0.09)) / 0.035) ** 2))
    mediast = np.maximum(mediast, np.clip(knob * 2.0 - 0.5, 0.0, 1.0))
    soft = np.maximum(heart, mediast)

    for lung in an.lungs:
        # Work inside the lung's bounding box only.
        lo, hi = lung.medial - 0.02, lung.lateral + 0.02
        cs = cv.cols(0.5 + lo, 0.5 + hi) if lung.side > 0 else cv.cols(0.5 - hi, 0.5 - lo)
        rs = cv.rows(lung.apex_y - 0.02, lung.dome(lung.lateral) + 0.02)
        ul, yl = lung.side * u[:, cs], y[rs]
        inside, depth = lung.shape(ul, yl, edge)
        hub = (lung.medial + 0.05, lung.hilum_y)
        tree = _vessel_tree(tex_rng, lung, hub, max(0.0018, 0.35 / p))
        marks = _draw_vessels(cv, tree, lung.side, rs, cs)
        marks += 0.8 * np.exp(-(((ul - hub[0]) / 0.03) ** 2 + ((yl - hub[1]) / 0.07) ** 2))
        keep = 1.0 - 0.85 * soft[rs, cs]
        # Lungs are thinner at the apex; soft tissue (pectorals, breasts) greys the bases.
        depth *= 0.65 + 0.35 * _smoothstep(lung.apex_y, lung.apex_y + 0.3, yl)
        depth -= an.c_base * _smoothstep(lung.base_y - 0.35, lung.base_y, yl) * inside
        lung_att = an.c_lung * depth * keep
        marks_att = 0.17 * marks * inside * keep

        if ptx_on and lung.side == fd.ptx_side:
            # The lung collapses towards its medial edge (sideways) and towards a level near
            # its base (vertically), leaving an apical and lateral crescent of pleural air:
            # darker than lung and without markings. The collapsed lung keeps its markings
            # and is a little denser; its edge, the visceral pleura, is a thin white line.
            k, au, ay = fd.ptx_k, lung.medial, lung.apex_y + fd.ptx_anchor * lung.ay
            col_in, _ = lung.shape((ul - au) / k + au, (yl - ay) / k + ay, edge / k)
            lateral = _smoothstep(lung.medial + 0.01, lung.medial + 0.05, ul)
            gap = np.clip(inside - col_in, 0.0, 1.0) * lateral
            marks_att *= 1.0 - gap
            lung_att += (fd.ptx_dark * gap - 0.1 * (1.0 - k) * col_in) * keep
            near = cv2.GaussianBlur(gap, (0, 0), 3.0)
            line = 4.0 * col_in * (1.0 - col_in) * inside * np.clip(near * 8.0, 0.0, 1.0)
            marks_att += fd.ptx_line * line * keep * lateral
            ptx[rs, cs] = gap
        att[rs, cs] += marks_att - lung_att
        lung_in[rs, cs] = np.maximum(lung_in[rs, cs], inside)

    # Airways: trachea and main bronchi (air columns over the mediastinum).
    carina = an.lungs[0].hilum_y - 0.06
    rs = cv.rows(-_MARGIN, carina + 0.05)
    tr = np.exp(-(((u - 0.005) / 0.016) ** 2)) * (1.0 - _smoothstep(carina - 0.02, carina, y[rs]))
    att[rs] -= 0.09 * tr
    for bx, by in ((-0.07, 0.07), (0.08, 0.09)):
        t = np.clip((u * bx + (y - carina) * by) / (bx * bx + by * by), 0.0, 1.0)
        dist2 = (u - t * bx) ** 2 + (y - carina - t * by) ** 2
        att -= 0.06 * np.exp(-dist2 / 0.011**2)

    # Gastric bubble under the left dome.
    if an.gastric_bubble:
        left = an.lungs[1]
        gy = left.dome_top + 0.075
        bub = np.exp(-(((u - 0.17) / 0.05) ** 2 + ((y - gy) / 0.035) ** 2))
        att -= 0.1 * bub * (1.0 - _smoothstep(gy + 0.005, gy + 0.01, y))  # air-fluid level

    _bones(cv, an, att)

    for side, nu, ny, diameter, contrast in fd.nodules if findings.get("lung_nodule") else []:
        if ptx_on and side == fd.ptx_side:  # the nodule moves with its collapsed lung
            lung = an.lungs[0 if side < 0 else 1]
            au, ay = lung.medial, lung.apex_y + fd.ptx_anchor * lung.ay
            nu, ny = au + fd.ptx_k * (nu - au), ay + fd.ptx_k * (ny - ay)
        radius = diameter / 2.0 / an.frame_mm
        amount = contrast * (0.42 + 0.18 * min(diameter, 30.0) / 30.0)
        cx = 0.5 + side * nu
        rs, cs, prof = cv.disc(att, cx, ny, radius, amount)
        nod = masks.setdefault("nodule", np.zeros(cv.shape, _F32))
        nod[rs, cs] = np.maximum(nod[rs, cs], (prof > 0.2).astype(_F32))

    masks["lung"] = lung_in
    if ptx_on:
        masks["pneumothorax"] = ptx
    return np.maximum(att, 0.0), masks


def _band(cv: _Canvas, att, side, lo, hi, origin, yc_of, slope_of, half, amount, fade_in=0.03):
    """Adds a bone band (rib or clavicle) whose centre line is ``yc_of(|u - origin|)`` for
    ``lo <= u <= hi``, with bright cortical margins."""
    cs = (
        cv.cols(0.5 + lo - 0.02, 0.5 + hi + 0.02)
        if side > 0
        else cv.cols(0.5 - hi - 0.02, 0.5 - lo + 0.02)
    )
    ul = side * (cv.x[:, cs] - 0.5)
    t = np.abs(ul - origin)
    ycen = yc_of(t)
    rs = cv.rows(float(ycen.min()) - 2 * half, float(ycen.max()) + 2 * half)
    dist = (cv.y[rs] - ycen) / (half * np.sqrt(1.0 + slope_of(t) ** 2))
    d2 = dist * dist
    prof = np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)) * (0.5 + 0.5 * d2)
    ends = _smoothstep(lo - 0.005, lo + fade_in, ul) * (
        1.0 - _smoothstep(hi - 0.015, hi + 0.005, ul)
    )
    att[rs, cs] += amount * prof * ends


def _bones(cv: _Canvas, an: _Frontal, att: np.ndarray) -> None:
    """Spine, ribs and clavicles, added to ``att`` in place."""
    u, y = cv.x - 0.5, cv.y
    cb = an.c_bone

    # Thoracic spine: faint behind the mediastinum; vertebral bodies, discs, pedicles.
    cs = cv.cols(0.44, 0.56)
    us = u[:, cs]
    col = np.sqrt(np.clip(1.0 - (us / 0.042) ** 2, 0.0, 1.0))
    phase = np.mod(y / (an.rib_step * 0.95) + an.spine_phase, 1.0)
    discs = 1.0 - 0.4 * np.exp(-(((phase - 0.5) / 0.08) ** 2))
    pedicles = np.exp(-(((np.abs(us) - 0.028) / 0.008) ** 2 + ((phase - 0.25) / 0.1) ** 2))
    fade = _smoothstep(-0.1, 0.1, y)
    att[:, cs] += cb * fade * (0.05 * col * discs + 0.015 * pedicles)

    for side in (-1, 1):
        lung = an.lungs[0 if side < 0 else 1]
        for k in range(11):
            y0 = an.rib_top + k * an.rib_step
            if y0 > lung.dome_top + 0.1:
                break
            u0 = 0.03
            u_end = max(lung.lateral_edge(y0 + 0.08) + 0.02, 0.1 + 0.03 * k)
            span = u_end - u0
            drop = 0.13 - 0.006 * k
            a2 = (drop + 0.1 * span) / (span * span)
            _band(
                cv,
                att,
                side,
                u0,
                u_end,
                u0,
                lambda t, y0=y0, a2=a2: y0 - 0.1 * t + a2 * t * t,
                lambda t, a2=a2: -0.1 + 2 * a2 * t,
                0.012,
                cb * 0.12,
                fade_in=0.08,
            )
            if k < 7:  # anterior arc, from the lateral wall down towards the sternum
                y_end = y0 + drop
                _band(
                    cv,
                    att,
                    side,
                    0.12,
                    u_end,
                    u_end,
                    lambda t, y_end=y_end: y_end + 0.45 * t + 0.35 * t * t,
                    lambda t: -(0.45 + 0.7 * t),
                    0.014,
                    cb * 0.06,
                )

        # Clavicle: S-shaped, from the sternal notch up and out to the acromion.
        cy = an.clavicle_y
        _band(
            cv,
            att,
            side,
            0.02,
            0.34,
            0.02,
            lambda t, cy=cy: cy - 0.2 * t + 0.012 * np.sin(2 * np.pi * t / 0.32),
            lambda t: -0.2 + 0.012 * 2 * np.pi / 0.32 * np.cos(2 * np.pi * t / 0.32),
            0.017,
            cb * 0.22,
        )


def _lateral_attenuation(
    cv: _Canvas,
    an: _Frontal,
    fd: _FindingDraws,
    findings: Mapping[str, bool],
    tex_rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A simpler left lateral (LL): anterior on the image left, spine on the right."""
    x, y, p = cv.x, cv.y, cv.px_per_unit
    front = np.interp(y[:, 0], [-0.2, 0.1, 0.3, 1.0, 1.5], [0.35, 0.25, 0.13, 0.1, 0.12])[:, None]
    back = np.interp(y[:, 0], [-0.2, 0.1, 0.3, 1.0, 1.5], [0.7, 0.8, 0.84, 0.85, 0.84])[:, None]
    mid, half = (front + back) / 2, (back - front) / 2
    body = np.sqrt(np.clip(1.0 - ((x - mid) / half) ** 2, 0.0, 1.0)).astype(_F32) ** 0.4
    att = an.c_body * 1.15 * body
    lung = an.lungs[0]
    # Both lungs superimposed: behind the sternum, in front of the spine.
    sil = _Lung(
        side=1,
        apex_y=lung.apex_y,
        base_y=lung.base_y + 0.06,
        medial=-0.3,
        lateral=0.25,
        apex_shift=-0.08,
        dome_top=lung.dome_top - 0.04,
        dome_k=1.2,
        hilum_y=lung.hilum_y,
    )
    inside, depth = sil.shape(x - 0.5, y, 1.0 / p)
    hx, hy = 0.36, lung.dome_top - 0.1
    heart = np.clip((1.0 - ((x - hx) / 0.17) ** 2 - ((y - hy) / 0.17) ** 2) * 3, 0.0, 1.0)
    all_rows, all_cols = slice(0, cv.shape[0]), slice(0, cv.shape[1])
    marks = _draw_vessels(
        cv,
        _vessel_tree(tex_rng, sil, (0.02, lung.hilum_y), max(0.0018, 0.35 / p)),
        1,
        all_rows,
        all_cols,
    )
    keep = 1.0 - 0.6 * heart
    att += (0.1 * marks * inside - an.c_lung * 1.1 * depth) * keep
    # Spine: vertebral bodies with discs, posterior.
    phase = np.mod(y / (an.rib_step * 0.95) + an.spine_phase, 1.0)
    spine = np.exp(-(((x - 0.74) / 0.04) ** 6)) * (
        1.0 - 0.5 * np.exp(-(((phase - 0.5) / 0.08) ** 2))
    )
    att += an.c_bone * 0.16 * spine * _smoothstep(-0.1, 0.1, y)
    # Sternum, anterior.
    sternum = np.exp(-(((x - front - 0.03) / 0.012) ** 2))
    att += (
        an.c_bone * 0.12 * sternum * _smoothstep(0.15, 0.2, y) * (1.0 - _smoothstep(0.6, 0.65, y))
    )
    if findings.get("lung_nodule"):
        for _, _nu, ny, diameter, contrast in fd.nodules:
            cv.disc(
                att,
                0.35 + 0.3 * ((ny * 7.0) % 1.0),
                ny,
                diameter / 2 / an.frame_mm,
                contrast * 0.18,
            )
    return np.maximum(att, 0.0), {"lung": inside}


def _warp_matrix(an: _Frontal, cv: _Canvas, rows: int, cols: int) -> tuple[np.ndarray, float]:
    """2x3 matrix mapping output pixels to canvas pixels, and output pixels per unit."""
    s = min(cols, rows / _ASPECT)
    cxo, cyo = (cols - 1) / 2, (rows - 1) / 2
    c = np.array([0.5, _ASPECT / 2])
    th = math.radians(an.angle_deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    # frame = (out - centre_out) / s + c ; patient = rot @ (frame - c) / zoom + c - shift
    lin = rot / (s * an.zoom)
    off = -lin @ np.array([cxo, cyo]) + c - np.array(an.shift)
    p = cv.px_per_unit
    m = np.hstack([lin * p, ((off + _MARGIN) * p - 0.5)[:, None]])
    return m, s * an.zoom


def _detector_noise(rng: np.random.Generator, rows: int, cols: int, sigma: float) -> np.ndarray:
    """Zero-mean int16 detector noise of about ``sigma``; spatially correlated over ~2 px
    for large matrices (drawn at half resolution), like a real detector's."""
    big = rows * cols > 512 * 512
    h, w = ((rows + 1) // 2, (cols + 1) // 2) if big else (rows, cols)
    # A sum of two uniform bytes is triangular: mean 255, sd 104.5; cheap and smooth enough.
    raw = np.frombuffer(rng.bytes(2 * h * w), np.uint8).reshape(2, h, w)
    tri = cv2.add(raw[0], raw[1], dtype=cv2.CV_16S)
    gain = sigma / 104.5 * (1.6 if big else 1.0)  # bilinear 2x upsampling keeps ~0.62 sd
    small = ((tri.astype(_F32) - 255.0) * gain).astype(np.int16)
    if not big:
        return small
    return cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)


def _marker(img: np.ndarray, s_out: float) -> None:
    """A lead "R" marker at the patient's right shoulder (image top left)."""
    rows, cols = img.shape
    scale = s_out / 700.0
    x0 = int(cols / 2 - 0.43 * s_out)
    y0 = int(rows / 2 - 0.5 * _ASPECT * s_out + 0.03 * s_out)
    size = max(8, int(0.06 * s_out))
    roi = img[max(0, y0) : y0 + size, max(0, x0) : x0 + size]
    if roi.size == 0:
        return
    text = np.zeros(roi.shape, np.uint8)
    cv2.putText(
        text,
        "R",
        (0, roi.shape[0] - 1),
        cv2.FONT_HERSHEY_SIMPLEX,
        scale,
        255,
        max(1, int(3 * scale)),
        cv2.LINE_AA,
    )
    np.maximum(roi, (text.astype(_F32) * (3950.0 / 255.0)).astype(img.dtype), out=roi)


def render_chest(
    rng: np.random.Generator,
    *,
    rows: int,
    cols: int,
    findings: Mapping[str, bool],
    view: View = "PA",
    masks: bool = False,
) -> ChestRendering:
    """A synthetic chest radiograph (PA, AP or LL) with the given findings.

    ``masks`` also returns where the lungs and the findings are, in output pixels.
    """
    if view not in ("PA", "AP", "LL"):
        raise ValueError(f"view must be PA, AP or LL, not {view!r}")
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ValueError(f"unknown finding codes: {sorted(unknown)}")
    anat_rng, tex_rng, find_rng, noise_rng = _streams(rng, 4)
    an = _Frontal.draw(anat_rng, "AP" if view == "AP" else "PA")
    fd = _FindingDraws.draw(find_rng, an)
    s_out = min(cols, rows / _ASPECT)
    cv = _Canvas.make(min(s_out, _WORK_PX_PER_UNIT), _ASPECT)
    if view == "LL":
        att, canvas_masks = _lateral_attenuation(cv, an, fd, findings, tex_rng)
    else:
        att, canvas_masks = _frontal_attenuation(cv, an, fd, findings, tex_rng)

    lo, gain, gamma = an.exposure
    stored = lo + gain * np.power(att, gamma)
    # Heel effect / processing: a faint vertical gradient.
    stored *= 1.0 + 0.04 * (cv.y - _ASPECT / 2) / _ASPECT
    m, px_per_unit = _warp_matrix(an, cv, rows, cols)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    canvas16 = np.clip(stored, 0, MAX_STORED).astype(np.uint16)
    img = cv2.warpAffine(canvas16, m, (cols, rows), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    img = cv2.add(img.view(np.int16), _detector_noise(noise_rng, rows, cols, an.noise))
    if an.marker and view != "LL":
        _marker(img, s_out)
    np.clip(img, 0, MAX_STORED, out=img)
    out = ChestRendering(image=img.view(np.uint16), pixel_spacing_mm=an.frame_mm / px_per_unit)
    if masks:

        def warp(a: np.ndarray) -> np.ndarray:
            w = cv2.warpAffine(
                a.astype(_F32),
                m,
                (cols, rows),
                flags=flags,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0.0,
            )
            return w > 0.5

        empty = np.zeros((rows, cols), bool)
        out.lung_mask = warp(canvas_masks["lung"])
        out.pneumothorax_mask = (
            warp(canvas_masks["pneumothorax"]) if "pneumothorax" in canvas_masks else empty
        )
        out.nodule_mask = warp(canvas_masks["nodule"]) if "nodule" in canvas_masks else empty
    return out


def synth_chest(
    rng: np.random.Generator,
    *,
    rows: int,
    cols: int,
    findings: Mapping[str, bool],
    view: View = "PA",
) -> np.ndarray:
    """A synthetic chest radiograph: uint16 stored values 0..4095, MONOCHROME2 sense."""
    return render_chest(rng, rows=rows, cols=cols, findings=findings, view=view).image


# --------------------------------------------------------------------------- CT volume


def synth_ct_volume(
    rng: np.random.Generator,
    *,
    slices: int = CT_SLICES,
    rows: int = CT_MATRIX[0],
    cols: int = CT_MATRIX[1],
    findings: Mapping[str, bool],
    pixel_spacing_mm: float = 1.4,
    slice_thickness_mm: float = 5.0,
) -> np.ndarray:
    """An axial chest CT in Hounsfield units, int16 of shape (slices, rows, cols), from the
    lung apices (slice 0) down to the upper abdomen. Only ``lung_nodule`` is simulated
    (1-2 solid spheres of ~+30 HU, 6-25 mm, spanning a few slices)."""
    anat_rng, find_rng, noise_rng = _streams(rng, 3)
    ps, dz = pixel_spacing_mm, slice_thickness_mm
    xs = ((np.arange(cols, dtype=_F32) - (cols - 1) / 2) * ps)[None, :]  # mm, + = patient left
    ys = ((np.arange(rows, dtype=_F32) - (rows - 1) / 2) * ps)[:, None]  # mm, + = posterior
    body_a, body_b = anat_rng.uniform(145, 175), anat_rng.uniform(100, 120)
    fat = anat_rng.uniform(8, 25)
    lung_x, lung_y = anat_rng.uniform(65, 80), anat_rng.uniform(0, 10)
    lung_a, lung_b = anat_rng.uniform(50, 60), anat_rng.uniform(70, 85)
    dome = anat_rng.uniform(0.68, 0.75)
    ribs_phase = anat_rng.uniform(0, 2 * np.pi)
    sigma = anat_rng.uniform(8, 18)
    depth_mm = slices * dz

    def lung_metric(side: int, x: np.ndarray, y: np.ndarray, h: float) -> np.ndarray:
        grow = 0.35 + 0.65 * math.sin(math.pi / 2 * min(1.0, h / 0.6)) if h > 0.02 else 0.0
        if grow <= 0:
            return np.full(np.broadcast_shapes(x.shape, y.shape), 9.0, _F32)
        cx = side * lung_x * (0.75 + 0.25 * grow)
        return ((x - cx) / (lung_a * grow)) ** 2 + ((y - lung_y) / (lung_b * grow)) ** 2

    def dome_h(side: int, m: np.ndarray) -> np.ndarray:
        return dome - (0.03 if side < 0 else 0.0) + 0.22 * np.clip(m, 0, 1)

    # Nodules (always drawn, so a seed gives the same patient with or without them).
    nodules = []
    for _ in range(1 + int(find_rng.random() < 0.3)):
        side = int(find_rng.choice([-1, 1]))
        for _try in range(200):
            h = find_rng.uniform(0.15, 0.65)
            x = side * lung_x + find_rng.uniform(-0.7, 0.7) * lung_a
            y = lung_y + find_rng.uniform(-0.7, 0.7) * lung_b
            mn = float(lung_metric(side, np.array(x), np.array(y), h))
            if mn < 0.45 and h < float(dome_h(side, np.array(mn))) - 0.08:
                break
        nodules.append((x, y, h * depth_mm, find_rng.uniform(6, 25)))

    vol = np.empty((slices, rows, cols), np.int16)
    for i in range(slices):
        h = (i + 0.5) / slices
        z = h * depth_mm
        shoulders = 1.0 + 0.12 * (1.0 - _smoothstep(0.0, 0.15, np.array(h)))
        rb = ((xs / (body_a * shoulders)) ** 2 + (ys / body_b) ** 2).astype(_F32)
        inner = (xs / (body_a * shoulders - fat)) ** 2 + (ys / (body_b - fat)) ** 2
        hu = np.full((rows, cols), -1000.0, _F32)
        hu[rb < 1] = -100.0  # subcutaneous fat
        hu[inner < 1] = 40.0  # muscle, mediastinum, abdomen
        lung_any = np.zeros((rows, cols), bool)
        for side in (-1, 1):
            m = lung_metric(side, xs, ys, h)
            inside = (m < 1) & (h < dome_h(side, m))
            # The mediastinum and the heart push the medial lung away.
            inside &= np.abs(xs - 10) > 28 + 25 * float(_smoothstep(0.35, 0.6, np.array(h)))
            lung_any |= inside
        hu[lung_any] = -860.0
        if 0.4 < h < 0.78:  # heart, anterior and to the left
            heart = ((xs - 25) / 62) ** 2 + ((ys + 20) / 52) ** 2 < 1.0 - ((h - 0.6) / 0.2) ** 2
            hu[heart] = 40.0
        for cx, cy, r, h0, h1 in ((12, -20, 15, 0.25, 0.45), (22, 45, 12, 0.22, 1.0)):
            if h0 < h < h1:  # ascending and descending aorta
                hu[((xs - cx) ** 2 + (ys - cy) ** 2) < r * r] = 45.0
        if h < 0.4:  # trachea
            hu[((xs + 2) ** 2 + (ys + 15) ** 2) < 9.0**2] = -990.0
        # Spine: vertebral body (cortex + cancellous), canal, posterior elements.
        vb = (xs**2 + (ys - 68) ** 2) / 19.0**2
        hu[vb < 1] = 650.0
        hu[vb < 0.7] = 230.0
        canal = (xs**2 + (ys - 98) ** 2) < 8.0**2
        post = ((xs**2 + (ys - 98) ** 2) < 16.0**2) & ~canal & (ys > 92)
        hu[post] = 500.0
        hu[canal] = 20.0
        # Ribs: cross-sections along the inside of the chest wall, turning with height.
        if 0.05 < h < 0.9:
            for k in range(16):
                th = ribs_phase + k * 2 * np.pi / 16 + 0.6 * h
                if abs(math.sin(th)) > 0.92 and math.sin(th) < 0:
                    continue  # no ribs at the sternum
                rx = (body_a * shoulders - fat - 6) * math.cos(th)
                ry = (body_b - fat - 6) * math.sin(th)
                hu[((xs - rx) / 7.0) ** 2 + ((ys - ry) / 5.0) ** 2 < 1] = 600.0
        # Lung vessels: small dots, denser towards the hila.
        n_v = 40
        vx = anat_rng.normal(0, 45, n_v)
        vy = anat_rng.normal(10, 40, n_v)
        vr = anat_rng.uniform(1.0, 3.0, n_v)
        vc = np.rint(vx / ps + (cols - 1) / 2).astype(int).tolist()
        vrow = np.rint(vy / ps + (rows - 1) / 2).astype(int).tolist()
        vrad = np.maximum(1, np.rint(vr / ps)).astype(int).tolist()
        for c, rr, rad in zip(vc, vrow, vrad, strict=True):
            if 0 <= rr < rows and 0 <= c < cols and lung_any[rr, c]:
                cv2.circle(hu, (c, rr), rad, 20.0, -1, cv2.LINE_AA)
        if findings.get("lung_nodule"):
            for nx, ny, nz, d in nodules:
                r_mm = d / 2
                dzc = abs(z - nz)
                if dzc >= r_mm + dz / 2:
                    continue
                r_slice = math.sqrt(max(r_mm * r_mm - min(dzc, r_mm) ** 2, (0.3 * r_mm) ** 2))
                share = min(1.0, (r_mm + dz / 2 - dzc) / dz)  # partial volume at the ends
                dist = np.sqrt((xs - nx) ** 2 + (ys - ny) ** 2)
                cover = np.clip((r_slice - dist) / ps + 0.5, 0.0, 1.0) * share
                hu += cover * (30.0 - hu) * (hu < 0)
        hu += noise_rng.standard_normal((rows, cols), dtype=_F32) * sigma
        vol[i] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return vol


# --------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class StudyHeader:
    """What the instances of one study share: the study and a fake patient.

    Every patient attribute is made up (``SIMULATED^PATIENT^N``) but shaped like the real
    thing, so the agent's PHI handling is exercised: none of it may ever leave the agent."""

    study_instance_uid: str
    accession_number: str
    study_id: str
    study_datetime: datetime
    modality: str
    patient_name: str  # fake PHI
    patient_id: str
    patient_birth_date: date
    patient_sex: str

    @property
    def accession(self) -> str:
        return self.accession_number

    @property
    def patient_age(self) -> str:
        d, b = self.study_datetime.date(), self.patient_birth_date
        years = d.year - b.year - ((d.month, d.day) < (b.month, b.day))
        return f"{max(0, years):03d}Y"


@dataclass
class SimulatedStudy:
    """A study written to disk, with its ground truth (one bool per code in FINDINGS)."""

    study_instance_uid: str
    modality: str
    truth: dict[str, bool]
    paths: list[Path]


def new_study(rng: np.random.Generator, modality: Modality) -> StudyHeader:
    """A new study of ``modality`` for a new simulated patient."""
    _check_modality(modality)
    number = int(rng.integers(1, 1_000_000))
    when = datetime(2025, 1, 1, 7) + timedelta(
        days=int(rng.integers(0, 365)), seconds=int(rng.integers(0, 12 * 3600))
    )
    born = date(1935, 1, 1) + timedelta(days=int(rng.integers(0, 70 * 365)))
    return StudyHeader(
        study_instance_uid=_uid(rng),
        accession_number=f"SIM{int(rng.integers(10**7, 10**8))}",
        study_id=str(int(rng.integers(1, 100_000))),
        study_datetime=when,
        modality=modality,
        patient_name=f"SIMULATED^PATIENT^{number}",  # fake PHI
        patient_id=f"SIM-{number:06d}",
        patient_birth_date=born,
        patient_sex=str(rng.choice(["F", "M", "O"], p=[0.49, 0.49, 0.02])),
    )


def _check_modality(modality: str) -> None:
    if modality not in ("CR", "DX", "CT"):
        raise ValueError(f"modality must be CR, DX or CT, not {modality!r}")


def _dataset(sop_class_uid: str, sop_instance_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "EDGETRIAGE_SIM"
    ds = FileDataset(
        "",
        Dataset(),
        preamble=b"\0" * 128,
        file_meta=meta,
        is_implicit_VR=False,
        is_little_endian=True,
    )
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def _study_modules(ds: Dataset, study: StudyHeader, modality: str, acquired: datetime) -> None:
    """Patient, General Study, General Equipment and the dates of one instance."""
    ds.PatientName = study.patient_name  # fake PHI
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date.strftime("%Y%m%d")  # fake PHI
    ds.PatientSex = study.patient_sex
    ds.PatientAge = study.patient_age
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_datetime.strftime("%Y%m%d")
    ds.StudyTime = study.study_datetime.strftime("%H%M%S")
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = acquired.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = acquired.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "synthetic chest"
    ds.SoftwareVersions = __version__
    ds.DeviceSerialNumber = "SIM0001"
    ds.InstitutionName = "Simulated General Hospital"
    ds.StationName = "SIMCT01" if modality == "CT" else "SIMXR01"
    ds.BodyPartExamined = "CHEST"


def _ds_value(v: float) -> str:
    """A DS string of at most 16 characters."""
    return f"{v:.6g}"


def chest_instance(
    rng: np.random.Generator,
    *,
    findings: Mapping[str, bool],
    view: View = "PA",
    modality: Modality = "CR",
    rows: int = RADIOGRAPH_MATRIX[0],
    cols: int = RADIOGRAPH_MATRIX[1],
    study: StudyHeader | None = None,
    photometric: Photometric | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
) -> FileDataset:
    """One chest radiograph (CR, or DX For Presentation) as a complete DICOM instance.

    ``study`` lets several instances share a study (a new one is made when None);
    ``photometric`` None picks MONOCHROME2 80% of the time, else MONOCHROME1 (stored values
    inverted). ``view`` is PA or AP (frontal) or LL (lateral)."""
    if modality not in ("CR", "DX"):
        raise ValueError(f"chest radiographs are CR or DX, not {modality!r}")
    img_rng, hdr_rng = _streams(rng, 2)
    if study is None:
        study = new_study(hdr_rng, modality)
    rendering = render_chest(img_rng, rows=rows, cols=cols, findings=findings, view=view)
    image, spacing = rendering.image, rendering.pixel_spacing_mm
    if photometric is None:
        photometric = "MONOCHROME1" if hdr_rng.random() < 0.2 else "MONOCHROME2"

    sop_class = (
        ComputedRadiographyImageStorage
        if modality == "CR"
        else (DigitalXRayImageStorageForPresentation)
    )
    ds = _dataset(sop_class, _uid(hdr_rng))
    acquired = study.study_datetime + timedelta(seconds=30 * instance_number)
    _study_modules(ds, study, modality, acquired)
    ds.SeriesInstanceUID = series_instance_uid or _uid(hdr_rng)
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    lateral = view == "LL"
    ds.SeriesDescription = "CHEST LAT" if lateral else f"CHEST {view}"
    ds.StudyDescription = "XR CHEST"
    ds.ProtocolName = "CHEST"
    ds.ViewPosition = view
    ds.PatientOrientation = ["P", "F"] if lateral else ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.KVP = _ds_value(round(float(hdr_rng.uniform(110, 125)), 1))
    ds.ExposureTime = int(hdr_rng.integers(4, 20))
    ds.XRayTubeCurrent = int(hdr_rng.integers(200, 400))
    ds.DistanceSourceToDetector = "1800" if view != "AP" else "1000"

    # Image Pixel: 12 bits stored in 16.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    stored = (MAX_STORED - image) if photometric == "MONOCHROME1" else image
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    spacing_ds = [_ds_value(round(spacing, 6))] * 2
    ds.ImagerPixelSpacing = spacing_ds
    ds.PixelSpacing = spacing_ds
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    # Modality LUT: mostly identity, sometimes not (readers must apply it).
    slope, intercept = [(1.0, 0.0), (2.0, 0.0), (1.0, -1024.0)][
        int(hdr_rng.choice(3, p=[0.8, 0.1, 0.1]))
    ]
    ds.RescaleSlope = _ds_value(slope)
    ds.RescaleIntercept = _ds_value(intercept)
    if modality == "DX":
        ds.RescaleType = "US"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME1" else -1
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"

    # VOI LUT: a window on most images (sometimes two), none on some.
    if hdr_rng.random() < 0.85:
        sample = image[:: max(1, rows // 128), :: max(1, cols // 128)]
        lo, hi = np.percentile(sample, [8.0, 99.5])
        centres, widths = [(lo + hi) / 2], [(hi - lo) * 1.1]
        if hdr_rng.random() < 0.15:
            centres.append(lo + (hi - lo) * 0.35)
            widths.append((hi - lo) * 0.7)
        if photometric == "MONOCHROME1":
            centres = [MAX_STORED - c for c in centres]
        centres_out = [_ds_value(round(c * slope + intercept, 1)) for c in centres]
        widths_out = [_ds_value(round(max(2.0, w * slope), 1)) for w in widths]
        ds.WindowCenter = centres_out if len(centres_out) > 1 else centres_out[0]
        ds.WindowWidth = widths_out if len(widths_out) > 1 else widths_out[0]
        explanation = ["STANDARD", "LUNG"][: len(centres_out)]
        ds.WindowCenterWidthExplanation = explanation if len(explanation) > 1 else explanation[0]
    return ds


def ct_series(
    rng: np.random.Generator,
    *,
    findings: Mapping[str, bool],
    study: StudyHeader | None = None,
    rows: int = CT_MATRIX[0],
    cols: int = CT_MATRIX[1],
    slices: int = CT_SLICES,
) -> list[FileDataset]:
    """An axial chest CT series (CT Image Storage), one instance per slice, head first:
    instance 1 is the most superior slice."""
    vol_rng, hdr_rng = _streams(rng, 2)
    if study is None:
        study = new_study(hdr_rng, "CT")
    fov = float(hdr_rng.uniform(320, 400))
    ps = fov / cols
    # The series always spans apices to upper abdomen (~240 mm for 48 slices of 5 mm).
    thickness = 5.0 if slices <= 64 else 2.5 if slices <= 128 else 1.25
    volume = synth_ct_volume(
        vol_rng,
        slices=slices,
        rows=rows,
        cols=cols,
        findings=findings,
        pixel_spacing_mm=ps,
        slice_thickness_mm=thickness,
    )
    series_uid, frame_uid = _uid(hdr_rng), _uid(hdr_rng)
    kernel = str(hdr_rng.choice(["STANDARD", "LUNG", "B30f", "B70f", "FC13"]))
    window = (-600, 1500) if kernel in ("LUNG", "B70f") else (40, 400)
    z_top = float(hdr_rng.uniform(-80, -40))
    acquired = study.study_datetime + timedelta(seconds=45)
    x0 = -(cols - 1) / 2 * ps
    y0 = -(rows - 1) / 2 * ps
    out = []
    for i in range(slices):
        ds = _dataset(CTImageStorage, _uid(hdr_rng))
        _study_modules(ds, study, "CT", acquired)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDescription = "CHEST AXIAL"
        ds.StudyDescription = "CT CHEST"
        ds.ProtocolName = "CHEST"
        ds.InstanceNumber = i + 1
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        z = z_top - i * thickness
        ds.ImagePositionPatient = [
            _ds_value(round(x0, 4)),
            _ds_value(round(y0, 4)),
            _ds_value(round(z, 4)),
        ]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceLocation = _ds_value(round(z, 4))
        ds.SliceThickness = _ds_value(thickness)
        ds.SpacingBetweenSlices = _ds_value(thickness)
        ds.PixelSpacing = [_ds_value(round(ps, 6))] * 2
        ds.ReconstructionDiameter = _ds_value(round(fov, 2))
        ds.ConvolutionKernel = kernel
        ds.KVP = "120"
        ds.XRayTubeCurrent = 200
        ds.GantryDetectorTilt = "0"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = str(window[0])
        ds.WindowWidth = str(window[1])
        stored = volume[i].astype(np.int32) + 1024
        ds.PixelData = stored.astype("<i2").tobytes()
        out.append(ds)
    return out


# --------------------------------------------------------------------------- writing


def write_instance(ds: FileDataset, folder: Path) -> Path:
    """Writes ``ds`` as ``folder/<SOPInstanceUID>.dcm`` the way a modality does: into a
    hidden temporary name in the same folder, flushed and fsynced, then renamed. Readers
    never see a partial file under the final name."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{ds.SOPInstanceUID}.dcm"
    part = folder / f".{final.name}.part"
    try:
        with open(part, "wb") as f:
            dcmwrite(f, ds, enforce_file_format=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, final)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return final


def _pick_findings(rng: np.random.Generator, modality: str, abnormal: bool) -> dict[str, bool]:
    truth = dict.fromkeys(FINDINGS, False)
    choice = int(rng.choice(3, p=[0.4, 0.4, 0.2]))  # drawn always: same stream either way
    if abnormal:
        if modality == "CT":  # pneumothorax is not simulated on CT
            truth["lung_nodule"] = True
        else:
            truth["pneumothorax"] = choice in (0, 2)
            truth["lung_nodule"] = choice in (1, 2)
    return truth


def write_study(
    out_dir: Path,
    rng: np.random.Generator,
    *,
    modality: Modality = "CR",
    abnormal: bool,
    rows: int | None = None,
    cols: int | None = None,
    layout: Layout = "flat",
    slices: int = CT_SLICES,
) -> SimulatedStudy:
    """Writes one study into ``out_dir`` and returns it with its truth.

    CR/DX: a frontal (PA 75%, else AP) and, for about half of the studies, a lateral (LL), in
    one series or two. CT: one axial series of ``slices`` slices. ``abnormal``: at least
    one finding (pneumothorax, nodule or both; CT: nodule), else none. ``rows``/``cols``
    default to 2048x1664 (CR/DX) or 256x256 (CT). ``layout`` "nested" puts each study in a
    sub-folder named by its StudyInstanceUID."""
    _check_modality(modality)
    if layout not in ("flat", "nested"):
        raise ValueError(f"layout must be flat or nested, not {layout!r}")
    hdr_rng, truth_rng, image_rng = _streams(rng, 3)
    study = new_study(hdr_rng, modality)
    truth = _pick_findings(truth_rng, modality, abnormal)
    folder = Path(out_dir) / study.study_instance_uid if layout == "nested" else Path(out_dir)
    if modality == "CT":
        r, c = rows or CT_MATRIX[0], cols or CT_MATRIX[1]
        datasets = ct_series(image_rng, findings=truth, study=study, rows=r, cols=c, slices=slices)
    else:
        r, c = rows or RADIOGRAPH_MATRIX[0], cols or RADIOGRAPH_MATRIX[1]
        view: View = "PA" if hdr_rng.random() < 0.75 else "AP"
        with_lateral = hdr_rng.random() < (0.6 if view == "PA" else 0.2)  # ~half overall
        one_series = hdr_rng.random() < 0.5
        series_uid = _uid(hdr_rng)
        frontal_rng, lateral_rng = _streams(image_rng, 2)
        datasets = [
            chest_instance(
                frontal_rng,
                findings=truth,
                view=view,
                modality=modality,
                rows=r,
                cols=c,
                study=study,
                series_instance_uid=series_uid,
            )
        ]
        if with_lateral:
            datasets.append(
                chest_instance(
                    lateral_rng,
                    findings=truth,
                    view="LL",
                    modality=modality,
                    rows=r,
                    cols=c,
                    study=study,
                    series_instance_uid=series_uid if one_series else None,
                    series_number=1 if one_series else 2,
                    instance_number=2 if one_series else 1,
                )
            )
    paths = [write_instance(ds, folder) for ds in datasets]
    logger.info(
        "simulated study %s: %s, %d instance(s), truth %s",
        study.study_instance_uid,
        modality,
        len(paths),
        truth,
    )
    return SimulatedStudy(study.study_instance_uid, modality, truth, paths)


def simulate(
    out_dir: Path,
    *,
    studies: int = 5,
    modality: Modality = "CR",
    abnormal: float = 0.3,
    seed: int = 0,
    rows: int | None = None,
    cols: int | None = None,
    layout: Layout = "flat",
    interval_seconds: float = 0.0,
    slices: int = CT_SLICES,
) -> Iterator[SimulatedStudy]:
    """Writes ``studies`` studies into ``out_dir`` and yields each once it is fully written.
    Each study is abnormal with probability ``abnormal``; the same seed writes the same
    files. ``interval_seconds`` waits between studies, like a modality in use."""
    _check_modality(modality)
    if not 0.0 <= abnormal <= 1.0:
        raise ValueError(f"abnormal must be within 0..1, not {abnormal!r}")
    if studies < 0:
        raise ValueError(f"studies must be >= 0, not {studies!r}")
    # The modality is part of the seed: CR and CT runs with one seed never share UIDs.
    master = np.random.default_rng([seed % 2**64, ("CR", "DX", "CT").index(modality)])
    for i in range(studies):
        if i and interval_seconds > 0:
            time.sleep(interval_seconds)
        is_abnormal = bool(master.random() < abnormal)
        (study_rng,) = _streams(master, 1)
        yield write_study(
            Path(out_dir),
            study_rng,
            modality=modality,
            abnormal=is_abnormal,
            rows=rows,
            cols=cols,
            layout=layout,
            slices=slices,
        )


def truth_line(study: SimulatedStudy) -> str:
    """The contract's JSON line for one study:
    ``{"study_instance_uid", "modality", "truth": {finding code: bool}}``."""
    return json.dumps(
        {
            "study_instance_uid": study.study_instance_uid,
            "modality": study.modality,
            "truth": {code: bool(study.truth.get(code, False)) for code in FINDINGS},
        }
    )
