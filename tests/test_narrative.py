"""Draft narratives: MedGemma's description of the image behind an urgent flag, after it.

Real pieces: the tiny Gemma 3 checkpoint (tests/helpers/tiny_gemma3.py) exported by the real
``edge-export medgemma`` and put into the tiny bundle by ``edge-export add-report``; the
daemon (``edge_agent.service.Agent``) with its own threads; a real Mosquitto; PyTorch's
``generate`` as the reference for what the narrative must say.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from helpers.brokers import Subscriber
from helpers.tiny_bundle import make_bundle
from helpers.tiny_gemma3 import make_checkpoint

from edge_agent.bundle import load_bundle
from edge_agent.config import load_settings
from edge_agent.devbroker import Mosquitto
from edge_agent.narrative import NarrativeModel, NarrativeWorker, Source
from edge_agent.profiles import load_profile_file, profile_dirs
from edge_agent.results import StudyResult
from edge_agent.simulate import chest_instance, write_instance
from edge_agent.store import NarrativeJob, Store
from export import cli, medgemma
from export.report_bundle import AddReportSettings, add_report

pytestmark = pytest.mark.export

TOKENS = 12
NOTICE_TEXT = "Modified derivative of the tiny test model; the terms' sentence goes here.\n"
SITE, DEVICE = "s", "d"
BASE = f"edge-triage/v1/{SITE}/{DEVICE}"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("narrative")


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    return make_checkpoint(work / "tiny-gemma3")


@pytest.fixture(scope="module")
def bundle(work: Path, checkpoint: Path) -> Path:
    """The tiny bundle ('bright' is urgent at 0.9) with the tiny MedGemma as its report."""
    export = work / "medgemma"
    notice = work / "NOTICE"
    notice.write_text(NOTICE_TEXT)
    argv = ["medgemma", "--checkpoint", str(checkpoint), "--out", str(export)]
    argv += ["--notice", str(notice)]
    assert cli.main([*argv, "--weights", "fp32", "--threads", "1", "--parity-tokens", "4"]) == 0
    out = work / "bundle-with-report"
    add_report(
        AddReportSettings(
            bundle=make_bundle(work / "bundle"),
            report=export,
            out=out,
            max_new_tokens=TOKENS,
        )
    )
    return out


def bright_radiograph(folder: Path, seed: int = 1) -> pydicom.Dataset:
    """A CR whose image is nearly all bright: the tiny bundle scores it urgent."""
    ds = chest_instance(np.random.default_rng(seed), findings={}, rows=96, cols=80)
    pixels = np.full((96, 80), 3000, np.uint16)
    pixels[:20, :20] = 0
    pixels[40:60, 30:50] = 1500  # something to describe
    ds.PixelData = pixels.tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence", "RescaleSlope"):
        if keyword in ds:
            delattr(ds, keyword)
    write_instance(ds, folder)
    return ds


def torch_narrative(checkpoint: Path, pixels: np.ndarray, ids: np.ndarray) -> tuple[list, str]:
    """(tokens, text) PyTorch's greedy generate gives for the same image tensor and prompt."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(
        str(checkpoint), attn_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    input_ids = torch.from_numpy(ids)[None]
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            token_type_ids=(input_ids == model.config.image_token_id).long(),
            pixel_values=torch.from_numpy(pixels),
            max_new_tokens=TOKENS,
            do_sample=False,
        )
    tokens = out[0, ids.shape[0] :].tolist()
    return tokens, str(tokenizer.decode(tokens, skip_special_tokens=True)).strip()


class Running:
    """The daemon in this process, its threads running, stopped at the end."""

    def __init__(self, **settings: Any) -> None:
        from edge_agent.service import Agent

        self.agent = Agent(load_settings(None, **settings))
        self.thread = threading.Thread(target=self.agent.run, daemon=True)

    def __enter__(self) -> Any:
        self.thread.start()
        assert self.agent.started.wait(60)
        return self.agent

    def __exit__(self, *exc: object) -> None:
        self.agent.stop()
        self.thread.join(20)
        assert not self.thread.is_alive()


def daemon_settings(tmp_path: Path, broker: Mosquitto, bundle: Path, **extra: Any) -> dict:
    watch = tmp_path / "incoming"
    watch.mkdir(exist_ok=True)
    return {
        "watch_dir": watch,
        "state_dir": tmp_path / "state",
        "bundle": bundle,
        "profile": "x86-cpu",
        "site": SITE,
        "device_id": DEVICE,
        "study_quiet_seconds": 0.5,
        "intake": {"file_stable_seconds": 0, "poll_interval_seconds": 0.2},
        "mqtt": {"host": broker.host, "port": broker.port},
        **extra,
    }


def results(sub: Subscriber, count: int, timeout: float = 60) -> list[dict]:
    got = sub.wait_for(lambda m: "/study/" in m.topic, timeout=timeout, count=count)
    return [json.loads(m.payload) for m in got]


# -- the daemon ---------------------------------------------------------------------------


def test_urgent_flag_first_then_its_narrative_as_the_next_revision(
    tmp_path: Path, bundle: Path, checkpoint: Path
) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        sub = Subscriber(broker, f"{BASE}/study/#")
        settings = daemon_settings(tmp_path, broker, bundle, narrative={"enabled": True})
        with Running(**settings) as agent:
            ds = bright_radiograph(settings["watch_dir"])
            flag, follow = results(sub, 2)
            counters = agent.store.counters()
        sub.close()

    assert flag["triage"] == "urgent" and flag["revision"] == 1
    assert flag["narrative_status"] == "pending" and "narrative" not in flag
    assert follow["revision"] == 2 and follow["alert_id"] != flag["alert_id"]
    assert follow["narrative_status"] == "ok"
    for same in ("triage", "findings", "model", "instances", "study_instance_uid"):
        assert follow[same] == flag[same]
    narrative = follow["narrative"]
    assert narrative["draft"] is True and "not a radiology report" in narrative["disclaimer"]
    assert narrative["model"] == "medgemma-tiny-gemma3"
    assert narrative["source"] == f"radiograph {ds.SOPInstanceUID}"
    assert 0 < narrative["tokens"] <= TOKENS
    StudyResult.model_validate(follow)  # the strict model reads it back

    # What it says is what PyTorch's generate says for that image and the template's prompt.
    model = NarrativeModel(load_bundle(bundle), providers=["CPUExecutionProvider"], threads=1)
    source = Source("radiograph", [f"{ds.SOPInstanceUID}.dcm"], "")
    pixels = model.pixels(source, lambda p: pydicom.dcmread(settings["watch_dir"] / p))
    tokens, text = torch_narrative(checkpoint, pixels, model.ids["radiograph"])
    assert narrative["text"] == text and narrative["tokens"] == len(tokens)
    # (the tiny model writes byte tokens, so compare the tokens themselves too)
    assert model.llm.generate(model.ids["radiograph"], pixels, TOKENS) == tokens
    assert counters["narratives_written"] == 1 and counters["narratives_pending"] == 0


def test_narrative_not_ready_within_the_budget_is_published_as_timeout(
    tmp_path: Path, bundle: Path
) -> None:
    with Mosquitto(tmp_path / "broker") as broker:
        sub = Subscriber(broker, f"{BASE}/study/#")
        narrative = {"enabled": True, "time_budget_seconds": 0.001}
        settings = daemon_settings(tmp_path, broker, bundle, narrative=narrative)
        with Running(**settings):
            bright_radiograph(settings["watch_dir"])
            flag, follow = results(sub, 2)
        sub.close()
    assert flag["narrative_status"] == "pending"
    assert follow["narrative_status"] == "timeout" and "narrative" not in follow
    assert follow["triage"] == "urgent" and follow["revision"] == 2


def test_no_narrative_unless_enabled_and_the_bundle_has_a_report(
    tmp_path: Path, bundle: Path
) -> None:
    from edge_agent.errors import ConfigError
    from edge_agent.service import Agent

    with Mosquitto(tmp_path / "broker") as broker:
        off = Agent(load_settings(None, **daemon_settings(tmp_path, broker, bundle)))
        assert off.narrator is None  # x86-cpu's profile leaves it off; config did not ask
        off.store.close()
        # Asked for explicitly, a bundle without a report is a config error, as in check
        # (tests/test_preflight.py has the profile-default case: a warning in both).
        plain = make_bundle(tmp_path / "plain")
        on = daemon_settings(tmp_path, broker, plain, narrative={"enabled": True})
        with pytest.raises(ConfigError, match="has no report section") as err:
            Agent(load_settings(None, **on))
        assert err.value.key == "narrative.enabled"


def test_check_names_the_key_when_narratives_are_on_without_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.check import run_check

    watch = tmp_path / "incoming"
    watch.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{tmp_path / "state"}"\nprofile = "x86-cpu"\n'
        f'bundle = "{make_bundle(tmp_path / "plain")}"\n[narrative]\nenabled = true\n'
        "[mqtt]\nport = 1\n"
    )
    assert run_check(config) == 2
    assert "narrative.enabled" in capsys.readouterr().out


def test_the_weights_notice_travels_into_the_bundle(bundle: Path) -> None:
    loaded = load_bundle(bundle)  # hashes checked, NOTICE included
    report = loaded.manifest.report
    assert report is not None and report.notice == "report/NOTICE"
    assert (bundle / report.notice).read_text() == NOTICE_TEXT
    assert report.notice in loaded.manifest.files


def test_orin_nano_profile_has_narratives_off() -> None:
    profiles = {p.stem: p for d in profile_dirs() for p in d.glob("*.toml")}
    assert load_profile_file(profiles["jetson-orin-nano"]).narrative.enabled is False
    assert load_profile_file(profiles["jetson-agx-orin"]).narrative.enabled is True


# -- the worker and the store, without a broker ------------------------------------------
# (the store's own rules for narratives, which need no model, are in tests/test_state.py)


@pytest.fixture
def flagged(tmp_path: Path, bundle: Path) -> Iterator[tuple[Store, NarrativeJob, Path]]:
    """A store holding one urgent result with its narrative job, as scoring leaves it."""
    from edge_agent.service import Agent

    watch = tmp_path / "incoming"
    watch.mkdir()
    settings = load_settings(
        None,
        watch_dir=watch,
        state_dir=tmp_path / "state",
        bundle=bundle,
        profile="x86-cpu",
        narrative={"enabled": True},
        intake={"file_stable_seconds": 0, "watch_mode": "polling"},
    )
    agent = Agent(settings)
    bright_radiograph(watch)
    for f in agent.watcher.scan(1.0):
        agent._handle_file(f)
    (uid,) = agent.store.complete_quiet_studies(0.0, now=time.time() + 1)
    agent._score_one(uid)
    (job,) = agent.store.narrative_jobs()
    agent.store.close()
    store = Store(tmp_path / "state" / "state.sqlite3")
    yield store, job, watch
    store.close()


def worker(
    store: Store, bundle: Path, watch: Path, idle: threading.Event, **kwargs: Any
) -> NarrativeWorker:
    return NarrativeWorker(
        store,
        load_bundle(bundle),
        watch_dir=watch,
        providers=["CPUExecutionProvider"],
        threads=kwargs.pop("threads", 1),
        max_new_tokens=None,
        **kwargs,
        scoring_idle=idle,
        stop=threading.Event(),
        topic=lambda uid: f"{BASE}/study/{uid}",
        published=lambda: None,
    )


def narrate(store: Store, job: NarrativeJob, bundle: Path, watch: Path) -> dict:
    """Load the model and do ``job`` now, nothing being scored; the published revision."""
    idle = threading.Event()
    idle.set()
    w = worker(store, bundle, watch, idle)
    w._load()
    w._do(job)
    return outbox_results(store)[-1]


def _nice(task: Path) -> int:
    """A thread's nice value from /proc (field 19 of stat, after the command name)."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[16])


def outbox_results(store: Store) -> list[dict]:
    return [json.loads(m.payload) for m in store.outbox_messages()]


def test_a_pending_narrative_survives_a_restart_and_waits_for_scoring(
    flagged: tuple[Store, NarrativeJob, Path], bundle: Path
) -> None:
    store, job, watch = flagged  # a new Store on the same file: the job is still there
    assert store.narrative_jobs() == [job]
    idle = threading.Event()  # a study is being scored
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # pytest may run niced
    w = worker(store, bundle, watch, idle, threads=2, nice=7)
    thread = threading.Thread(target=w.run, daemon=True)
    thread.start()
    assert w.ready.wait(30) and w.model is not None
    # the worker and the ONNX Runtime thread it created run niced; this thread does not
    niced_to = min(19, base + 7)
    assert os.getpriority(os.PRIO_PROCESS, thread.native_id or 0) == niced_to
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    niced = [t for t in Path("/proc/self/task").iterdir() if _nice(t) == niced_to]
    assert len(niced) >= 2, "ONNX Runtime's pool thread inherits the worker's nice"
    time.sleep(1.0)
    assert store.narrative_jobs() == [job], "no token while a study is being scored"
    idle.set()
    deadline = time.monotonic() + 30
    while store.narrative_jobs() and time.monotonic() < deadline:
        time.sleep(0.05)
    w.stop.set()
    thread.join(5)
    flag, follow = outbox_results(store)
    assert flag["narrative_status"] == "pending"
    assert follow["narrative_status"] == "ok" and follow["revision"] == 2
    study = store.study(job.study_instance_uid)
    assert study is not None and study.revision == 2


def test_expired_job_at_restart_is_published_as_timeout_without_generating(
    flagged: tuple[Store, NarrativeJob, Path], bundle: Path
) -> None:
    store, _job, watch = flagged
    w = worker(store, bundle, watch, threading.Event())  # scoring "busy": a token would hang
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE narratives SET deadline = 0")
    (expired,) = store.narrative_jobs()
    w._do(expired)  # the model is not even loaded
    assert outbox_results(store)[-1]["narrative_status"] == "timeout"


def test_image_gone_is_published_as_failed_with_the_reason(
    flagged: tuple[Store, NarrativeJob, Path], bundle: Path
) -> None:
    store, job, watch = flagged
    for f in watch.glob("*.dcm"):
        f.unlink()
    follow = narrate(store, job, bundle, watch)
    assert follow["narrative_status"] == "failed"
    assert follow["narrative_error"] == "the image is no longer in the watch folder"


def test_image_replaced_by_another_instance_is_not_described(
    flagged: tuple[Store, NarrativeJob, Path], bundle: Path
) -> None:
    store, job, watch = flagged
    (path,) = watch.glob("*.dcm")
    other = bright_radiograph(watch, seed=2)  # another instance, written under the same name
    path.unlink()
    next(p for p in watch.glob("*.dcm")).rename(path)
    assert pydicom.dcmread(path).SOPInstanceUID == other.SOPInstanceUID
    follow = narrate(store, job, bundle, watch)
    assert follow["narrative_status"] == "failed"
    assert follow["narrative_error"] == (
        "the image was replaced by another instance since it was scored"
    )
    assert "narrative" not in follow or follow["narrative"] is None


def test_status_shows_narratives_being_written_and_their_outcome(
    flagged: tuple[Store, NarrativeJob, Path], bundle: Path
) -> None:
    from edge_agent.status import format_status, read_status

    store, job, watch = flagged
    before = format_status(read_status(store.path))
    assert "narratives 1 being written; written 0" in before
    assert "urgent" in before and "narrative pending" in before
    narrate(store, job, bundle, watch)
    after = read_status(store.path)
    assert after.narratives_pending == 0
    assert after.last_results[0]["revision"] == 2
    assert after.last_results[0]["narrative"] == "ok"
    assert after.results_by_level == {"urgent": 1}  # the narrative revision is no new result
    assert "narratives 0 being written; written 1, timed out 0, failed 0" in format_status(after)


def test_ack_of_the_flag_also_silences_its_narrative_revision(
    flagged: tuple[Store, NarrativeJob, Path], bundle: Path
) -> None:
    store, job, watch = flagged
    follow = narrate(store, job, bundle, watch)
    new = store.alert(follow["alert_id"])
    assert new is not None and new["state"] == "pending"
    assert store.alert(job.alert_id)["state"] == "superseded"  # type: ignore[index]
    # the dashboard acks the flag it saw first: the narrative revision is silenced too
    assert store.acknowledge(job.study_instance_uid, job.alert_id, "dr", "t") == "acknowledged"
    assert store.alert(follow["alert_id"])["state"] == "acknowledged"  # type: ignore[index]
    assert store.enqueue_renotifications(time.time() + 10_000, 1, 10) == 0


def test_acknowledged_flag_stays_acknowledged_in_its_narrative_revision(
    flagged: tuple[Store, NarrativeJob, Path], bundle: Path
) -> None:
    store, job, watch = flagged
    assert store.acknowledge(job.study_instance_uid, job.alert_id, "dr", "t") == "acknowledged"
    follow = narrate(store, job, bundle, watch)
    assert store.alert(follow["alert_id"])["state"] == "acknowledged"  # type: ignore[index]


def test_prompt_without_transformers_equals_the_export_prompt(
    bundle: Path, checkpoint: Path
) -> None:
    from transformers import AutoTokenizer

    model = NarrativeModel(load_bundle(bundle), providers=["CPUExecutionProvider"], threads=1)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    report = load_bundle(bundle).manifest.report
    assert report is not None
    for kind, question in (("radiograph", report.prompts.radiograph), ("ct", report.prompts.ct)):
        text = medgemma.image_prompt(tokenizer, question, report.image.tokens_per_image)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert model.ids[kind].tolist() == expected


def test_ct_narrative_describes_the_slab_that_drove_the_urgent_finding(
    tmp_path: Path, bundle: Path
) -> None:
    from helpers.ct import chest_phantom, ct_bundle, ct_datasets, ingest, scorer_for
    from pydicom.uid import generate_uid

    from edge_agent.bundle import MANIFEST, Manifest, write_manifest

    watch = tmp_path / "in"
    datasets = ct_datasets(chest_phantom(nodule_slice=25), study_uid=generate_uid())
    for ds in datasets:
        write_instance(ds, watch)
    store = Store(tmp_path / "state.sqlite3")
    uid = ingest(store, watch)
    root = ct_bundle(tmp_path / "ct-bundle")
    raw = json.loads((root / MANIFEST).read_text())
    for finding in raw["findings"]:
        if finding["code"] == "dense":  # any CT score is urgent
            finding["review_threshold"] = finding["urgent_threshold"] = 0.0
    write_manifest(root, Manifest.model_validate(raw))

    study = store.study(uid)
    assert study is not None
    scored = scorer_for(root, watch).score(study, store.instances(uid), 0)
    assert scored is not None and scored.result.triage == "urgent"
    (dense,) = [f for f in scored.result.findings if f.code == "dense"]
    source = scored.narrative_source
    assert source is not None and source.kind == "ct" and dense.slab is not None
    sops = [d.SOPInstanceUID for d in datasets]
    ends = (
        sops.index(dense.slab.first_sop_instance_uid),
        sops.index(dense.slab.last_sop_instance_uid),
    )
    inside = sops[min(ends) : max(ends) + 1]  # the slab's slices, in the series' order
    assert sorted(source.paths) == sorted(f"{sop}.dcm" for sop in inside) and len(inside) > 1
    assert sorted(source.uids) == sorted(inside)  # checked when the slab is read again
    assert source.label == (
        f"CT slab {dense.slab.index + 1} of {dense.slab.count}, "
        f"series {dense.slab.series_instance_uid}"
    )
    model = NarrativeModel(load_bundle(bundle), providers=["CPUExecutionProvider"], threads=1)
    pixels = model.pixels(source, lambda p: pydicom.dcmread(watch / p))
    size = model.report.image.size
    assert pixels.shape == (1, 3, size, size)
    # three HU windows as RGB: wide, soft tissue and brain differ on a chest slab
    assert not np.allclose(pixels[0, 0], pixels[0, 1]) and not np.allclose(
        pixels[0, 1], pixels[0, 2]
    )
    store.close()
