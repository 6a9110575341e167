"""Scoring one complete study: choose its images, preprocess, run the encoder, triage.

Radiographs (CR/DX): only the images a chest model was trained on are scored: frontal (PA/AP)
images, or, when ``selection.radiograph_unmarked_views`` allows it, images with no view
marked when the study has no explicitly frontal one. Laterals are kept but not used. The
study score of a finding is the maximum over its images.

CT (a study without radiographs): only with a bundle built for CT (findings marked for CT
and a ``ct`` section in its manifest); any other bundle's findings are about radiographs,
and the study is published as ``not_scored`` saying so. The axial series best suited to lung
nodules is chosen (:func:`edge_agent.ct.select_series`), cut into slabs, and each CT
finding's study score aggregates its slab scores; the result names the slab that drove it.

A study with nothing to score is published as ``not_scored`` with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from . import ct, imaging
from .bundle import RADIOGRAPH_MODALITIES, Bundle
from .config import SelectionSettings
from .dicom.instance_file import Rereading, read_again
from .errors import InputRejected
from .narrative import Source
from .results import (
    FindingResult,
    InstanceCounts,
    ModelRef,
    SlabRef,
    StudyResult,
    Timing,
    TriageLevel,
    alert_id,
    iso,
    reaches,
)
from .runners import Runner
from .store import InstanceRow, StudyRow
from .triage import Head, finding_result, triage_level

logger = logging.getLogger(__name__)

PROJECTION_MODALITIES = frozenset(RADIOGRAPH_MODALITIES)

REREADING = Rereading(
    gone="file disappeared from the watch folder before scoring",
    replaced="file was replaced by another instance before scoring",
    unreadable="unreadable DICOM file ({error})",
    not_dicom="not a DICOM file any more (replaced before scoring)",
)
"""What a radiograph or CT slice read again for scoring can have become (P/rejected)."""


@dataclass
class StudyScore:
    """What scoring one study produced, before it is committed."""

    result: StudyResult
    instance_states: dict[str, tuple[str, str | None]]
    rejected: list[tuple[InstanceRow, str]] = field(default_factory=list)
    narrative_source: Source | None = None
    """The image that drove an urgent result (what a draft narrative describes)."""


@dataclass
class _Marks:
    """What became of each instance of the study being scored (``unused`` until marked)."""

    study: StudyRow
    states: dict[str, tuple[str, str | None]]
    rejected: list[tuple[InstanceRow, str]] = field(default_factory=list)

    def scored(self, sop_instance_uid: str) -> None:
        self.states[sop_instance_uid] = ("scored", None)

    def reject(self, inst: InstanceRow, reason: str) -> None:
        logger.warning(
            "instance %s of study %s not usable: %s",
            inst.sop_instance_uid,
            self.study.study_instance_uid,
            reason,
        )
        self.states[inst.sop_instance_uid] = ("rejected", reason)
        self.rejected.append((inst, reason))


@dataclass
class _Outcome:
    """One path's findings (empty with a reason when nothing was scored)."""

    findings: list[FindingResult]
    reason: str | None
    scored: int
    inference_ms: float
    source: Source | None = None


def urgent_finding(findings: list[FindingResult]) -> int | None:
    """Index of the finding that makes the study urgent with the highest score, if any."""
    urgent = [(f.score, i) for i, f in enumerate(findings) if reaches(f.score, f.urgent_threshold)]
    return max(urgent)[1] if urgent else None


def select_images(
    instances: list[InstanceRow], rules: SelectionSettings | None = None
) -> tuple[list[InstanceRow], str | None]:
    """(radiographs to score, reason when there are none)."""
    rules = rules or SelectionSettings()
    projections = [i for i in instances if i.modality in PROJECTION_MODALITIES]
    if not projections:
        modalities = sorted({i.modality for i in instances})
        return [], f"no CR/DX image (study has {', '.join(modalities) or 'no images'})"
    frontal = [i for i in projections if i.view == "frontal"]
    if frontal:
        return frontal, None
    unknown = [i for i in projections if i.view == "unknown"]
    if unknown and rules.radiograph_unmarked_views:
        return unknown, None
    return [], "no frontal chest image"


class Scorer:
    def __init__(
        self,
        bundle: Bundle,
        runner: Runner,
        watch_dir: Path,
        *,
        batch_size: int = 1,
        publish_accession: bool = False,
        should_stop: Callable[[], bool] = lambda: False,
        selection: SelectionSettings | None = None,
    ) -> None:
        self.bundle = bundle
        self.runner = runner
        self.head = Head(bundle)
        self.watch_dir = watch_dir
        self.batch_size = batch_size
        self.publish_accession = publish_accession
        self.should_stop = should_stop
        self.selection = selection or SelectionSettings()
        spec = bundle.manifest
        self.model = ModelRef(
            name=spec.model.name,
            version=spec.model.version,
            sha256=bundle.sha256,
            precision=spec.precision,
            provider=runner.provider,
            demo=spec.model.demo,
        )

    # -- reading ----------------------------------------------------------------------------

    def _read(self, inst: InstanceRow, *, pixels: bool = True) -> pydicom.Dataset:
        """The instance's file read again (opened as the intake opens it: no link followed,
        a regular file only), checked to hold the same SOP Instance UID."""
        return read_again(
            self.watch_dir, inst.path, inst.sop_instance_uid, REREADING, pixels=pixels
        )

    def _load(self, inst: InstanceRow) -> np.ndarray:
        return imaging.preprocess(self._read(inst), self.bundle.manifest.encoder.preprocessing)

    # -- the study --------------------------------------------------------------------------

    def score(
        self, study: StudyRow, instances: list[InstanceRow], rejected_files: int
    ) -> StudyScore | None:
        """Score a study. None when asked to stop part-way (the study stays complete)."""
        marks = _Marks(study, {i.sop_instance_uid: ("unused", None) for i in instances})
        has_radiographs = any(i.modality in PROJECTION_MODALITIES for i in instances)
        has_ct = any(i.modality == "CT" for i in instances)
        if has_ct and not has_radiographs:
            outcome = self._score_ct(marks, instances)
        else:
            outcome = self._score_radiographs(marks, instances)
        if outcome is None:
            return None

        triage: TriageLevel = triage_level(outcome.findings) if outcome.findings else "not_scored"
        now = time.time()
        result = StudyResult(
            alert_id=alert_id(study.study_instance_uid, study.revision, self.bundle.sha256),
            revision=study.revision,
            study_instance_uid=study.study_instance_uid,
            accession_number=study.accession_number if self.publish_accession else None,
            modality=study.modality,
            triage=triage,
            reason=None if outcome.findings else outcome.reason,
            findings=outcome.findings,
            model=self.model,
            instances=InstanceCounts(
                received=len(instances) + rejected_files,
                scored=outcome.scored,
                rejected=len(marks.rejected) + rejected_files,
            ),
            timing=Timing(
                first_instance_at=iso(study.first_instance_at),
                complete_at=iso(study.complete_at or now),
                scored_at=iso(now),
                published_at=iso(now),
                inference_ms=round(outcome.inference_ms, 1),
            ),
        )
        return StudyScore(
            result=result,
            instance_states=marks.states,
            rejected=marks.rejected,
            narrative_source=outcome.source if triage == "urgent" else None,
        )

    def _embed(self, tensors: list[np.ndarray]) -> tuple[np.ndarray, float] | None:
        """(embeddings in batches of ``batch_size``, milliseconds it took); None when asked
        to stop."""
        start = time.perf_counter()
        out = []
        for i in range(0, len(tensors), self.batch_size):
            if self.should_stop():
                return None
            out.append(self.runner.embed(np.stack(tensors[i : i + self.batch_size])))
        return np.concatenate(out), (time.perf_counter() - start) * 1000

    # -- radiographs ------------------------------------------------------------------------

    def _score_radiographs(self, marks: _Marks, instances: list[InstanceRow]) -> _Outcome | None:
        if not self.head.columns(PROJECTION_MODALITIES):
            return _Outcome([], "the model has no findings for radiographs (CR/DX)", 0, 0.0)
        chosen, reason = select_images(instances, self.selection)
        tensors: list[np.ndarray] = []
        loaded: list[InstanceRow] = []
        for inst in chosen:
            if self.should_stop():
                return None
            try:
                tensors.append(self._load(inst))
                loaded.append(inst)
                marks.scored(inst.sop_instance_uid)
            except InputRejected as exc:
                marks.reject(inst, exc.reason)
        if chosen and not tensors:
            reason = f"no usable frontal chest image ({marks.rejected[0][1]})"
        if not tensors:
            return _Outcome([], reason, 0, 0.0)
        embedded = self._embed(tensors)
        if embedded is None:
            return None
        embeddings, inference_ms = embedded
        image_scores = self.head.scores(embeddings)
        findings = self.head.study_findings(image_scores, PROJECTION_MODALITIES)
        source = None
        urgent = urgent_finding(findings)
        if urgent is not None:
            column = self.head.columns(PROJECTION_MODALITIES)[urgent]
            inst = loaded[int(np.argmax(image_scores[:, column]))]
            source = Source(
                "radiograph",
                [inst.path],
                f"radiograph {inst.sop_instance_uid}",
                [inst.sop_instance_uid],
            )
        return _Outcome(findings, None, len(tensors), inference_ms, source)

    # -- CT ---------------------------------------------------------------------------------

    def _score_ct(self, marks: _Marks, instances: list[InstanceRow]) -> _Outcome | None:
        manifest = self.bundle.manifest
        columns = self.head.columns({"CT"})
        if manifest.ct is None or not columns:
            return _Outcome(
                [],
                f"model {manifest.model.name} was not built for CT (no CT findings in its "
                "bundle); CT studies are not scored with it",
                0,
                0.0,
            )
        by_sop = {i.sop_instance_uid: i for i in instances}
        headers: list[ct.CTSlice] = []
        for inst in instances:
            if inst.modality != "CT":
                continue
            if self.should_stop():
                return None
            try:
                headers.append(ct.slice_from_dataset(self._read(inst, pixels=False), inst.path))
            except InputRejected as exc:
                marks.reject(inst, exc.reason)
        candidates, refused = ct.select_series(headers, self.selection)
        for choice in candidates:
            try:
                outcome = self._score_series(choice, columns, by_sop)
            except _SliceRejected as exc:
                marks.reject(exc.instance, exc.reason)
                refused.append(f"{choice.name}: a slice is not usable ({exc.reason})")
                continue
            if outcome is None:
                return None
            for s in choice.geometry.slices:
                marks.scored(s.sop_instance_uid)
            logger.info(
                "study %s: scored CT %s (%d slices, %g mm, kernel %s)",
                marks.study.study_instance_uid,
                choice.name,
                len(choice.geometry.slices),
                choice.thickness_mm,
                "lung" if choice.lung_kernel else "other",
            )
            return outcome
        return _Outcome([], ct.no_series_reason(refused), 0, 0.0)

    def _score_series(
        self, choice: ct.SeriesChoice, columns: list[int], by_sop: dict[str, InstanceRow]
    ) -> _Outcome | None:
        manifest = self.bundle.manifest
        assert manifest.ct is not None
        spec = manifest.encoder.preprocessing
        geo = choice.geometry
        slabs = ct.plan_slabs(geo.positions_mm, manifest.ct.slab_mm, manifest.ct.stride_mm)

        def read(i: int) -> np.ndarray:
            inst = by_sop[geo.slices[i].sop_instance_uid]
            try:
                return ct.slice_hu(self._read(inst))
            except InputRejected as exc:
                raise _SliceRejected(inst, exc.reason) from exc

        scores: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        inference_ms = 0.0
        for slab, image in ct.iter_slab_images(slabs, read):
            if self.should_stop():
                return None
            pending.append(ct.slab_tensor(image, manifest.ct.convention, spec))
            if len(pending) == self.batch_size or slab.index == len(slabs) - 1:
                embedded = self._embed(pending)
                if embedded is None:
                    return None
                scores.append(self.head.scores(embedded[0])[:, columns])
                inference_ms += embedded[1]
                pending = []
        slab_scores = np.concatenate(scores)  # (slabs, CT findings)
        findings = []
        for column, j in enumerate(columns):
            score, best = ct.aggregate(slab_scores[:, column], manifest.ct)
            slab = slabs[best]
            ref = SlabRef(
                series_instance_uid=choice.series_instance_uid,
                index=slab.index,
                count=len(slabs),
                position_mm=(round(slab.start_mm, 2), round(slab.end_mm, 2)),
                first_sop_instance_uid=geo.slices[slab.first].sop_instance_uid,
                last_sop_instance_uid=geo.slices[slab.last].sop_instance_uid,
                score=round(float(slab_scores[best, column]), 6),
            )
            findings.append(finding_result(self.head.findings[j], score, ref))
        source = None
        urgent = urgent_finding(findings)
        if urgent is not None:
            drove = findings[urgent].slab
            assert drove is not None
            slab = slabs[drove.index]
            inside = [s.sop_instance_uid for s in geo.slices[slab.first : slab.last + 1]]
            source = Source(
                "ct",
                [by_sop[uid].path for uid in inside],
                f"CT slab {slab.index + 1} of {len(slabs)}, series {choice.series_instance_uid}",
                inside,
            )
        return _Outcome(findings, None, len(geo.slices), inference_ms, source)


class _SliceRejected(InputRejected):
    """A slice of the chosen series could not be used (the next series is tried)."""

    def __init__(self, instance: InstanceRow, reason: str) -> None:
        super().__init__(reason)
        self.instance = instance
