"""One configuration tree for the agent.

Sources, lowest to highest priority: defaults, a TOML file (``--config FILE`` or
``EDGE_AGENT_CONFIG``), environment variables ``EDGE_AGENT_*`` with ``__`` between nested
keys. Unknown keys are an error in every source, and every error names its key path.
Secrets are never values here: ``mqtt.password_file`` names a file, resolved against
``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) when it is a bare name.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6): the same parser, as a backport
    import tomli as tomllib

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .errors import ConfigError
from .identifiers import topic_prefix, topic_segment
from .results import TriageLevel

ENV_PREFIX = "EDGE_AGENT_"
ENV_CONFIG_FILE = "EDGE_AGENT_CONFIG"
# DICOM AE VR: at most 16 characters of the default repertoire without backslash or controls
# (PS3.5 6.2); leading and trailing spaces are not significant.
AE_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"\\"}
MQTT_CLIENT_ID_MAX_BYTES = 128
"""MQTT 3.1.1 servers must take 23 bytes, MQTT 5 brokers take more (Mosquitto up to 65535);
128 is far beyond any useful id and keeps a pasted blob out of the CONNECT packet."""

Finite = AllowInfNan(False)
"""Every float setting is finite (``inf``/``nan`` from a file or the environment is refused);
each also has a lower and an upper bound (tests/test_config.py checks that every number
setting has both)."""
FiniteFloat = Annotated[float, Finite]


def _path_text(value: Any) -> Any:
    """An empty path would silently mean the current folder: refused, like a NUL byte."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty (leave the setting out for its default)")
        if "\0" in value:
            raise ValueError("must not contain a NUL character")
    return value


SettingPath = Annotated[Path, BeforeValidator(_path_text)]
OptionalPath = Annotated[Path | None, BeforeValidator(_path_text)]


def _text_list(value: Any) -> Any:
    """A list setting given as text (the environment): a JSON list, or comma-separated."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(
                'is not a valid JSON list: write ["A", "B"], or A,B (comma-separated)'
            ) from None
    return [part.strip() for part in text.split(",") if part.strip()]


TextList = Annotated[list[str], NoDecode, BeforeValidator(_text_list)]
"""A list of strings; in the environment either JSON (``["CR1", "CR2"]``) or ``CR1,CR2``."""


def _printable(value: str) -> bool:
    return all(c.isprintable() and not c.isspace() for c in value)


def _host(value: str) -> str:
    host = value.strip()
    if not host:
        raise ValueError("must not be empty: the broker's host name or IP address")
    if len(host) > 253 or not _printable(host):
        raise ValueError(
            "must be a host name or IP address (at most 253 characters, no spaces or "
            "control characters)"
        )
    return host


def _client_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not value:
        raise ValueError("must not be empty (leave it out for edge-agent-{site}-{device_id})")
    if not _printable(value):
        raise ValueError("must be printable characters without spaces")
    if len(value.encode()) > MQTT_CLIENT_ID_MAX_BYTES:
        raise ValueError(f"must be at most {MQTT_CLIENT_ID_MAX_BYTES} bytes (UTF-8)")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def tls_files(ca: Path | None, cert: Path | None, key: Path | None) -> None:
    """The TLS rule of every client section (mqtt, pacs): raises ValueError when broken."""
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key must be given together")
    if cert is not None and ca is None:
        # Without tls_ca the client would connect in plain TCP and ignore the certificate.
        raise ValueError("tls_ca is required when tls_cert/tls_key are set")


class MqttSettings(_Section):
    host: Annotated[str, AfterValidator(_host)] = Field(
        default="localhost", description="Broker host name or address."
    )
    port: int = Field(default=1883, ge=1, le=65535, description="Broker TCP port.")
    username: str | None = Field(default=None, description="User name for the broker, if any.")
    password_file: OptionalPath = Field(
        default=None,
        description=(
            "File holding the broker password (first line). A bare name is looked up in "
            "$CREDENTIALS_DIRECTORY, where systemd's LoadCredential= puts it."
        ),
    )
    tls_ca: OptionalPath = Field(
        default=None, description="CA certificate (PEM); when set, plain TCP is refused."
    )
    tls_cert: OptionalPath = Field(default=None, description="Client certificate (PEM), optional.")
    tls_key: OptionalPath = Field(default=None, description="Client private key (PEM), optional.")
    topic_prefix: str = Field(
        default="edge-triage/v1",
        description="First topic levels, before site and device_id: levels of letters, "
        "digits, '_', '-', separated by '/'.",
    )
    client_id: Annotated[str | None, AfterValidator(_client_id)] = Field(
        default=None,
        description="MQTT client id (at most 128 bytes); default edge-agent-{site}-{device_id}.",
    )
    keepalive_seconds: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive.")
    status_interval_seconds: FiniteFloat = Field(
        default=60.0,
        ge=0.1,
        le=3600,
        description="How often the retained status message is refreshed.",
    )
    outbox_max_messages: int = Field(
        default=10000,
        ge=10,
        le=10_000_000,
        description=(
            "Outbox cap. When full, the oldest routine, not_scored and rejected-file messages "
            "are dropped first, then review results; urgent results never are."
        ),
    )
    renotify_seconds: FiniteFloat = Field(
        default=0.0,
        ge=0,
        le=7 * 86400,
        description=(
            "Publish an unacknowledged urgent result again (same alert_id, notify_count + 1) "
            "this long after its last delivery; 0 turns re-notification off."
        ),
    )
    renotify_limit: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="At most this many re-notifications of one urgent result.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description=(
            "A message the broker refuses (PUBACK reason >= 0x80), or that breaks the "
            "connection each time it is sent alone, is set aside after this many attempts: "
            "kept in the outbox and retried later, while the other messages go on."
        ),
    )
    set_aside_retry_seconds: float = Field(
        default=900.0,
        ge=1,
        le=86400,
        description="How often set-aside messages are tried again (also at every start).",
    )
    stalled_after_seconds: float = Field(
        default=300.0,
        ge=1,
        le=86400,
        description=(
            "The agent reports itself NOT HEALTHY when messages wait and none has left the "
            "outbox for this long although the broker accepts the connection."
        ),
    )

    @field_validator("renotify_seconds")
    @classmethod
    def _renotify(cls, v: float) -> float:
        if 0 < v < 1:  # the schedule is looked at once a second
            raise ValueError("must be 0 (off) or at least 1")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _topic(cls, v: str) -> str:
        return topic_prefix(v)

    @model_validator(mode="after")
    def _tls_pair(self) -> MqttSettings:
        tls_files(self.tls_ca, self.tls_cert, self.tls_key)
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username (a password alone is never sent)")
        return self

    def password(self) -> str | None:
        """Read the password from ``password_file`` (never stored in the config)."""
        if self.password_file is None:
            return None
        path = self.password_file
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and not path.is_absolute() and len(path.parts) == 1:
            path = Path(creds) / path
        try:
            return path.read_text().splitlines()[0] if path.stat().st_size else ""
        except OSError as exc:
            raise ConfigError("mqtt.password_file", f"cannot read {path}: {exc.strerror}") from exc


class IntakeSettings(_Section):
    poll_interval_seconds: FiniteFloat = Field(
        default=1.0, ge=0.05, le=60, description="How often the watch folder is scanned."
    )
    file_stable_seconds: FiniteFloat = Field(
        default=2.0,
        ge=0,
        le=3600,
        description="A file is read once its size and mtime have not changed for this long.",
    )
    ignore_suffixes: TextList = Field(
        default=[".part", ".tmp", ".partial", ".filepart", ".crdownload", "~"],
        description="Names ending so are still being written and are never read.",
    )
    watch_mode: Literal["auto", "inotify", "polling"] = Field(
        default="auto",
        description="How new files are noticed: 'inotify' (kernel events), 'polling' (walk "
        "the folder every poll_interval_seconds) or 'auto' (inotify on a local filesystem, "
        "polling on a network one such as NFS/SMB/FUSE, and whenever inotify fails).",
    )
    rescan_seconds: FiniteFloat = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="With inotify, the whole folder is still walked this often, so that a "
        "missed event never loses a file.",
    )
    stall_seconds: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="One step of the intake (walking the folder, reading one file) that takes "
        "longer than this (a hung network mount) makes the agent NOT HEALTHY, with the reason, "
        "until the step ends.",
    )
    retry_max_seconds: float = Field(
        default=300.0,
        ge=1,
        le=3600,
        description="A file that cannot be read (permission, I/O error) is tried again after "
        "1 s, then after twice as long each time, up to this.",
    )


LUNG_KERNELS = [
    "*LUNG*",  # GE LUNG, Canon/Toshiba LUNG, many others
    "B6?[fs]",  # Siemens B60f/B60s, B70f, ... (sharp, lung)
    "B7?[fs]",
    "BR6*",  # Siemens Br60, Br64 (ADMIRE naming)
    "BL5*",  # Siemens Bl57 (lung)
    "I7?[fs]",  # Siemens I70f (iterative, lung)
    "FC5?",  # Canon/Toshiba FC51-FC56 (lung)
    "Y[A-D]",  # Philips YA-YD (lung)
    "L",  # Philips L (lung)
]


class SelectionSettings(_Section):
    """Which images of a study are scored (in the spirit of MONAI Deploy's series selector).

    CR/DX: frontal (PA/AP) images; laterals and other views are never scored. CT: the axial
    series best suited to lung nodules: slice thickness in range, enough slices, consistent
    geometry; a lung (sharp) reconstruction kernel preferred, then the thinnest slices.
    """

    radiograph_unmarked_views: bool = Field(
        default=True,
        description="When a CR/DX study has no PA/AP image, score images whose view is not "
        "marked at all (no ViewPosition, no lateral hint). Laterals are never scored.",
    )
    ct_min_slice_thickness_mm: FiniteFloat = Field(
        default=0.5, gt=0, le=50, description="Thinnest CT slices accepted (SliceThickness, mm)."
    )
    ct_max_slice_thickness_mm: FiniteFloat = Field(
        default=5.0, gt=0, le=50, description="Thickest CT slices accepted (SliceThickness, mm)."
    )
    ct_min_slices: int = Field(
        default=30, ge=2, le=10000, description="Fewest slices a CT series needs to be scored."
    )
    ct_axial_tolerance_degrees: FiniteFloat = Field(
        default=15.0,
        ge=0,
        le=45,
        description="A CT series is axial when its slice normal is within this angle of the "
        "patient's head-foot axis (gantry tilt included).",
    )
    ct_lung_kernels: TextList = Field(
        default=LUNG_KERNELS,
        description="ConvolutionKernel patterns (shell-style, case-insensitive) of lung "
        "reconstructions, preferred over other kernels.",
    )

    @field_validator("ct_max_slice_thickness_mm")
    @classmethod
    def _thickness_range(cls, v: float, info: Any) -> float:
        low = info.data.get("ct_min_slice_thickness_mm")
        if low is not None and v < low:
            raise ValueError("must be at least ct_min_slice_thickness_mm")
        return v


class PhiSettings(_Section):
    publish_accession_number: bool = Field(
        default=False,
        description="Put AccessionNumber in results (needed by some worklists). Off by default.",
    )
    publish_paths: bool = Field(
        default=False,
        description="Put the file's path in P/rejected messages (and in the log lines that "
        "name a file). Off by default: folders are often named after the patient; messages "
        "carry a file_id that 'edge-agent status --file' resolves on the box.",
    )


class MetricsSettings(_Section):
    port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Prometheus /metrics port; 0 (default) serves no metrics.",
    )
    bind_address: str = Field(
        default="127.0.0.1",
        description="Address the metrics endpoint listens on; 127.0.0.1 keeps it on the box "
        "(a local exporter or SSH tunnel); 0.0.0.0 for a fleet scraper on the network.",
    )

    @field_validator("bind_address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"{v!r} is not an IP address") from exc
        return v


def ae_title(value: str) -> str:
    """A valid DICOM AE title (1-16 characters, no backslash or control characters), stripped."""
    title = value.strip(" ")
    if not title:
        raise ValueError("must not be empty or only spaces")
    if len(title) > 16:
        raise ValueError("must be at most 16 characters")
    if any(c not in AE_CHARS for c in title):
        raise ValueError("must be printable ASCII without backslash (DICOM AE title)")
    return title


class ScpSettings(_Section):
    """The DICOM Storage SCP: modalities push instances (C-STORE) instead of writing a folder."""

    enabled: bool = Field(
        default=False, description="Listen for C-STORE (and C-ECHO) from modalities."
    )
    ae_title: str = Field(
        default="EDGETRIAGE", description="This agent's AE title (called AE title to dial)."
    )
    bind_address: str = Field(
        default="0.0.0.0",
        description="IP address to listen on: 0.0.0.0 (every IPv4 interface), :: (every "
        "interface), or one interface's address to listen on the modality network only.",
    )
    port: int = Field(default=11112, ge=1, le=65535, description="TCP port to listen on.")
    allowed_calling_aes: TextList = Field(
        default=[],
        description="Calling AE titles allowed to associate; others are rejected. Empty: any "
        "caller is accepted (a warning is logged at start).",
    )
    receive_dir: OptionalPath = Field(
        default=None,
        description="Folder the agent writes received instances into, as "
        "<StudyInstanceUID>/<SOPInstanceUID>.dcm, and reads them from. Unset: "
        "<state_dir>/received.",
    )
    max_pdu: int = Field(
        default=65536,
        ge=0,
        le=2**32 - 1,
        description="Largest PDU the agent receives (bytes); 0 means no limit.",
    )
    max_associations: int = Field(
        default=10, ge=1, le=100, description="Associations served at the same time."
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        return ae_title(v)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _calling(cls, v: list[str]) -> list[str]:
        return [ae_title(t) for t in v]

    @field_validator("bind_address")
    @classmethod
    def _address(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v.strip()))
        except ValueError as exc:
            raise ValueError("must be an IPv4 or IPv6 address, e.g. 0.0.0.0") from exc

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, v: int) -> int:
        if 0 < v < 4096:
            raise ValueError("must be 0 (no limit) or at least 4096")
        return v

    def receive_folder(self, state_dir: Path) -> Path:
        """``receive_dir``, or ``<state_dir>/received`` when it is unset; absolute."""
        folder = self.receive_dir if self.receive_dir is not None else state_dir / "received"
        return Path(os.path.abspath(folder))


TRIAGE_LEVELS: tuple[str, ...] = typing.get_args(TriageLevel)


class PacsSettings(_Section):
    """The site's PACS: a DICOM Structured Report per study result, sent with C-STORE."""

    enabled: bool = Field(
        default=False,
        description="Send each result of the chosen levels to the PACS as a DICOM SR (in the "
        "study it describes; it carries the patient and study modules, so it goes only there).",
    )
    host: Annotated[str, AfterValidator(_host)] = Field(
        default="localhost", description="PACS host name or address."
    )
    port: int = Field(default=104, ge=1, le=65535, description="PACS DICOM port.")
    called_ae: str = Field(default="PACS", description="The PACS's AE title (called AE title).")
    calling_ae: str = Field(
        default="EDGETRIAGE", description="This agent's AE title when it calls the PACS."
    )
    levels: TextList = Field(
        default=["urgent", "review"],
        min_length=1,
        description="Triage levels whose results are sent: urgent, review, routine, not_scored.",
    )
    timeout_seconds: FiniteFloat = Field(
        default=30.0,
        ge=1,
        le=600,
        description="How long to wait for the PACS to connect, answer an association or a "
        "C-ECHO/C-STORE before the attempt counts as failed.",
    )
    retry_max_seconds: FiniteFloat = Field(
        default=300.0,
        ge=1,
        le=86400,
        description="A result the PACS did not store is tried again after 2 s, then after "
        "twice as long each time, at most this long apart; it is never given up.",
    )
    tls_ca: OptionalPath = Field(
        default=None, description="CA certificate (PEM); when set, DICOM runs over TLS."
    )
    tls_cert: OptionalPath = Field(default=None, description="Client certificate (PEM), optional.")
    tls_key: OptionalPath = Field(default=None, description="Client private key (PEM), optional.")

    @field_validator("called_ae", "calling_ae")
    @classmethod
    def _ae(cls, v: str) -> str:
        return ae_title(v)

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[str]) -> list[str]:
        for level in v:
            if level not in TRIAGE_LEVELS:
                raise ValueError(f"{level!r} is not one of {', '.join(TRIAGE_LEVELS)}")
        if len(set(v)) != len(v):
            raise ValueError("lists a level twice")
        return v

    @model_validator(mode="after")
    def _tls(self) -> PacsSettings:
        tls_files(self.tls_ca, self.tls_cert, self.tls_key)
        return self


NarrativeBudget = Annotated[float, Finite, Field(gt=0, le=3600)]
"""Seconds from an urgent flag to its narrative (config and profile take the same bounds)."""


class NarrativeSettings(_Section):
    enabled: bool | None = Field(
        default=None,
        description="Draft narratives for urgent studies (needs a bundle with a report "
        "section); unset: as the profile's [narrative] enabled says.",
    )
    time_budget_seconds: NarrativeBudget | None = Field(
        default=None,
        description="Seconds from the flag to its narrative, else 'timeout'; unset: the profile's.",
    )


def listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port in 1..65535, e.g. 127.0.0.1:8080")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"{host!r} is not an IP address") from exc
    return host, int(port)


class BoardSettings(_Section):
    """The triage board (``edge-agent board``): the web page that shows every box's results."""

    listen: str = Field(
        default="127.0.0.1:8080",
        description="Address the board serves on, HOST:PORT ([::1]:8080 for IPv6). Keep it on "
        "loopback behind a TLS reverse proxy; 0.0.0.0:8080 serves plain HTTP to the network.",
    )
    users_file: Path = Field(
        default=Path("/etc/edge-triage-board/users"),
        description="Accounts, one 'name:argon2 hash' a line (edge-agent board add-user).",
    )
    state_file: Path = Field(
        default=Path("/var/lib/edge-triage-board/board.sqlite3"),
        description="The board's SQLite: results, box status, rejected files, acks, audit log.",
    )
    auth: Literal["password", "proxy"] = Field(
        default="password",
        description="'password': the login form against users_file; 'proxy': a trusted "
        "reverse proxy authenticates and names the user in proxy_header.",
    )
    proxy_header: str = Field(
        default="X-Remote-User",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="With auth = 'proxy': the request header holding the user name.",
    )
    trusted_proxies: list[str] = Field(
        default=["127.0.0.1", "::1"],
        description="With auth = 'proxy': addresses whose proxy_header is believed; a request "
        "from elsewhere is refused.",
    )
    client_id: str = Field(
        default="edge-triage-board",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="MQTT client id (its persistent session); unique per board on a broker.",
    )
    mqtt_session_expiry_hours: float = Field(
        default=168.0,
        gt=0,
        le=24 * 365,
        description="The broker keeps the board's session (results published while the board "
        "is down) this long.",
    )
    max_wait_minutes: float = Field(
        default=60.0,
        gt=0,
        le=7 * 24 * 60,
        description="A study older than this (since complete) and not acknowledged is "
        "highlighted whatever its level.",
    )
    worklist_hours: float = Field(
        default=24.0,
        gt=0,
        le=24 * 90,
        description="The worklist shows studies completed this recently; older ones are found "
        "by search.",
    )
    viewer_url: str | None = Field(
        default=None,
        description="'Open in viewer' link, an http(s) URL template with "
        "{study_instance_uid}, e.g. https://pacs/ohif/viewer?StudyInstanceUIDs="
        "{study_instance_uid}. Unset: no link.",
    )
    sound: bool = Field(default=True, description="Play a short tone when an urgent row arrives.")
    cookie_secure: bool = Field(
        default=False,
        description="Mark the session cookie Secure even when the request looks like plain "
        "HTTP (it is always Secure on HTTPS, also via a proxy's X-Forwarded-Proto).",
    )
    session_hours: float = Field(
        default=12.0, gt=0, le=24 * 7, description="A login lasts this long."
    )
    login_attempts_per_minute: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Failed logins allowed per minute from one address and for one user name.",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        listen_address(v)
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_address(item)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address") from exc
        return v

    @field_validator("viewer_url")
    @classmethod
    def _viewer(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("https://", "http://")):
            raise ValueError("must be an http:// or https:// URL")
        try:
            v.format(study_instance_uid="1.2.3")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError("may hold only the {study_instance_uid} placeholder") from exc
        if "{study_instance_uid}" not in v:
            raise ValueError("must contain {study_instance_uid}")
        return v


class Settings(BaseSettings):
    """The agent's configuration (see README 'Configuration')."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    watch_dir: SettingPath = Field(
        default=Path("/var/lib/edge-agent/incoming"),
        description="The folder the modality writes DICOM into; the agent only reads it.",
    )
    state_dir: SettingPath = Field(
        default=Path("/var/lib/edge-agent/state"),
        description="Durable state: SQLite database, outbox, engine caches.",
    )
    bundle: OptionalPath = Field(
        default=None,
        description="Engine bundle folder. Unset: the demo bundle shipped in the package.",
    )
    profile: str = Field(
        default="auto",
        description="Device profile: a name in firmware_configs/, a file path, or 'auto'.",
    )
    site: str = Field(
        default="site", description="Topic segment for the site: letters, digits, '_', '-'."
    )
    device_id: str = Field(
        default="box", description="Topic segment for this device: letters, digits, '_', '-'."
    )
    study_quiet_seconds: FiniteFloat = Field(
        default=30.0,
        ge=0.1,
        le=86400,
        description="A study is complete once no new instance has arrived for this long.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level."
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    phi: PhiSettings = Field(default_factory=PhiSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    scp: ScpSettings = Field(default_factory=ScpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    narrative: NarrativeSettings = Field(default_factory=NarrativeSettings)
    board: BoardSettings = Field(default_factory=BoardSettings)
    pacs: PacsSettings = Field(default_factory=PacsSettings)

    _toml_file: ClassVar[Path | None] = None

    @field_validator("site", "device_id")
    @classmethod
    def _segment(cls, v: str) -> str:
        return topic_segment(v)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls, cls._toml_file))

    @property
    def topic_base(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.site}/{self.device_id}"


def read_toml(path: Path, key: str) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a ConfigError under ``key``."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(key, f"{path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            key, f"{path} is not a TOML text file (not UTF-8 at byte {exc.start})"
        ) from exc


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the TOML file; a syntax error names the file and line."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.data: dict[str, Any] = {}
        if path is not None:
            self.data = read_toml(path, "--config")

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def _unknown_env_keys(environ: Mapping[str, str]) -> list[str]:
    """EDGE_AGENT_* variables that name no setting (a typo would otherwise be ignored)."""
    fields = Settings.model_fields
    # Sections are the fields whose type is a section model, read from the model itself so
    # that a new section is never forgotten here.
    sections: dict[str, type[BaseModel]] = {
        name.upper(): info.annotation
        for name, info in fields.items()
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
    }
    bad = []
    for key in environ:
        if not key.startswith(ENV_PREFIX) or key == ENV_CONFIG_FILE:
            continue
        rest = key[len(ENV_PREFIX) :]
        top, _, sub = rest.partition("__")
        if top.lower() not in fields:
            bad.append(key)
        elif sub:
            section = sections.get(top)
            if section is None or sub.lower() not in section.model_fields:
                bad.append(key)
    return bad


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from file, environment and overrides; raise ConfigError naming the key."""
    path = config_file if config_file is not None else os.environ.get(ENV_CONFIG_FILE)
    bad = _unknown_env_keys(os.environ)
    if bad:
        raise ConfigError(bad[0], "unknown setting in the environment")
    Settings._toml_file = Path(path) if path else None
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise config_error_from(exc) from exc
    except SettingsError as exc:
        # A section given as one environment variable (EDGE_AGENT_MQTT=...) must be JSON.
        found = re.search(r'field "([^"]+)"', str(exc))
        field = found.group(1) if found else ""
        raise ConfigError(
            f"{ENV_PREFIX}{field.upper()}" if field else "environment",
            "is not valid JSON; set one key at a time instead, e.g. "
            f"{ENV_PREFIX}{(field or 'MQTT').upper()}__HOST",
        ) from exc
    finally:
        Settings._toml_file = None


def config_errors(exc: ValidationError) -> list[ConfigError]:
    """One ConfigError per problem, each with its dotted key path."""
    out = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        out.append(ConfigError(key, msg))
    return out


def config_error_from(exc: ValidationError) -> ConfigError:
    errors = config_errors(exc)
    first = errors[0]
    if len(errors) > 1:
        rest = "; ".join(str(e) for e in errors[1:])
        return ConfigError(first.key, f"{first.message} (also: {rest})")
    return first
