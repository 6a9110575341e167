"""Draft narratives for urgent studies: MedGemma (the bundle's ``report`` section) describes
the image that drove the flag, after the flag.

The flag comes first. When a study is urgent, its result is committed and published as
usual, with ``narrative_status: "pending"``, and in the same transaction a narrative job is
stored (:class:`edge_agent.store.NarrativeJob`: which image, and the deadline, the flag's
time plus the profile's ``time_budget_seconds``). This worker, a thread of its own, takes
the jobs oldest first and publishes each outcome as the study's next revision, with the
same triage and findings and ``narrative_status`` ``"ok"`` (``narrative`` set: text, model,
a draft marker), ``"timeout"`` (not ready by the deadline: generation is abandoned there) or
``"failed"`` (``narrative_error`` says why: the image was gone, the model could not load).

Scoring has priority: before every generated token the worker waits while a study is being
scored (the deadline keeps counting), and the worker and its ONNX Runtime threads run niced
(profile ``narrative.nice``), so a token step already under way when a study arrives takes
the smaller share of the cores. A crash or a stop loses no job: pending jobs are in the state
database and resume at the next start (or time out there).

What the model sees: for a radiograph, the image of the urgent finding with the highest
score, preprocessed as Gemma 3's processor does (resized to the model's square, no padding);
for CT, the slab that drove the urgent finding, as a maximum-intensity projection in
MedGemma's three-window convention (2250/−100, 350/40, 80/40 as RGB).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from . import ct, imaging
from .bundle import Bundle, Preprocessing, Report
from .dicom.instance_file import Rereading, read_again
from .errors import EdgeTriageError, InputRejected, describe
from .gemma import ChatPrompt, GenerationStopped, GenerationTimeout, OnnxGemma3, TextConfig
from .logs import fields
from .priority import lower_thread_priority
from .results import Narrative, NarrativeStatus, StudyResult, iso
from .store import NarrativeJob, Store

logger = logging.getLogger(__name__)

REREADING = Rereading(
    gone="the image is no longer in the watch folder",
    replaced="the image was replaced by another instance since it was scored",
    unreadable="the image is no longer readable ({error})",
)
"""What the image read again for a narrative can have become (``narrative_error``)."""

RETRY_SECONDS = 5.0
"""After a job could not be committed (the store failed), the worker waits this long."""


@dataclass(frozen=True)
class Source:
    """The image a narrative is written from: instance paths as the store records them
    (relative to the watch folder) and their SOP Instance UIDs, checked when the files are
    read again (jobs stored before the UIDs were recorded have none: no check)."""

    kind: str  # "radiograph" | "ct"
    paths: list[str]
    label: str  # published as narrative.source; UIDs only, never PHI
    uids: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Source:
        return cls(**json.loads(text))


@dataclass
class Outcome:
    status: NarrativeStatus
    narrative: Narrative | None = None
    error: str | None = None


class NarrativeModel:
    """The bundle's language model, its prompt and its image preprocessing."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        providers: list[str],
        threads: int = 0,
        max_new_tokens: int | None = None,
    ) -> None:
        report = bundle.manifest.report
        if report is None:
            raise EdgeTriageError(f"bundle {bundle.root} has no report section")
        self.report: Report = report
        root = bundle.root
        self.llm = OnnxGemma3(
            root / report.graphs.vision.file,
            root / report.graphs.embed.file,
            root / report.graphs.decoder.file,
            TextConfig.from_fields(report.text),
            threads=threads,
            providers=providers,
        )
        self.prompt = ChatPrompt(
            root / report.tokenizer,
            root / report.chat_template,
            bos=report.tokens.bos,
            boi=report.tokens.boi,
            image=report.tokens.image,
            eoi=report.tokens.eoi,
            tokens_per_image=report.image.tokens_per_image,
        )
        self.spec = Preprocessing(
            input_size=report.image.size,
            mean=report.image.mean,
            std=report.image.std,
            pad_to_square=False,
        )
        self.max_new_tokens = max_new_tokens or report.max_new_tokens
        self.ids = {
            "radiograph": self.prompt.input_ids(report.prompts.radiograph),
            "ct": self.prompt.input_ids(report.prompts.ct),
        }

    def pixels(self, source: Source, read: Callable[[str], pydicom.Dataset]) -> np.ndarray:
        """(1, 3, N, N) float32 model input for ``source``; InputRejected if unusable."""
        if source.kind == "radiograph":
            return imaging.preprocess(read(source.paths[0]), self.spec)[None]
        mip = ct.max_projection(ct.slice_hu(read(path)) for path in source.paths)
        return ct.slab_tensor(mip, "three_windows", self.spec)[None]

    def write(
        self,
        source: Source,
        pixels: np.ndarray,
        *,
        deadline: float,
        before_step: Callable[[], None],
    ) -> tuple[str, int, bool]:
        """(text, tokens generated, truncated by max_new_tokens). Raises GenerationTimeout
        past ``deadline`` (``time.monotonic()``), GenerationStopped from ``before_step``."""
        tokens = self.llm.generate(
            self.ids[source.kind],
            pixels,
            self.max_new_tokens,
            deadline=deadline,
            before_step=before_step,
        )
        ended = bool(tokens) and tokens[-1] in self.llm.config.eos_token_ids
        return self.prompt.decode(tokens), len(tokens), not ended


class NarrativeWorker:
    """The thread that writes narratives (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        bundle: Bundle,
        *,
        watch_dir: Path,
        providers: list[str],
        threads: int,
        max_new_tokens: int | None,
        nice: int = 0,
        budget_seconds: float = 120.0,
        scoring_idle: threading.Event,
        stop: threading.Event,
        topic: Callable[[str], str],
        published: Callable[[], None],
    ) -> None:
        self.store = store
        self.bundle = bundle
        self.watch_dir = watch_dir
        self.providers = providers
        self.threads = threads
        self.max_new_tokens = max_new_tokens
        self.nice = nice
        self.budget_seconds = budget_seconds
        """From a flag to its narrative; the scoring thread sets each job's deadline with it."""
        self.scoring_idle = scoring_idle
        self.stop = stop
        self.topic = topic
        self.published = published
        self.model: NarrativeModel | None = None
        self.load_error: str | None = None
        self.last_error: str | None = None
        self._wake = threading.Event()
        self.ready = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    # -- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        self._lower_priority()
        self._load()
        while not self.stop.is_set():
            self._wake.clear()
            jobs = self.store.narrative_jobs()
            for job in jobs:
                if self.stop.is_set():
                    return
                try:
                    self._do(job)
                except GenerationStopped:
                    logger.info(
                        "stopping: narrative of study %s resumes at next start",
                        job.study_instance_uid,
                    )
                    return
                except Exception as exc:  # e.g. the store failed; the job stays
                    self.last_error = f"narrative: {describe(exc)}"
                    logger.exception(
                        "narrative of study %s could not be published; retried in %g s",
                        job.study_instance_uid,
                        RETRY_SECONDS,
                    )
                    self.stop.wait(RETRY_SECONDS)
                    break
            if not jobs:
                self._wake.wait(0.5)

    def _lower_priority(self) -> None:
        """Nice this thread; ONNX Runtime's threads, created by it when the model loads,
        inherit the value (Linux schedules threads, and nice is per thread). Between two
        tokens the worker waits for scoring; during one (a prefill can take seconds on a
        CPU) the encoder's threads get the larger share of the cores. ``nice`` is added to
        the thread's own value: a service started with ``Nice=5`` keeps the narrative
        ``nice`` steps below its scorer (an absolute value could even raise its priority)."""
        lower_thread_priority(self.nice, "narratives")

    def _load(self) -> None:
        report = self.bundle.manifest.report
        assert report is not None
        start = time.monotonic()
        try:
            self.model = NarrativeModel(
                self.bundle,
                providers=self.providers,
                threads=self.threads,
                max_new_tokens=self.max_new_tokens,
            )
        except Exception as exc:
            self.load_error = f"the narrative model could not be loaded: {exc}"
            logger.error("narratives: %s; urgent results get narrative_status 'failed'", exc)
        else:
            logger.info(
                "narrative model %s loaded on %s in %.1f s",
                report.name,
                self.model.llm.provider,
                time.monotonic() - start,
            )
        self.ready.set()

    def _gate(self) -> None:
        """Before every token: wait while a study is being scored; stop when asked."""
        while not self.scoring_idle.wait(0.2):
            if self.stop.is_set():
                raise GenerationStopped
        if self.stop.is_set():
            raise GenerationStopped

    def _read(self, relpath: str, sop_instance_uid: str | None) -> pydicom.Dataset:
        return read_again(self.watch_dir, relpath, sop_instance_uid or None, REREADING)

    def _do(self, job: NarrativeJob) -> None:
        outcome = self._outcome(job)
        now = time.time()

        def build(flag: StudyResult, revision: int, alert_id: str) -> StudyResult:
            return flag.with_narrative(
                revision=revision,
                alert_id=alert_id,
                status=outcome.status,
                published_at=iso(now),
                narrative=outcome.narrative,
                error=outcome.error,
            )

        topic = self.topic(job.study_instance_uid)
        revision = self.store.commit_narrative(job, topic, build, now)
        if revision is None:
            logger.info(
                "narrative of study %s revision %d dropped: the study was re-opened",
                job.study_instance_uid,
                job.revision,
            )
            return
        self.published()
        logger.info(
            "study %s revision %d: narrative %s%s",
            job.study_instance_uid,
            revision,
            outcome.status,
            f" ({outcome.narrative.tokens} tokens, {outcome.narrative.generation_ms:.0f} ms)"
            if outcome.narrative
            else f" ({outcome.error})"
            if outcome.error
            else "",
            extra=fields(
                study_uid=job.study_instance_uid,
                revision=revision,
                stage="narrative",
                duration_ms=outcome.narrative.generation_ms if outcome.narrative else None,
            ),
        )

    def _outcome(self, job: NarrativeJob) -> Outcome:
        source = Source.from_json(job.source)
        left = job.deadline - time.time()
        if left <= 0:  # e.g. found after a restart
            return Outcome("timeout")
        if self.model is None:
            return Outcome("failed", error=self.load_error or "no narrative model")
        deadline = time.monotonic() + left
        start = time.perf_counter()
        try:
            self._gate()
            uids = dict(zip(source.paths, source.uids, strict=False))
            pixels = self.model.pixels(source, lambda path: self._read(path, uids.get(path)))
            text, tokens, truncated = self.model.write(
                source, pixels, deadline=deadline, before_step=self._gate
            )
        except GenerationTimeout as exc:
            logger.info(
                "narrative of study %s not ready in time (%d tokens written)",
                job.study_instance_uid,
                len(exc.tokens),
            )
            return Outcome("timeout")
        except InputRejected as exc:
            return Outcome("failed", error=exc.reason)
        except GenerationStopped:
            raise
        except Exception as exc:
            logger.exception("narrative of study %s failed", job.study_instance_uid)
            return Outcome("failed", error=f"{type(exc).__name__}: {exc}")
        narrative = Narrative(
            text=text,
            model=self.model.report.name,
            provider=self.model.llm.provider,
            source=source.label,
            tokens=tokens,
            generation_ms=round((time.perf_counter() - start) * 1000, 1),
            truncated=truncated,
        )
        return Outcome("ok", narrative=narrative)
