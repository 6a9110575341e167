"""C-ECHO and C-STORE of the SR to a real Orthanc, and the reasons given for refusals (by Orthanc,
and by pynetdicom SCPs that refuse the SOP class or answer with a failure status)."""

from __future__ import annotations

import gc
import ssl
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.delivery import make_result
from helpers.orthanc import Orthanc, needs_orthanc
from helpers.pacs import StorageScp
from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedSRStorage,
    Verification,
)

from edge_agent.check import run_check
from edge_agent.config import PacsSettings, load_settings
from edge_agent.devbroker import HOST, Mosquitto, Pki
from edge_agent.pacs.scu import PacsError, Peer, echo, store
from edge_agent.pacs.sr import build_sr
from edge_agent.service import prepare
from edge_agent.simulate.dicom_writer import chest_instance, new_study
from export.findings import default_findings_path, load_findings

# pynetdicom 3.0.4 drops the socket of a refused connection without closing it (transport.py,
# AssociationSocket.connect); CPython closes it at once by reference count, with a
# ResourceWarning that pytest reports as unraisable. Not ours to fix here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CONCEPTS = {f.code: f.concept for f in load_findings(default_findings_path())}


def peer(port: int, called_ae: str = "ORTHANC", timeout: float = 5.0) -> Peer:
    return Peer.from_settings(
        PacsSettings(
            enabled=True,
            host=HOST,
            port=port,
            called_ae=called_ae,
            calling_ae="EDGETRIAGE",
            timeout_seconds=timeout,
        )
    )


def an_sr(seed: int = 1) -> Dataset:
    rng = np.random.default_rng(seed)
    study = new_study(rng, "CR")
    images = [chest_instance(rng, findings={}, study=study, rows=64, cols=64)]
    result = make_result(study.study_instance_uid, 1, "urgent")
    return build_sr(result, images, concepts=CONCEPTS, agent="box-1")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc") as server:
        yield server


@needs_orthanc
def test_echo_and_store_land_in_the_study_once(orthanc: Orthanc) -> None:
    echo(peer(orthanc.dicom_port))
    sr = an_sr()
    store(peer(orthanc.dicom_port), sr)
    store(peer(orthanc.dicom_port), sr)  # a retry: the PACS keeps one copy
    stored = orthanc.instances()
    assert len(stored) == 1
    assert stored[0]["SOPInstanceUID"] == sr.SOPInstanceUID
    assert stored[0]["StudyInstanceUID"] == sr.StudyInstanceUID
    assert stored[0]["SeriesDescription"] == "AI triage"
    assert stored[0]["Modality"] == "SR"


@needs_orthanc
def test_wrong_called_ae_is_a_clear_permanent_refusal(orthanc: Orthanc) -> None:
    with pytest.raises(PacsError) as err:
        echo(peer(orthanc.dicom_port, called_ae="NOTTHEPACS"))
    assert "Called AE title not recognised" in err.value.reason
    assert "rejected permanently" in err.value.reason
    assert err.value.retry is False


@needs_orthanc
def test_a_stopped_pacs_is_retried(orthanc: Orthanc) -> None:
    orthanc.stop()
    with pytest.raises(PacsError) as err:
        store(peer(orthanc.dicom_port), an_sr())
    assert "cannot connect" in err.value.reason
    assert err.value.retry is True
    orthanc.start()
    store(peer(orthanc.dicom_port), an_sr())
    assert len(orthanc.instances()) == 1


def test_a_pacs_without_the_sr_sop_class_says_so() -> None:
    scp = StorageScp([CTImageStorage], ae_title="FUSSY")
    try:
        with pytest.raises(PacsError) as err:
            store(peer(scp.port, "FUSSY"), an_sr())
    finally:
        scp.close()
    assert "does not accept the SOP class Enhanced SR Storage" in err.value.reason
    assert err.value.retry is False


@pytest.mark.parametrize(
    ("status", "words", "retry"),
    [
        (0xA700, "refused: out of resources (status 0xA700)", True),
        (0xA900, "error: data set does not match SOP class (status 0xA900)", False),
        (0xC123, "error: cannot understand (status 0xC123)", False),
    ],
)
def test_failure_statuses_are_named(status: int, words: str, retry: bool) -> None:
    scp = StorageScp(
        [EnhancedSRStorage], ae_title="FUSSY", status=status, error_comment="disk full"
    )
    try:
        with pytest.raises(PacsError) as err:
            store(peer(scp.port, "FUSSY"), an_sr())
    finally:
        scp.close()
    assert words in err.value.reason
    assert "disk full" not in err.value.reason  # the PACS's free text may quote PHI
    assert err.value.retry is retry


def test_warning_status_counts_as_stored() -> None:
    scp = StorageScp(
        [EnhancedSRStorage], ae_title="FUSSY", status=0xB000, error_comment="disk full"
    )
    try:
        store(peer(scp.port, "FUSSY"), an_sr())
    finally:
        scp.close()


def check_config(tmp_path: Path, mqtt_port: int, pacs: str) -> Path:
    watch = tmp_path / "incoming"
    watch.mkdir(exist_ok=True)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{tmp_path / "state"}"\nprofile = "x86-cpu"\n'
        f'[mqtt]\nhost = "{HOST}"\nport = {mqtt_port}\n[pacs]\n{pacs}'
    )
    return config


@needs_orthanc
def test_check_echoes_the_pacs_and_names_the_key_at_fault(
    tmp_path: Path, orthanc: Orthanc, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    where = f'enabled = true\nhost = "{HOST}"\nport = {orthanc.dicom_port}\n'
    good = check_config(tmp_path, mosquitto.port, where + 'called_ae = "ORTHANC"\n')
    assert run_check(good) == 0
    out = capsys.readouterr().out
    assert f"ORTHANC@{HOST}:{orthanc.dicom_port} answers C-ECHO and accepts Enhanced SR" in out

    wrong_ae = check_config(tmp_path, mosquitto.port, where + 'called_ae = "OTHER"\n')
    assert run_check(wrong_ae) == 2
    out = capsys.readouterr().out
    assert "pacs.called_ae" in out and "Called AE title not recognised" in out

    orthanc.stop()
    assert run_check(good) == 3
    out = capsys.readouterr().out
    assert "pacs.host/pacs.port: cannot connect" in out
    # The daemon's own preflight does not wait for the PACS (its outbox keeps the SRs).
    prepare(load_settings(good))


def test_check_says_when_the_pacs_refuses_the_sr_class(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    scp = StorageScp([CTImageStorage, Verification], ae_title="FUSSY")
    try:
        config = check_config(
            tmp_path,
            mosquitto.port,
            f'enabled = true\nhost = "{HOST}"\nport = {scp.port}\ncalled_ae = "FUSSY"\n',
        )
        assert run_check(config) == 3
    finally:
        scp.close()
    out = capsys.readouterr().out
    assert "does not accept the SOP class Enhanced SR Storage" in out


@needs_orthanc
def test_dicom_over_tls_with_the_pacs_ca(tmp_path: Path) -> None:
    fleet = Pki(tmp_path / "ca")
    rogue = Pki(tmp_path / "rogue", ca_name="another CA")
    cert, key = fleet.issue("pacs", "pacs.hospital.lan", dns=["localhost"], ip=[HOST])
    server = Orthanc(tmp_path / "orthanc", tls=(cert, key, fleet.ca_cert))
    server.start()
    try:

        def tls_peer(ca: Path) -> Peer:
            return Peer.from_settings(
                PacsSettings(
                    enabled=True,
                    host=HOST,
                    port=server.dicom_port,
                    called_ae="ORTHANC",
                    timeout_seconds=5,
                    tls_ca=ca,
                )
            )

        echo(tls_peer(fleet.ca_cert))
        sr = an_sr()
        store(tls_peer(fleet.ca_cert), sr)
        assert [i["SOPInstanceUID"] for i in server.instances()] == [sr.SOPInstanceUID]
        with pytest.raises(PacsError) as err:  # a certificate of another CA: refused
            echo(tls_peer(rogue.ca_cert))
        assert err.value.reason.startswith(f"TLS refused with ORTHANC@{HOST}:")
        assert "certificate verify failed: self-signed certificate in certificate chain" in (
            err.value.reason
        )
        assert "not signed by pacs.tls_ca" in err.value.reason
        assert err.value.retry is False
    finally:
        server.stop()
        # pynetdicom leaves the socket of a failed handshake to the garbage collector:
        # collected here, inside this module's filter, not at the end of the session.
        gc.collect()


@pytest.mark.slow
@needs_orthanc
def test_tls_with_the_client_certificate_the_pacs_requires(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PACS that requires a client certificate of its CA: the agent's pair
    (``tls_cert``/``tls_key``) is presented; none, or one of another CA, is refused with
    what TLS said and the keys to look at, by ``store`` and by ``edge-agent check``."""
    fleet = Pki(tmp_path / "ca")
    rogue = Pki(tmp_path / "rogue", ca_name="another CA")
    cert, key = fleet.issue("pacs", "pacs.hospital.lan", dns=["localhost"], ip=[HOST])
    client = fleet.issue("agent", "EDGETRIAGE")
    stranger = rogue.issue("agent", "EDGETRIAGE")
    server = Orthanc(tmp_path / "orthanc", tls=(cert, key, fleet.ca_cert), require_client_cert=True)
    server.start()
    try:

        def pacs_keys(pair: tuple[Path, Path] | None) -> str:
            keys = f'tls_ca = "{fleet.ca_cert}"\n'
            if pair is not None:
                keys += f'tls_cert = "{pair[0]}"\ntls_key = "{pair[1]}"\n'
            return (
                f'enabled = true\nhost = "{HOST}"\nport = {server.dicom_port}\n'
                f'called_ae = "ORTHANC"\ntimeout_seconds = 5\n{keys}'
            )

        def tls_peer(pair: tuple[Path, Path] | None) -> Peer:
            config = check_config(tmp_path, mosquitto.port, pacs_keys(pair))
            return Peer.from_settings(load_settings(config).pacs)

        sr = an_sr()
        store(tls_peer(client), sr)
        assert [i["SOPInstanceUID"] for i in server.instances()] == [sr.SOPInstanceUID]
        assert run_check(check_config(tmp_path, mosquitto.port, pacs_keys(client))) == 0
        assert "answers C-ECHO over TLS and accepts Enhanced SR" in capsys.readouterr().out

        refusals = {
            None: "tlsv13 alert certificate required (the PACS requires a client certificate",
            stranger: "tlsv1 alert unknown ca (the PACS does not trust the client certificate",
        }
        for pair, words in refusals.items():
            with pytest.raises(PacsError) as err:
                store(tls_peer(pair), an_sr(2))
            assert err.value.reason.startswith(f"TLS refused with ORTHANC@{HOST}:")
            assert words in err.value.reason
            assert err.value.retry is False
            assert run_check(check_config(tmp_path, mosquitto.port, pacs_keys(pair))) == 2
            out = capsys.readouterr().out
            assert "pacs.tls_ca/tls_cert/tls_key" in out and words in out
        # Over TLS 1.2 this Orthanc has no cipher for its EC key: the handshake's alert
        # says no more than "handshake failure", and so does the reason.
        tls12 = tls_peer(client)
        assert tls12.tls is not None
        tls12.tls.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(PacsError) as err:
            echo(tls12)
        assert "sslv3 alert handshake failure (no TLS version or cipher in common" in (
            err.value.reason
        )
        assert len(server.instances()) == 1
    finally:
        server.stop()
        gc.collect()  # see test_dicom_over_tls_with_the_pacs_ca
