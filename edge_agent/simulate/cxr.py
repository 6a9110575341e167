"""Chest radiographs (CR/DX): a frontal or lateral chest drawn as an attenuation map in a
patient frame, with pneumothorax and nodules, tone-mapped, warped and given detector noise."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import cv2
import numpy as np

from .common import (
    _ASPECT,
    _F32,
    _MARGIN,
    _WORK_PX_PER_UNIT,
    FINDINGS,
    MAX_STORED,
    View,
    _Canvas,
    _smoothstep,
    _streams,
)

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
