"""The daemon's workers: each owns its loop and is handed a stop event and what it reads and
writes (Frigate's ``EventProcessor`` shape). What they share outside the store is named in
:mod:`edge_agent.workers.shared`; :class:`edge_agent.service.Agent` builds them and owns
their threads.
"""

from .intake import IntakeWorker
from .naming import Naming
from .scoring import ScoringWorker
from .shared import Shared, StudyQueue, WorkerErrors

__all__ = ["IntakeWorker", "Naming", "ScoringWorker", "Shared", "StudyQueue", "WorkerErrors"]
