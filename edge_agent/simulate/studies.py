"""Whole studies written into a folder the way a modality does (``edge-agent simulate``),
and the truth line printed for each."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .common import (
    CT_MATRIX,
    CT_SLICES,
    FINDINGS,
    RADIOGRAPH_MATRIX,
    Layout,
    Modality,
    View,
    _streams,
    _uid,
)
from .dicom_writer import (
    SimulatedStudy,
    _check_modality,
    chest_instance,
    ct_series,
    new_study,
    write_instance,
)

logger = logging.getLogger(__name__)


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
