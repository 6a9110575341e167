"""Decoding what real scanners and archives send (edge_agent.imaging, edge_agent.intake.header).

* pydicom's bundled test files (real files from many vendors): each is decoded and
  preprocessed, skipped or rejected with a reason; then all of them go into a running
  daemon's watch folder, which handles every one and stays healthy.
* Files compressed by dcmtk (dcmcjpeg, dcmcjpls, dcmcrle, dcmconv) and gdcm (gdcmconv)
  decode to the pixels of the uncompressed original (identical in lossless modes).
* Colour (RGB, YBR) becomes BT.601 luma; multi-frame objects give their one image or a reason.
* Mutated files (truncated, flipped bytes, absurd Rows/Columns): no crash, no hang, a reason.
"""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from helpers.polling import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from edge_agent.bundle import Preprocessing
from edge_agent.dicom.errors import MAPPED_TYPES
from edge_agent.dicom.instance_file import read_again
from edge_agent.errors import ImageRejected, InputRejected
from edge_agent.imaging import decode_pixels, preprocess, rgb_to_grey
from edge_agent.intake.header import Skipped, read_header
from edge_agent.scoring import REREADING
from edge_agent.simulate import simulate

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
CORPUS = sorted(p for p in map(Path, pydicom.data.get_testdata_files()) if p.is_file())
SPEC = Preprocessing(input_size=24, mean=(0.5,) * 3, std=(0.5,) * 3)

# What a read of a DICOM file may raise on bad data (edge_agent/dicom/errors.py).
READ_ERRORS = (OSError, *MAPPED_TYPES)


def pixel_outcome(path: Path) -> tuple[str, str | None]:
    """("decoded", None) or ("rejected", reason): the file read in full as the scorer reads
    it again and preprocessed; nothing but InputRejected may come out of either."""
    try:
        ds = read_again(path.parent, path.name, None, REREADING)
        tensor = preprocess(ds, SPEC)
    except InputRejected as exc:
        return "rejected", exc.reason
    assert tensor.shape == (3, 24, 24)
    assert tensor.dtype == np.float32
    assert np.all(np.isfinite(tensor))
    assert tensor.min() >= -1.0 - 1e-6 and tensor.max() <= 1.0 + 1e-6
    return "decoded", None


def outcome(path: Path) -> tuple[str, str | None]:
    """What the daemon makes of a file: its header as intake reads it, then its pixels as
    scoring decodes them (here for every modality, not only the CR/DX that are scored)."""
    try:
        read_header(path)
    except Skipped as exc:
        return "skipped", exc.reason
    except InputRejected as exc:
        return "rejected", exc.reason
    return pixel_outcome(path)


def assert_reason(reason: str | None) -> None:
    assert isinstance(reason, str) and reason.strip(), "a reason is required"
    assert len(reason) <= 200
    assert "\n" not in reason


def patient_words(path: Path) -> list[str]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        values = [str(ds.get(k, "") or "") for k in ("PatientName", "PatientID")]
    except Exception:  # broken test files: nothing to compare against
        return []
    return [v for v in values if len(v) >= 4]


# --- the pydicom corpus -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_outcomes() -> dict[str, tuple[str, str | None]]:
    return {p.relative_to(TEST_FILES).as_posix(): outcome(p) for p in CORPUS}


def test_every_corpus_file_is_used_skipped_or_rejected_with_a_reason(
    corpus_outcomes: dict[str, tuple[str, str | None]],
) -> None:
    assert len(corpus_outcomes) >= 170
    counts = Counter(kind for kind, _ in corpus_outcomes.values())
    print(f"\npydicom corpus ({len(corpus_outcomes)} files): {dict(counts)}")
    for name, (kind, reason) in sorted(corpus_outcomes.items()):
        print(f"  {kind:9} {name}: {reason or ''}")
        assert kind in ("decoded", "skipped", "rejected")
        if kind != "decoded":
            assert_reason(reason)
            for word in patient_words(TEST_FILES / name):
                assert word not in reason, f"{name}: reason quotes patient data"
    assert counts["decoded"] >= 5  # the CR/DX/CT images; MR, US, OT … are skipped


def test_every_corpus_image_decodes_or_is_rejected_with_a_reason() -> None:
    """Pixels of every corpus file that has them, whatever its modality."""
    results: dict[str, tuple[str, str | None]] = {}
    for path in CORPUS:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, force=True)
            has_pixels = "PixelData" in ds
        except READ_ERRORS:
            continue
        if has_pixels:
            results[path.relative_to(TEST_FILES).as_posix()] = pixel_outcome(path)
    counts = Counter(kind for kind, _ in results.values())
    reasons = Counter(r.split(":")[0].split("(")[0].strip() for _, r in results.values() if r)
    print(f"\ncorpus files with pixel data: {len(results)}: {dict(counts)}")
    for reason, n in reasons.most_common():
        print(f"  {n:3}  {reason}")
    for _, reason in results.values():
        if reason is not None:
            assert_reason(reason)
    assert len(results) >= 90
    assert counts["decoded"] >= 70


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("JPEG-lossy.dcm", "cannot decode pixel data (JPEG Extended"),
        ("MR_truncated.dcm", "pixel data is"),
        ("examples_ybr_color.dcm", "frames differ"),  # 30-frame US cine
        ("examples_palette.dcm", "PALETTE COLOR"),
    ],
)
def test_corpus_rejections_say_why(name: str, words: str) -> None:
    kind, reason = pixel_outcome(TEST_FILES / name)
    assert kind == "rejected"
    assert reason is not None and words in reason


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("DICOMDIR", "DICOMDIR (media directory), not an image"),
        ("test-SR.dcm", "structured report or key object selection, not an image"),
        ("rtplan.dcm", "radiotherapy object, not an image"),
        ("rtdose.dcm", "radiotherapy object, not an image"),
    ],
)
def test_non_image_objects_are_skipped(name: str, reason: str) -> None:
    (path,) = [p for p in CORPUS if p.name == name][:1]
    with pytest.raises(Skipped) as info:
        read_header(path)
    assert info.value.reason.startswith(reason)


def test_key_object_selection_and_presentation_state_are_skipped(tmp_path: Path) -> None:
    for sop_class, words in [
        ("1.2.840.10008.5.1.4.1.1.88.59", "Key Object Selection"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "presentation state"),
    ]:
        ds = small_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        del ds.StudyInstanceUID  # nothing else is asked of a non-image object
        path = tmp_path / "obj.dcm"
        ds.save_as(path, enforce_file_format=True)
        with pytest.raises(Skipped, match=words):
            read_header(path)


def test_foreign_image_without_modality_is_skipped_not_rejected(tmp_path: Path) -> None:
    ds = small_dataset(np.arange(16, dtype=np.uint16).reshape(4, 4))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR
    del ds.Modality
    path = tmp_path / "mr.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(Skipped, match="MR Image Storage is not triaged"):
        read_header(path)


# --- colour and multi-frame -------------------------------------------------------------------


def test_rgb_becomes_bt601_luma() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    expected = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))
    np.testing.assert_allclose(rgb_to_grey(rgb), expected, atol=1)
    wide = rgb.astype(np.uint16) * 257
    np.testing.assert_allclose(rgb_to_grey(wide), np.rint(wide @ [0.299, 0.587, 0.114]), atol=1)
    signed = rgb.astype(np.int16) - 128
    np.testing.assert_array_equal(
        rgb_to_grey(signed), np.rint(signed @ np.array([0.299, 0.587, 0.114]))
    )


def luma_of(name: str) -> np.ndarray:
    ds = pydicom.dcmread(TEST_FILES / name)
    return rgb_to_grey(ds.pixel_array)


@pytest.mark.parametrize(
    ("name", "reference", "max_mean_error"),
    [
        ("SC_rgb_rle.dcm", "SC_rgb_rle.dcm", 0),  # RLE, RGB
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0),  # JPEG lossless, RGB
        ("SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_rle.dcm", 3),  # JPEG baseline, RGB
        ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 3),  # JPEG baseline, YBR_FULL
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_rle.dcm", 3),  # JPEG baseline, YBR_FULL_422
        ("SC_rgb_rle_16bit.dcm", "SC_rgb_rle_16bit.dcm", 0),  # 16-bit samples
        ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd.dcm", 0),  # native, odd size
        ("SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd.dcm", 0),
        ("SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm", 3),
        ("SC_ybr_full_422_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm", 1),
        ("examples_jpeg2k.dcm", "examples_jpeg2k.dcm", 0),  # JPEG 2000, YBR_RCT
    ],
)
def test_corpus_colour_images_decode_to_their_luma(
    name: str, reference: str, max_mean_error: int
) -> None:
    ds = pydicom.dcmread(TEST_FILES / name)
    grey = decode_pixels(ds)
    assert grey.shape == (ds.Rows, ds.Columns)
    error = np.abs(grey.astype(int) - luma_of(reference).astype(int))
    assert error.mean() <= max_mean_error
    if max_mean_error == 0:
        assert error.max() == 0
    assert preprocess(ds, SPEC).shape == (3, 24, 24)


def test_colour_ignores_greyscale_luts() -> None:
    ds = pydicom.dcmread(TEST_FILES / "SC_rgb_rle.dcm")
    plain = preprocess(ds, SPEC)
    ds.WindowCenter, ds.WindowWidth = 10, 2  # VOI applies to greyscale only
    ds.RescaleSlope, ds.RescaleIntercept = -1, 0
    np.testing.assert_array_equal(preprocess(ds, SPEC), plain)


def test_multi_frame_of_one_repeated_image_uses_it() -> None:
    frame = np.arange(24, dtype=np.uint16).reshape(4, 6)
    ds = small_dataset(np.vstack([frame, frame, frame]))
    ds.Rows, ds.NumberOfFrames = 4, 3
    np.testing.assert_array_equal(decode_pixels(ds), frame)


def test_multi_frame_with_different_frames_is_rejected_and_one_frame_is_fine() -> None:
    frame = np.arange(24, dtype=np.uint16).reshape(4, 6)
    ds = small_dataset(np.vstack([frame, frame + 1]))
    ds.Rows, ds.NumberOfFrames = 4, 2
    with pytest.raises(ImageRejected, match=r"multi-frame image \(2 frames\) whose frames differ"):
        decode_pixels(ds)
    single = small_dataset(frame)
    single.NumberOfFrames = 1
    np.testing.assert_array_equal(decode_pixels(single), frame)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"NumberOfFrames": 0}, "NumberOfFrames 0"),
        ({"SamplesPerPixel": 2}, "SamplesPerPixel 2"),
        ({"BitsAllocated": 12}, "BitsAllocated 12"),
        ({"Rows": 60000, "Columns": 60000}, "too many"),
        ({"Rows": 40}, "pixel data is 48 bytes"),
    ],
)
def test_odd_image_elements_are_rejected_with_a_reason(change: dict, words: str) -> None:
    ds = small_dataset(np.arange(24, dtype=np.uint16).reshape(4, 6))
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    with pytest.raises(ImageRejected) as info:
        decode_pixels(ds)
    assert words in info.value.reason


def test_missing_optional_elements_are_tolerated() -> None:
    values = np.arange(24, dtype=np.uint16).reshape(4, 6) * 100
    ds = small_dataset(values)
    del ds.BitsStored, ds.HighBit, ds.SamplesPerPixel
    np.testing.assert_array_equal(decode_pixels(ds), values)
    rgb = pydicom.dcmread(TEST_FILES / "SC_rgb_rle.dcm")
    del rgb.PlanarConfiguration
    np.testing.assert_array_equal(decode_pixels(rgb), luma_of("SC_rgb_rle.dcm"))


# --- dcmtk and gdcm encode, we decode ---------------------------------------------------------


def small_dataset(pixels: np.ndarray, *, bits_stored: int = 16, signed: bool = False):
    """A native little-endian CR holding ``pixels`` (2-D, 8 or 16 bit)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = min(bits_stored, ds.BitsAllocated)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uncompressed sources: a simulated 12-bit CR, a signed 16-bit CT, 8-bit grey, RGB."""
    folder = tmp_path_factory.mktemp("originals")
    (study,) = simulate(folder / "sim", studies=1, abnormal=1.0, seed=5, rows=200, cols=168)
    cr = study.paths[0]
    grey8 = folder / "grey8.dcm"
    ramp = (np.add.outer(np.arange(60), np.arange(50)) * 2 % 256).astype(np.uint8)
    small_dataset(ramp, bits_stored=8).save_as(grey8, enforce_file_format=True)
    return {
        "cr12": cr,
        "ct16s": TEST_FILES / "CT_small.dcm",
        "grey8": grey8,
        "rgb8": TEST_FILES / "examples_rgb_color.dcm",
    }


# (tool command, lossless?, which originals); {src} and {dst} are filled in.
ENCODERS: list[tuple[str, list[str], bool, tuple[str, ...]]] = [
    ("jpeg-lossless-sv1", ["dcmcjpeg", "+e1", "{src}", "{dst}"], True, ("cr12", "grey8", "rgb8")),
    ("jpeg-lossless", ["dcmcjpeg", "+el", "{src}", "{dst}"], True, ("cr12", "grey8")),
    ("jpeg-baseline", ["dcmcjpeg", "+eb", "{src}", "{dst}"], False, ("cr12", "grey8", "rgb8")),
    ("jpeg-extended", ["dcmcjpeg", "+ee", "{src}", "{dst}"], False, ("cr12",)),
    ("rle-dcmtk", ["dcmcrle", "{src}", "{dst}"], True, ("cr12", "ct16s", "grey8", "rgb8")),
    ("jpeg-ls", ["dcmcjpls", "{src}", "{dst}"], True, ("cr12", "ct16s", "grey8", "rgb8")),
    ("j2k-gdcm", ["gdcmconv", "--j2k", "{src}", "{dst}"], True, ("cr12", "ct16s", "grey8", "rgb8")),
    ("jpeg-gdcm", ["gdcmconv", "--jpeg", "{src}", "{dst}"], True, ("cr12", "ct16s", "grey8")),
    ("rle-gdcm", ["gdcmconv", "--rle", "{src}", "{dst}"], True, ("cr12", "ct16s", "rgb8")),
    ("deflate", ["dcmconv", "+td", "{src}", "{dst}"], True, ("cr12", "ct16s", "rgb8")),
    ("big-endian", ["dcmconv", "+tb", "{src}", "{dst}"], True, ("cr12", "ct16s", "rgb8")),
]
CASES = [
    pytest.param(source, command, lossless, id=f"{name}-{source}")
    for name, command, lossless, sources in ENCODERS
    for source in sources
]


def encode(command: list[str], src: Path, dst: Path) -> None:
    if shutil.which(command[0]) is None:
        pytest.fail(f"{command[0]} is not installed (Debian: dcmtk, libgdcm-tools)")
    args = [a.format(src=src, dst=dst) for a in command]
    run = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, f"{' '.join(args)}: {run.stderr or run.stdout}"


@pytest.mark.parametrize(("source", "command", "lossless"), CASES)
def test_compressed_copies_decode_to_the_original_pixels(
    originals: dict[str, Path], tmp_path: Path, source: str, command: list[str], lossless: bool
) -> None:
    dst = tmp_path / "encoded.dcm"
    encode(command, originals[source], dst)
    original = pydicom.dcmread(originals[source])
    copy = pydicom.dcmread(dst)
    if command[0] != "dcmconv":
        assert copy.file_meta.TransferSyntaxUID != original.file_meta.TransferSyntaxUID
    expected = np.asarray(decode_pixels(original))
    decoded = decode_pixels(copy)
    assert decoded.shape == expected.shape
    if lossless:
        np.testing.assert_array_equal(decoded, expected)
        np.testing.assert_array_equal(preprocess(copy, SPEC), preprocess(original, SPEC))
    else:
        # dcmtk's lossy modes may shift or scale the stored values (12 bits into baseline's
        # 8): the reference is dcmtk's own decoder (dcmdjpeg) on the same file.
        encode(["dcmdjpeg", "{src}", "{dst}"], dst, tmp_path / "dcmdjpeg.dcm")
        reference = pydicom.dcmread(tmp_path / "dcmdjpeg.dcm")
        expected = decode_pixels(reference)
        error = np.abs(decoded.astype(np.int64) - expected.astype(np.int64))
        assert error.mean() <= 0.5 and error.max() <= 16, (error.mean(), error.max())
        np.testing.assert_allclose(preprocess(copy, SPEC), preprocess(reference, SPEC), atol=0.05)


# --- fuzzing: mutated files give a reason, never a crash or a hang ------------------------


class Sources(list):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<{len(self)} fuzz source files>"


@pytest.fixture(scope="module")
def fuzz_sources(originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list:
    folder = tmp_path_factory.mktemp("fuzz-sources")
    sources = [originals["cr12"].read_bytes(), originals["rgb8"].read_bytes()]
    for i, (command, source) in enumerate(
        [
            (["dcmcjpeg", "+e1", "{src}", "{dst}"], "cr12"),
            (["dcmcjpeg", "+ee", "{src}", "{dst}"], "cr12"),
            (["dcmcjpeg", "+eb", "{src}", "{dst}"], "rgb8"),
            (["dcmcrle", "{src}", "{dst}"], "cr12"),
            (["dcmcjpls", "{src}", "{dst}"], "cr12"),
            (["gdcmconv", "--j2k", "{src}", "{dst}"], "cr12"),
            (["dcmconv", "+td", "{src}", "{dst}"], "cr12"),
        ]
    ):
        dst = folder / f"{i}.dcm"
        encode(command, originals[source], dst)
        sources.append(dst.read_bytes())
    return Sources(sources)


def set_rows_columns(data: bytes, rows: int, columns: int) -> bytes:
    """Overwrite Rows (0028,0010) and Columns (0028,0011) in explicit VR little endian."""
    out = bytearray(data)
    for element, value in ((b"\x10\x00", rows), (b"\x11\x00", columns)):
        tag = b"\x28\x00" + element + b"US\x02\x00"
        at = out.find(tag)
        if at >= 0:
            out[at + 8 : at + 10] = value.to_bytes(2, "little")
    return bytes(out)


MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 255)), min_size=1, max_size=8),
    ),
    st.tuples(st.just("size"), st.tuples(st.integers(0, 65535), st.integers(0, 65535))),
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[: int(arg * len(data))]
    if kind == "flip":
        out = bytearray(data)
        for where, mask in arg:
            # the header (first 2 KB) is where most of the structure is: aim there half the time
            position = int(where * (min(len(out), 2048) if mask % 2 else len(out) - 1))
            if out:
                out[min(position, len(out) - 1)] ^= mask
        return bytes(out)
    return set_rows_columns(data, *arg)


@settings(
    max_examples=400,
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(source=st.integers(0, 8), mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_mutated_files_give_a_reason_never_a_crash(
    fuzz_sources: list[bytes], tmp_path: Path, source: int, mutations: list[tuple]
) -> None:
    data = fuzz_sources[source % len(fuzz_sources)]
    for mutation in mutations:
        data = mutate(data, mutation)
    path = tmp_path / "mutated.dcm"
    path.write_bytes(data)
    started = time.monotonic()
    kind, reason = outcome(path)
    assert time.monotonic() - started < 15, "took too long (a hang in the making)"
    assert kind in ("decoded", "skipped", "rejected")
    if kind != "decoded":
        assert_reason(reason)


# --- the daemon: the whole corpus dropped into its watch folder -----------------------------


@pytest.fixture
def daemon(tmp_path: Path, mosquitto) -> Iterator[tuple[Path, Path, subprocess.Popen, str]]:
    watch, state = tmp_path / "incoming", tmp_path / "state"
    watch.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'watch_dir = "{watch}"\nstate_dir = "{state}"\nprofile = "x86-cpu"\n'
        'site = "corpus"\ndevice_id = "box"\nstudy_quiet_seconds = 1\n'
        "[intake]\npoll_interval_seconds = 0.2\nfile_stable_seconds = 0\n"
        f'[mqtt]\nhost = "{mosquitto.host}"\nport = {mosquitto.port}\n'
    )
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield watch, state / "state.sqlite3", proc, "edge-triage/v1/corpus/box"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.slow
def test_the_daemon_handles_the_whole_corpus_and_stays_healthy(daemon, subscriber) -> None:
    watch, db, proc, base = daemon
    rejected_topic = subscriber(f"{base}/rejected")
    results_topic = subscriber(f"{base}/study/#")
    status_topic = subscriber(f"{base}/status")
    wait_until(
        lambda: any(m.json()["state"] == "online" for m in status_topic.messages), 60, "online"
    )
    for path in CORPUS:
        target = watch / path.relative_to(TEST_FILES)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)

    def settled() -> bool:
        files = query(db, "SELECT count(*) FROM files")
        pending = query(db, "SELECT count(*) FROM studies WHERE state != 'scored'")
        outbox = query(db, "SELECT count(*) FROM outbox WHERE kind IN ('result', 'rejected')")
        return (
            bool(files) and files[0][0] == len(CORPUS) and pending[0][0] == 0 and not outbox[0][0]
        )

    wait_until(settled, 240, "every corpus file handled and every study published", poll=0.2)
    assert proc.poll() is None, "the daemon died"

    files = query(db, "SELECT path, status, reason FROM files")
    instances = {
        path: (state, reason)
        for path, state, reason in query(db, "SELECT path, state, reason FROM instances")
    }
    summary: Counter[str] = Counter()
    for path, status, reason in files:
        if status in ("rejected", "skipped"):
            assert_reason(reason)
            summary[status] += 1
        elif status == "accepted":
            state, why = instances[path]
            assert state in ("scored", "unused", "rejected"), f"{path}: {state}"
            if state == "rejected":
                assert_reason(why)
            summary[f"accepted, {state}"] += 1
        else:
            assert status == "duplicate"  # a SOPInstanceUID seen in another file
            summary[status] += 1
    print(f"\ndaemon, {len(files)} corpus files: {dict(summary)}")
    rejected_files = sum(1 for _, status, _ in files if status == "rejected")
    rejected_instances = sum(1 for state, _ in instances.values() if state == "rejected")
    wait_until(
        lambda: len(rejected_topic.messages) >= rejected_files + rejected_instances,
        30,
        "a P/rejected message per rejected file",
    )
    assert all(m.json()["reason"] for m in rejected_topic.messages)
    studies = query(db, "SELECT count(*) FROM studies")[0][0]
    wait_until(lambda: len(results_topic.messages) >= studies, 30, "a result per study")
    for message in results_topic.messages:
        result = message.json()
        assert result["triage"] != "not_scored" or result["reason"]
    assert summary["accepted, scored"] >= 1

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_a_pixel_data_element_with_an_unknown_vr_is_a_reason(tmp_path: Path) -> None:
    """Found by the fuzzer above: Pixel Data whose VR bytes read 'OT' made pydicom raise
    NotImplementedError on first access, which escaped preprocessing as a crash."""
    data = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    at = data.rfind(b"\xe0\x7f\x10\x00OW")
    assert at > 0
    path = tmp_path / "ot.dcm"
    path.write_bytes(data[: at + 4] + b"OT" + data[at + 6 :])
    kind, reason = pixel_outcome(path)
    assert (kind, reason) == ("rejected", "unreadable Pixel Data element (NotImplementedError)")
