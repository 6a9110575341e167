"""Scoring one complete study: choose its images, preprocess, run the encoder, triage.

Only the images a chest model was trained on are scored: frontal (PA/AP) CR/DX images, or
images with no view marked when the study has no explicitly frontal one. Laterals are kept
but not used. A study with nothing to score is published as ``not_scored`` with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from . import imaging
from .bundle import Bundle
from .errors import InputRejected
from .results import (
    FindingResult,
    InstanceCounts,
    ModelRef,
    StudyResult,
    Timing,
    TriageLevel,
    alert_id,
    iso,
)
from .runners import Runner
from .store import InstanceRow, StudyRow
from .triage import Head, triage_level

logger = logging.getLogger(__name__)

PROJECTION_MODALITIES = frozenset({"CR", "DX"})


@dataclass
class StudyScore:
    """What scoring one study produced, before it is committed."""

    result: StudyResult
    instance_states: dict[str, tuple[str, str | None]]
    rejected: list[tuple[InstanceRow, str]] = field(default_factory=list)


def select_images(instances: list[InstanceRow]) -> tuple[list[InstanceRow], str | None]:
    """(instances to score, reason when there are none)."""
    projections = [i for i in instances if i.modality in PROJECTION_MODALITIES]
    if not projections:
        modalities = sorted({i.modality for i in instances})
        return [], f"no CR/DX image (study has {', '.join(modalities)}; CT is not scored yet)"
    frontal = [i for i in projections if i.view == "frontal"]
    if frontal:
        return frontal, None
    unknown = [i for i in projections if i.view == "unknown"]
    if unknown:
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
    ) -> None:
        self.bundle = bundle
        self.runner = runner
        self.head = Head(bundle)
        self.watch_dir = watch_dir
        self.batch_size = batch_size
        self.publish_accession = publish_accession
        self.should_stop = should_stop
        spec = bundle.manifest
        self.model = ModelRef(
            name=spec.model.name,
            version=spec.model.version,
            sha256=bundle.sha256,
            precision=spec.precision,
            provider=runner.provider,
            demo=spec.model.demo,
        )

    def _load(self, inst: InstanceRow) -> np.ndarray:
        path = self.watch_dir / inst.path
        try:
            ds = pydicom.dcmread(path)
        except FileNotFoundError as exc:
            raise InputRejected("file disappeared from the watch folder before scoring") from exc
        except InvalidDicomError as exc:
            raise InputRejected("not a DICOM file any more (replaced before scoring)") from exc
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputRejected(f"unreadable DICOM file ({type(exc).__name__})") from exc
        if str(ds.get("SOPInstanceUID", "")).strip() != inst.sop_instance_uid:
            raise InputRejected("file was replaced by another instance before scoring")
        return imaging.preprocess(ds, self.bundle.manifest.encoder.preprocessing)

    def score(
        self, study: StudyRow, instances: list[InstanceRow], rejected_files: int
    ) -> StudyScore | None:
        """Score a study. None when asked to stop part-way (the study stays complete)."""
        chosen, reason = select_images(instances)
        states: dict[str, tuple[str, str | None]] = {
            i.sop_instance_uid: ("unused", None) for i in instances
        }
        rejected: list[tuple[InstanceRow, str]] = []
        tensors: list[np.ndarray] = []
        for inst in chosen:
            if self.should_stop():
                return None
            try:
                tensors.append(self._load(inst))
                states[inst.sop_instance_uid] = ("scored", None)
            except InputRejected as exc:
                logger.warning(
                    "instance %s of study %s not usable: %s",
                    inst.sop_instance_uid,
                    study.study_instance_uid,
                    exc.reason,
                )
                states[inst.sop_instance_uid] = ("rejected", exc.reason)
                rejected.append((inst, exc.reason))
        if chosen and not tensors:
            reason = f"no usable frontal chest image ({rejected[0][1]})"

        findings: list[FindingResult] = []
        triage: TriageLevel = "not_scored"
        inference_ms = 0.0
        if tensors:
            embeddings = []
            start = time.perf_counter()
            for i in range(0, len(tensors), self.batch_size):
                if self.should_stop():
                    return None
                embeddings.append(self.runner.embed(np.stack(tensors[i : i + self.batch_size])))
            inference_ms = (time.perf_counter() - start) * 1000
            findings = self.head.study_findings(self.head.scores(np.concatenate(embeddings)))
            triage = triage_level(findings)
            reason = None

        now = time.time()
        result = StudyResult(
            alert_id=alert_id(study.study_instance_uid, study.revision, self.bundle.sha256),
            revision=study.revision,
            study_instance_uid=study.study_instance_uid,
            accession_number=study.accession_number if self.publish_accession else None,
            modality=study.modality,
            triage=triage,
            reason=reason,
            findings=findings,
            model=self.model,
            instances=InstanceCounts(
                received=len(instances) + rejected_files,
                scored=len(tensors),
                rejected=len(rejected) + rejected_files,
            ),
            timing=Timing(
                first_instance_at=iso(study.first_instance_at),
                complete_at=iso(study.complete_at or now),
                scored_at=iso(now),
                published_at=iso(now),
                inference_ms=round(inference_ms, 1),
            ),
        )
        return StudyScore(result=result, instance_states=states, rejected=rejected)
