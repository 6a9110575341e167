"""Chest CT: a synthetic thorax volume in Hounsfield units, with nodules."""

from __future__ import annotations

import math
from collections.abc import Mapping

import cv2
import numpy as np

from .common import _F32, CT_MATRIX, CT_SLICES, _smoothstep, _streams

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
