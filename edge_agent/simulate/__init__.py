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

The package is split by what it draws: :mod:`.cxr` (radiographs), :mod:`.ct` (CT volumes),
:mod:`.dicom_writer` (DICOM datasets and files), :mod:`.studies` (whole studies, the
command's glue); :mod:`.common` holds what they share. Every public name is importable
from here."""

from __future__ import annotations

from .common import (
    CT_MATRIX,
    CT_SLICES,
    FINDINGS,
    MANUFACTURER,
    MAX_STORED,
    RADIOGRAPH_MATRIX,
    Layout,
    Modality,
    Photometric,
    View,
)
from .ct import synth_ct_volume
from .cxr import ChestRendering, render_chest, synth_chest
from .dicom_writer import (
    SimulatedStudy,
    StudyHeader,
    chest_instance,
    ct_series,
    new_study,
    write_instance,
)
from .studies import simulate, truth_line, write_study

__all__ = [
    "CT_MATRIX",
    "CT_SLICES",
    "FINDINGS",
    "MANUFACTURER",
    "MAX_STORED",
    "RADIOGRAPH_MATRIX",
    "ChestRendering",
    "Layout",
    "Modality",
    "Photometric",
    "SimulatedStudy",
    "StudyHeader",
    "View",
    "chest_instance",
    "ct_series",
    "new_study",
    "render_chest",
    "simulate",
    "synth_chest",
    "synth_ct_volume",
    "truth_line",
    "write_instance",
    "write_study",
]
