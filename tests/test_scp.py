"""The DICOM Storage SCP, with dcmtk's ``storescu``/``echoscu`` as the real peers.

In-process tests drive :class:`~edge_agent.intake.scp.StorageSCP` directly (rejections,
write failures, stopping); the end-to-end test runs the daemon as its own process with a
real Mosquitto, pushes simulated studies (one JPEG-lossless compressed by dcmtk, one with
several instances) and waits for their results.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pydicom
import pytest
from helpers.daemon import (
    MATRIX,
    PHI_MARKERS,
    SITE,
    Collector,
    Daemon,
    assert_no_phi,
    check_payload,
    resolve_file_id,
    write_agent_config,
)
from pydantic import ValidationError
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

from edge_agent.check import run_check
from edge_agent.config import ScpSettings, load_settings
from edge_agent.devbroker import HOST, Mosquitto, free_port, port_open
from edge_agent.errors import ConfigError, ResourceMissing
from edge_agent.intake.scp import (
    ReceivedFolder,
    StorageSCP,
    check_listen,
    published_path,
    store_instance,
    transfer_syntaxes,
)
from edge_agent.simulate import SimulatedStudy, simulate

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("dcmcjpeg") is None,
    reason="dcmtk (storescu, echoscu, dcmcjpeg) is not installed",
)
SMALL = {"rows": 256, "cols": 208}
MODALITY = "MODALITY1"
STUDY = "1.2.826.0.1.3680043.8.498.1"
SOP = "1.2.826.0.1.3680043.8.498.2"


def storescu(
    port: int, *files: Path, calling: str = MODALITY, called: str = "EDGETRIAGE"
) -> subprocess.CompletedProcess[str]:
    """``storescu`` proposing JPEG Lossless (and the uncompressed syntaxes), as a modality set
    to send compressed images does; it sends each file in its own transfer syntax."""
    return subprocess.run(
        ["storescu", "-v", "-xs", "-aet", calling, "-aec", called, HOST, str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=120,
    )


def echoscu(port: int, calling: str = MODALITY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-v", "-aet", calling, "-aec", "EDGETRIAGE", HOST, str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def leftovers(folder: Path) -> list[Path]:
    """Temporary (hidden) files anywhere below ``folder``."""
    return [p for p in folder.rglob(".*")]


def multi_instance_study(out: Path, **matrix: int) -> SimulatedStudy:
    """A simulated CR study with a frontal and a lateral image (the first seed that has one)."""
    for seed in range(40):
        folder = out / f"seed-{seed}"
        (study,) = simulate(folder, studies=1, seed=seed, abnormal=0.5, **matrix)
        if len(study.paths) >= 2:
            return study
        shutil.rmtree(folder)
    raise AssertionError("no simulated study with two instances in 40 seeds")


def jpeg_lossless(study: SimulatedStudy, out: Path) -> list[Path]:
    """The study's files compressed by dcmtk (JPEG Lossless SV1, dcmcjpeg's default)."""
    out.mkdir(parents=True)
    made = []
    for path in study.paths:
        target = out / path.name
        subprocess.run(["dcmcjpeg", str(path), str(target)], check=True, timeout=60)
        assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == JPEGLosslessSV1
        made.append(target)
    return made


# -- configuration ------------------------------------------------------------------------


def test_scp_settings_defaults_and_validation(tmp_path: Path) -> None:
    s = ScpSettings()
    assert (s.enabled, s.ae_title, s.port, s.bind_address) == (
        False,
        "EDGETRIAGE",
        11112,
        "0.0.0.0",
    )
    assert s.receive_folder(tmp_path / "state") == tmp_path / "state" / "received"
    assert ScpSettings(ae_title="  CT ROOM 2 ").ae_title == "CT ROOM 2"
    for bad in (
        {"ae_title": "A" * 17},
        {"ae_title": "   "},
        {"ae_title": "BAD\\AE"},
        {"ae_title": "TAB\tAE"},
        {"allowed_calling_aes": ["OK", "Ü"]},
        {"bind_address": "somewhere"},
        {"max_pdu": 100},
        {"port": 0},
        {"max_associations": 0},
    ):
        with pytest.raises(ValidationError):
            ScpSettings(**bad)


def test_scp_errors_name_their_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[scp]\nenabled = true\nae_title = "THIS-TITLE-IS-TOO-LONG"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert err.value.key == "scp.ae_title"
    cfg.write_text("[scp]\nlisten = 104\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert err.value.key == "scp.listen"
    monkeypatch.setenv("EDGE_AGENT_SCP__PORT", "4242")
    monkeypatch.setenv("EDGE_AGENT_SCP__ALLOWED_CALLING_AES", '["CR1", "DX2"]')
    s = load_settings()
    assert (s.scp.port, s.scp.allowed_calling_aes) == (4242, ["CR1", "DX2"])
    monkeypatch.setenv("EDGE_AGENT_SCP__PROT", "1")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.key == "EDGE_AGENT_SCP__PROT"


# -- pieces -------------------------------------------------------------------------------


def test_transfer_syntaxes_uncompressed_first_then_decodable_compressed() -> None:
    syntaxes = transfer_syntaxes()
    assert syntaxes[0] == ExplicitVRLittleEndian
    assert JPEGLosslessSV1 in syntaxes
    assert "1.2.840.10008.1.2.5" in syntaxes  # RLE
    assert "1.2.840.10008.1.2.4.100" not in syntaxes  # MPEG2: nothing here decodes it
    # lossless compressed before lossy (a peer offering both in one context keeps pixels)
    assert syntaxes.index(JPEGLosslessSV1) < syntaxes.index("1.2.840.10008.1.2.4.50")


def test_store_instance_is_atomic_and_takes_only_uids(tmp_path: Path) -> None:
    final = store_instance(tmp_path, STUDY, SOP, b"x" * 1000)
    assert final == tmp_path / STUDY / f"{SOP}.dcm"
    assert final.read_bytes() == b"x" * 1000
    store_instance(tmp_path, STUDY, SOP, b"y")  # sent again: replaced whole
    assert final.read_bytes() == b"y"
    for study, sop in (("..", SOP), (STUDY, "../../etc/x"), ("1..2", SOP), (STUDY, "")):
        with pytest.raises(ValueError):
            store_instance(tmp_path, study, sop, b"z")
    # the rename fails after the data was written: nothing is left behind
    blocked = tmp_path / STUDY / "1.2.3.dcm"
    (blocked / "inside").mkdir(parents=True)
    with pytest.raises(OSError):
        store_instance(tmp_path, STUDY, "1.2.3", b"z" * 10_000)
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / STUDY).iterdir()) == ["1.2.3.dcm", f"{SOP}.dcm"]


def test_published_path() -> None:
    assert published_path(f"/var/lib/x/received/{STUDY}/{SOP}.dcm") == (
        f"received/{STUDY}/{SOP}.dcm"
    )
    assert published_path("sub dir/a.dcm") == "sub dir/a.dcm"


def test_a_received_file_is_relative_to_the_receive_folder(tmp_path: Path) -> None:
    """Its relpath is relative to its own root (before: the absolute path, which worked only
    because watch_dir / absolute == absolute); the store still records the absolute path, so
    the signatures in an existing state database keep matching."""
    root = tmp_path / "received"
    root.mkdir()
    path = store_instance(root, STUDY, SOP, b"x")
    (ready,) = ReceivedFolder(root).scan(0.0)
    assert ready.relpath == f"{STUDY}/{SOP}.dcm" and ready.root == root
    assert ready.root / ready.relpath == ready.path == path
    assert ready.recorded == str(path)
    assert published_path(ready.recorded) == f"received/{STUDY}/{SOP}.dcm"
    st = path.stat()
    recorded_before = {str(path): (st.st_size, st.st_mtime_ns)}  # as a state database holds it
    assert ReceivedFolder(root, handled=recorded_before).scan(0.0) == []


def test_received_folder_walks_once_then_follows_reports(tmp_path: Path) -> None:
    root = tmp_path / "received"
    root.mkdir()  # the SCP creates it at start
    old = store_instance(root, STUDY, SOP, b"old")
    done = store_instance(root, STUDY, "1.2.9", b"done")
    (root / STUDY / ".1.2.10.dcm.123.part").write_bytes(b"partial")
    st = done.stat()
    folder = ReceivedFolder(root, handled={str(done): (st.st_size, st.st_mtime_ns)})
    (ready,) = folder.scan(0.0)
    assert ready.path == old and ready.recorded == str(old)
    assert folder.still_same(ready)
    assert [f.recorded for f in folder.scan(1.0)] == [str(old)]  # not handled: offered again
    folder.mark_handled(ready)
    assert folder.scan(2.0) == []
    new = store_instance(root, "1.2.5", "1.2.6", b"new")
    assert folder.scan(3.0) == []  # not reported: only the first scan walks
    folder.stored(new)
    assert [f.path for f in folder.scan(4.0)] == [new]


# -- the SCP in this process, dcmtk as the peer -------------------------------------------


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    settings = ScpSettings(
        enabled=True, bind_address=HOST, port=free_port(), allowed_calling_aes=[MODALITY]
    )
    server = StorageSCP(settings, tmp_path / "received")
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=5.0)


@needs_dcmtk
def test_echo_and_store_from_an_allowed_modality(
    scp: StorageSCP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = scp.address[1]
    assert echoscu(port).returncode == 0
    study = multi_instance_study(tmp_path / "modality", **SMALL)
    compressed = jpeg_lossless(study, tmp_path / "jpeg")
    stored: list[Path] = []
    scp.on_stored = stored.append
    run = storescu(port, *compressed)
    assert run.returncode == 0, run.stderr
    assert len(stored) == len(compressed)
    for sent in compressed:
        study_uid, sop_uid = uids(sent)
        got = scp.receive_dir / study_uid / f"{sop_uid}.dcm"
        assert got in stored
        ds, original = pydicom.dcmread(got), pydicom.dcmread(sent)
        assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1  # not decompressed
        assert ds.file_meta.SourceApplicationEntityTitle == MODALITY
        assert ds.PixelData == original.PixelData
        assert (ds.pixel_array == original.pixel_array).all()
    assert leftovers(scp.receive_dir) == []
    for marker in PHI_MARKERS:
        assert marker not in caplog.text


@needs_dcmtk
def test_unknown_calling_or_called_ae_is_rejected(
    scp: StorageSCP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = scp.address[1]
    (study,) = simulate(tmp_path / "modality", studies=1, seed=1, **SMALL)
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        assert echoscu(port, calling="STRANGER").returncode != 0
        assert storescu(port, *study.paths, calling="STRANGER").returncode != 0
        assert storescu(port, *study.paths, called="SOMEONEELSE").returncode != 0
    assert list(scp.receive_dir.iterdir()) == []
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert any("'STRANGER'" in m and "allowed_calling_aes" in m for m in rejected), rejected
    assert any("'SOMEONEELSE'" in m for m in rejected), rejected
    for marker in PHI_MARKERS:
        assert marker not in caplog.text
    assert scp.healthy()


@needs_dcmtk
def test_write_failure_answers_out_of_resources_and_leaves_nothing(
    scp: StorageSCP, tmp_path: Path
) -> None:
    port = scp.address[1]
    (study,) = simulate(tmp_path / "modality", studies=1, seed=2, **SMALL)
    first = study.paths[0]
    study_uid, sop_uid = uids(first)
    blocker = scp.receive_dir / study_uid
    blocker.write_bytes(b"a file where the study folder goes")
    run = storescu(port, first)
    out = (run.stdout + run.stderr).lower()
    assert "received store response (refused: outofresources)" in out, out
    assert blocker.read_bytes() == b"a file where the study folder goes"
    assert sorted(p.name for p in scp.receive_dir.iterdir()) == [study_uid]
    # the data is written but the rename fails: the sender is told so, nothing is left
    blocker.unlink()
    final = blocker / f"{sop_uid}.dcm"
    (final / "in the way").mkdir(parents=True)
    run = storescu(port, first)
    out = (run.stdout + run.stderr).lower()
    assert "received store response (refused: outofresources)" in out, out
    assert leftovers(scp.receive_dir) == [] and final.is_dir()
    # once the disk is fine again, the modality's retry succeeds
    shutil.rmtree(final)
    run = storescu(port, first)
    assert run.returncode == 0 and "(success)" in run.stderr.lower(), run.stderr
    assert pydicom.dcmread(final).SOPInstanceUID == sop_uid
    assert scp.healthy()


@needs_dcmtk
def test_stop_aborts_an_open_association_within_budget(scp: StorageSCP) -> None:
    host, port = scp.address
    peer = subprocess.Popen(
        ["echoscu", "-aet", MODALITY, "-aec", "EDGETRIAGE", "--repeat", "1000000", host, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not scp.associations:
            assert time.monotonic() < deadline, "echoscu never associated"
            time.sleep(0.05)
        start = time.monotonic()
        assert scp.stop(timeout=3.0) is True  # no C-STORE was being written
        assert time.monotonic() - start < 4.0
        assert not scp.healthy()
        assert not port_open(host, port)
        output, _ = peer.communicate(timeout=10)
        assert "abort" in output.lower(), output  # the peer saw its association aborted
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()


# -- what a modality sends is data: malformed UIDs, transfers cut short, instances re-sent ---


def with_raw_uid(source: Path, target: Path, keyword: str, raw: bytes) -> Path:
    """``source`` with ``keyword`` holding exactly ``raw`` (pydicom will not write it)."""
    ds = pydicom.dcmread(source)
    placeholder = ("9." * len(raw))[: len(raw) - 1] + "9"
    setattr(ds, keyword, placeholder)
    ds.save_as(target)
    data = target.read_bytes()
    assert data.count(placeholder.encode()) == 1
    target.write_bytes(data.replace(placeholder.encode(), raw))
    return target


@needs_dcmtk
def test_a_malformed_study_uid_is_refused_with_cannot_understand(
    scp: StorageSCP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dcmtk's storescu sends a file whose StudyInstanceUID holds a control character (one
    that dcmtk does not remove as it removes whitespace): 0xC000, one log line with the
    reason (never the value), nothing on disk, no traceback."""
    (study,) = simulate(tmp_path / "modality", studies=1, seed=4, **SMALL)
    bad = with_raw_uid(study.paths[0], tmp_path / "bad.dcm", "StudyInstanceUID", b"1.23\x01.45")
    with caplog.at_level(logging.DEBUG):
        run = storescu(scp.address[1], bad)
    out = (run.stdout + run.stderr).lower()
    assert "received store response (error: cannotunderstand)" in out, out
    assert list(scp.receive_dir.iterdir()) == []
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]
    assert (
        refused[0]
        .getMessage()
        .endswith("refused (0xC000 cannot understand): StudyInstanceUID holds a control character")
    )
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in caplog.text and "0xC211" not in caplog.text
    assert scp.healthy()


@pytest.mark.parametrize(
    ("keyword", "raw", "reason"),
    [
        # pydicom reads raw b"1.2.3\n\x00\x0b" as '1.2.3\n\x00': the old check let '1.2.3\n'
        # through, then the handler raised (pynetdicom's traceback and 0xC211). (Not the
        # SOPInstanceUID: pynetdicom reads it to fill the command, which cleans the value.)
        ("StudyInstanceUID", b"1.2.3\n\x00\x0b", "StudyInstanceUID holds a control character"),
        ("SeriesInstanceUID", b"1.2.3\n\x00\x0b", None),
        ("StudyInstanceUID", b"1..2", "StudyInstanceUID has an empty component"),
        ("StudyInstanceUID", b"1.2.3/../../xy", "StudyInstanceUID holds a character other"),
        ("StudyInstanceUID", b"1." * 40, "StudyInstanceUID longer than 64 characters"),
    ],
)
def test_pynetdicom_scu_gets_cannot_understand_for_malformed_uids(
    scp: StorageSCP,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    keyword: str,
    raw: bytes,
    reason: str | None,
) -> None:
    from pynetdicom import AE

    (study,) = simulate(tmp_path / "modality", studies=1, seed=5, **SMALL)
    bad = with_raw_uid(study.paths[0], tmp_path / "bad.dcm", keyword, raw)
    ds = pydicom.dcmread(bad)
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, scp.address[1], ae_title="EDGETRIAGE")
    assert assoc.is_established
    try:
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            status = assoc.send_c_store(bad)  # a path: the data set is sent as the file has it
    finally:
        assoc.release()
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    if reason is None:  # not a name of ours: the intake's reader rejects the file later
        assert status.Status == 0x0000 and refused == []
        return
    assert status.Status == 0xC000
    assert list(scp.receive_dir.iterdir()) == []
    (line,) = refused
    assert reason in line, line
    assert raw.decode() not in line


def test_temporary_files_of_cut_transfers_are_removed_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    received = tmp_path / "received"
    received.mkdir()
    kept = store_instance(received, STUDY, SOP, b"complete")
    # what a kill -9 during a C-STORE leaves: store_instance's temporary names
    cut = [received / STUDY / f".{SOP}.x1y2.part", received / "1.2.5" / ".1.2.6.abc.part"]
    for path in cut:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    other = received / STUDY / ".not-ours"  # hidden, but not a temporary of ours: left
    other.write_bytes(b"x")
    settings = ScpSettings(enabled=True, bind_address=HOST, port=free_port())
    server = StorageSCP(settings, received)
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        server.start()
    try:
        assert not any(p.exists() for p in cut)
        assert kept.read_bytes() == b"complete" and other.exists()
        assert "removed 2 temporary file(s) of C-STOREs cut short" in caplog.text
    finally:
        server.stop(timeout=5.0)


@needs_dcmtk
def test_an_instance_sent_twice_stays_accepted(tmp_path: Path) -> None:
    """Sent again, an instance is written over its own file (received/<study>/<sop>.dcm);
    the intake reads it again and used to record its only file as a 'duplicate'."""
    from edge_agent.service import Agent

    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = load_settings(
        None,
        watch_dir=watch,
        state_dir=tmp_path / "state",
        profile="x86-cpu",
        scp={"enabled": True, "bind_address": HOST, "port": free_port()},
    )
    agent = Agent(settings)
    assert agent.receiver is not None
    agent.receiver.start()
    try:
        (study,) = simulate(tmp_path / "modality", studies=1, seed=6, **SMALL)
        first = study.paths[0]
        for _ in range(2):
            run = storescu(agent.receiver.address[1], first)
            assert run.returncode == 0, run.stderr
            agent._intake_received()
        with closing(sqlite3.connect(tmp_path / "state" / "state.sqlite3")) as db:
            files = db.execute("SELECT status FROM files").fetchall()
        assert files == [("accepted",)]
        assert agent.store.counters()["instances"] == 1
    finally:
        agent.receiver.stop(timeout=5.0)
        agent.store.close()


def test_busy_port_is_reported_with_its_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        settings = ScpSettings(bind_address=HOST, port=taken.getsockname()[1])
        with pytest.raises(ResourceMissing, match=r"scp\.port: .*already in use"):
            check_listen(settings)
        with pytest.raises(ResourceMissing, match="already in use"):
            StorageSCP(settings, tmp_path / "received").start()
    with pytest.raises(ConfigError) as err:
        check_listen(ScpSettings(bind_address="192.0.2.1", port=free_port()))
    assert err.value.key == "scp.bind_address"
    check_listen(ScpSettings(bind_address=HOST, port=free_port()))


def test_check_reports_whether_the_port_can_be_bound(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cfg = tmp_path / "agent.toml"
        base = (
            f'watch_dir = "{watch}"\nstate_dir = "{tmp_path / "state"}"\nprofile = "x86-cpu"\n'
            f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
            f'[scp]\nenabled = true\nbind_address = "{HOST}"\n'
        )
        cfg.write_text(base + f"port = {busy}\n")
        assert run_check(cfg) == 3
        out = capsys.readouterr().out
        assert "FAIL scp" in out and "already in use" in out, out
    cfg.write_text(base + f"port = {free_port()}\n")
    assert run_check(cfg) == 0
    out = capsys.readouterr().out
    assert "ok   scp" in out and "any calling AE" in out, out


# -- the daemon: storescu → SCP → intake → scoring → MQTT ---------------------------------


@pytest.fixture
def scp_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Collector, int, Path]]:
    broker = Mosquitto(tmp_path / "broker").start()
    port = free_port()
    config = write_agent_config(
        tmp_path,
        broker,
        site=SITE,
        device_id="box-1",
        extra=f'[scp]\nenabled = true\nbind_address = "{HOST}"\nport = {port}\n'
        f'allowed_calling_aes = ["{MODALITY}"]\n',
    )
    daemon = Daemon(config, tmp_path / "agent.log")
    collector = Collector(broker.host, broker.port)
    daemon.start()
    try:
        deadline = time.monotonic() + 90
        while not port_open(HOST, port):
            assert daemon.alive(), daemon.log.read_text()
            assert time.monotonic() < deadline, "the SCP never listened"
            time.sleep(0.2)
        yield daemon, collector, port, tmp_path / "state" / "received"
    finally:
        daemon.kill()
        collector.close()
        broker.stop()


@pytest.mark.slow
@needs_dcmtk
def test_pushed_studies_are_scored_end_to_end(
    scp_daemon: tuple[Daemon, Collector, int, Path], tmp_path: Path
) -> None:
    daemon, collector, port, received = scp_daemon
    several = multi_instance_study(tmp_path / "modality", **MATRIX)
    (single,) = simulate(tmp_path / "modality-2", studies=1, seed=7, abnormal=1.0, **MATRIX)
    compressed = jpeg_lossless(single, tmp_path / "jpeg")
    run = storescu(port, *several.paths, *compressed)
    assert run.returncode == 0, run.stdout + run.stderr
    wanted = {
        several.study_instance_uid: len(several.paths),
        single.study_instance_uid: len(compressed),
    }
    collector.wait(
        lambda: {r["study_instance_uid"] for r in collector.results()} >= set(wanted),
        120,
        "results for the pushed studies",
    )
    for result in collector.results():
        check_payload(result)
        assert result["instances"]["received"] == wanted[result["study_instance_uid"]]
        assert result["instances"]["rejected"] == 0
    for sent in [*several.paths, *compressed]:
        study_uid, sop_uid = uids(sent)
        assert (received / study_uid / f"{sop_uid}.dcm").is_file()
    assert leftovers(received) == []
    # a broken file pushed in is rejected with a path relative to the receive folder
    (tmp_path / "broken").mkdir()
    broken = tmp_path / "broken" / "broken.dcm"
    ds = pydicom.dcmread(several.paths[0])
    ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    del ds.Modality
    ds.save_as(broken, enforce_file_format=True)
    assert storescu(port, broken).returncode == 0
    collector.wait(lambda: bool(collector.on("rejected")), 30, "a rejected message")
    (rejected,) = collector.on("rejected")
    assert "path" not in rejected  # phi.publish_paths is false; the box resolves the id
    assert resolve_file_id(daemon.config, rejected["file_id"]) == str(
        received / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    )
    assert "Modality" in rejected["reason"]
    # SIGTERM: the SCP stops with the rest, within the contract's 15 s
    start = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert time.monotonic() - start < 15
    assert not port_open(HOST, port)
    assert_no_phi(collector, daemon.log)
