"""One DICOM Structured Report per study result: what the site's PACS shows of a triage.

The SR is a TID 1500 Measurement Report in the Enhanced SR SOP class (its content has
measurements, codes, text and image references, no spatial coordinates: Enhanced SR is the
least SOP class that holds it). It lives in the study it describes, in a series of its own
(``AI triage``), and holds:

* Algorithm Identification: the model's name, version and sha256;
* per finding one measurement group: the finding's code (its ``concept`` from the bundle,
  SNOMED CT or RadLex; a private-scheme code when it has none), one qualitative evaluation
  (present when the score reached the review threshold, else absent), the score and the
  thresholds as measurements, the images scored as source images;
* one group with the study's triage level;
* the sentence that this is a triage aid and not a diagnosis; DEMO in the title and content
  when the model is a demo model; a machine-drafted narrative, when the result has one;
* the patient and study modules of the source images (highdicom copies them from the first).

UIDs are derived, never random: the SOP Instance UID from the result's ``alert_id`` (study,
revision, model), so every retry of one revision carries the same UID and the PACS dedups it;
the Series Instance UID from the study and the agent's name, one series per agent per study.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .. import __version__
from ..bundle import Concept
from ..results import StudyResult

logger = logging.getLogger(__name__)

# Codes of our own (PS3.16 8.2: a private coding scheme designator starts with "99").
PRIVATE_SCHEME = "99EDGETRIAGE"
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR Storage
SERIES_DESCRIPTION = "AI triage"
SERIES_NUMBER = 9901
MANUFACTURER = "edge-triage"
DISCLAIMER = (
    "This is the output of an automated triage aid, not a diagnosis: it orders the worklist "
    "and was not reviewed by a radiologist."
)
DEMO_NOTICE = "DEMO model: not for clinical use."
NARRATIVE_PREFIX = "MACHINE-DRAFTED by a language model, not reviewed by a radiologist: "

_TITLE = codes.DCM.ImagingMeasurementReport
_DEMO_TITLE = Code("demo-report", PRIVATE_SCHEME, "DEMO AI triage report, not for clinical use")
_PROCEDURE = Code("triage", PRIVATE_SCHEME, "AI triage of imaging study")
_SCORE = Code("score", PRIVATE_SCHEME, "AI triage score")
_REVIEW_THRESHOLD = Code("review-threshold", PRIVATE_SCHEME, "Review threshold")
_URGENT_THRESHOLD = Code("urgent-threshold", PRIVATE_SCHEME, "Urgent threshold")
_TRIAGE = Code("triage-level", PRIVATE_SCHEME, "AI triage level")
_STUDY_TRIAGE = Code("study-triage", PRIVATE_SCHEME, "Study triage")
_NOTICE = Code("notice", PRIVATE_SCHEME, "Notice")
_NARRATIVE = Code("narrative", PRIVATE_SCHEME, "Machine-drafted narrative")
_NO_UNITS = Code("1", "UCUM", "no units")
_LEVELS = {
    "urgent": Code("urgent", PRIVATE_SCHEME, "Urgent"),
    "review": Code("review", PRIVATE_SCHEME, "Review"),
    "routine": Code("routine", PRIVATE_SCHEME, "Routine"),
    "not_scored": Code("not_scored", PRIVATE_SCHEME, "Not scored"),
}


def derived_uid(*parts: str) -> str:
    """A UID under 2.25 (PS3.5 B.2) from a hash of ``parts``: the same parts, the same UID."""
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()
    return f"2.25.{int(digest[:32], 16)}"


def sop_instance_uid(result: StudyResult) -> str:
    """The SR's SOP Instance UID: one per (study, revision, model), stable across retries."""
    return derived_uid("edge-triage-sr", result.alert_id)


def series_instance_uid(study_instance_uid: str, agent: str) -> str:
    """The SR series: one per agent per study."""
    return derived_uid("edge-triage-sr-series", study_instance_uid, agent)


def finding_code(code: str, label: str, concept: Concept | None) -> Code:
    """The coded concept for a finding: its bundle concept, else a private-scheme code."""
    if concept is None:
        return Code(code, PRIVATE_SCHEME, label[:64])
    return Code(concept.value, concept.scheme, concept.meaning)


class SRError(ValueError):
    """The SR cannot be built from this result (e.g. no source image): the reason says why."""


def build_sr(
    result: StudyResult,
    sources: Sequence[Dataset],
    *,
    concepts: Mapping[str, Concept | None],
    agent: str,
) -> hd.sr.EnhancedSR:
    """The SR of ``result``. ``sources``: the headers of the instances scored (pixel data is
    not needed), all of ``result``'s study; ``concepts``: the bundle's concept per finding
    code; ``agent``: this agent's name (its series). Raises :class:`SRError`."""
    if not sources:
        raise SRError("no source image: an SR needs the study's patient and study modules")
    for ds in sources:
        if ds.get("StudyInstanceUID") != result.study_instance_uid:
            raise SRError("a source image belongs to another study")
    demo = result.model.demo
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model.name,
        version=result.model.version,
        parameters=[f"sha256={result.model.sha256}"],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("edge-triage-device", agent),
            name=agent[:64],
            manufacturer_name=MANUFACTURER,
            model_name=result.model.name[:64],
        ),
    )
    evidence = [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
        )
        for ds in sources
    ]
    groups = []
    for i, finding in enumerate(result.findings):
        if finding.code not in concepts:
            logger.warning("finding %s is not in the bundle: private-scheme code", finding.code)
        code = finding_code(finding.code, finding.label, concepts.get(finding.code))
        measurements = [
            hd.sr.Measurement(name=_SCORE, value=finding.score, unit=_NO_UNITS),
            hd.sr.Measurement(
                name=_REVIEW_THRESHOLD, value=finding.review_threshold, unit=_NO_UNITS
            ),
        ]
        if finding.urgent_threshold is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=_URGENT_THRESHOLD, value=finding.urgent_threshold, unit=_NO_UNITS
                )
            )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid("edge-triage-finding", result.alert_id, finding.code),
                    identifier=f"finding {i + 1}: {finding.code}"[:64],
                ),
                finding_type=code,
                algorithm_id=algorithm,
                measurements=measurements,
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=code, value=codes.SCT.Present if finding.flagged else codes.SCT.Absent
                    )
                ],
                source_images=evidence,
            )
        )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("edge-triage-triage", result.alert_id),
                identifier="study triage",
            ),
            finding_type=_STUDY_TRIAGE,
            algorithm_id=algorithm,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=_TRIAGE, value=_LEVELS[result.triage])
            ],
            source_images=evidence,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURE,
        imaging_measurements=groups,
        title=_DEMO_TITLE if demo else _TITLE,
        referenced_images=list(sources),
    )
    root = report[0]
    notices = [DISCLAIMER]
    if demo:
        notices.insert(0, DEMO_NOTICE)
    if result.reason:
        notices.append(f"Not scored: {result.reason}")
    for text in notices:
        root.ContentSequence.append(
            hd.sr.TextContentItem(name=_NOTICE, value=text, relationship_type="CONTAINS")
        )
    if result.narrative is not None:
        root.ContentSequence.append(
            hd.sr.TextContentItem(
                name=_NARRATIVE,
                value=NARRATIVE_PREFIX + result.narrative.text,
                relationship_type="CONTAINS",
            )
        )
    sr = hd.sr.EnhancedSR(
        evidence=list(sources),
        content=root,
        series_instance_uid=series_instance_uid(result.study_instance_uid, agent),
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid(result),
        instance_number=result.revision,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        software_versions=__version__,
    )
    # The private designator is named where DICOM looks a designator up (SOP Common,
    # Coding Scheme Identification Sequence), so a reader can tell whose codes they are.
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "edge-triage triage codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    # Dates from the result, not the clock (highdicom dates the instance's creation and its
    # own contribution by the clock): a retry builds the same object, byte for byte.
    when = datetime.fromisoformat(result.timing.scored_at.replace("Z", "+00:00"))
    for prefix in ("Content", "InstanceCreation", "Series"):
        if hasattr(sr, f"{prefix}Date"):
            setattr(sr, f"{prefix}Date", when.strftime("%Y%m%d"))
            setattr(sr, f"{prefix}Time", when.strftime("%H%M%S"))
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    return sr
