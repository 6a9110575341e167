"""How the workers name what they publish and log: topics, files, ``P/rejected`` messages."""

from __future__ import annotations

from ..identifiers import file_id, topic
from ..intake.scp import published_path
from ..results import RejectedFile
from ..store import Message


class Naming:
    """Pure: the topic base, the file-id key and ``phi.publish_paths``; any thread."""

    def __init__(self, topic_base: str, file_id_key: bytes, *, publish_paths: bool) -> None:
        self.topic_base = topic_base
        self.file_id_key = file_id_key
        self.publish_paths = publish_paths

    def topic(self, *levels: str) -> str:
        """``P/level/…``: every level checked (a topic segment, or a UID for study topics),
        so that no control character or wildcard from a file ever reaches the broker."""
        return topic(self.topic_base, *levels)

    def file_name(self, relpath: str) -> str:
        """How a log line names a file: by its id (``edge-agent status --file``), and by
        its path only when phi.publish_paths (folders are often named after the patient)."""
        name = f"file {file_id(self.file_id_key, relpath)}"
        return f"{name} ({relpath})" if self.publish_paths else name

    def rejected(self, relpath: str, reason: str, sop_uid: str | None) -> Message:
        """``P/rejected``: the file by its id; by its path too when phi.publish_paths."""
        payload = RejectedFile(
            path=published_path(relpath) if self.publish_paths else None,
            file_id=file_id(self.file_id_key, relpath),
            sop_instance_uid=sop_uid,
            reason=reason,
        )
        return Message("rejected", self.topic("rejected"), payload.to_json_bytes())
