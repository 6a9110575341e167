"""`edge-export siglip` and `edge-export verify` on tiny random SigLIP checkpoints.

The checkpoints are transformers' own SiglipModel (a small config of the real architecture)
with a SentencePiece tokenizer trained on the prompts, saved with save_pretrained: the same
folder layout a downloaded MedSigLIP has. Calibration images are simulated CR studies written
as DICOM and read back by the export (through the daemon's preprocessing). Scores from the
written bundle, computed the daemon's way (ONNX Runtime + the manifest's head), are held to
what SiglipModel's own forward pass says.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from helpers.tiny_siglip import FINDINGS_TOML, IMAGE_SIZE, make_checkpoint  # noqa: E402
from transformers import SiglipModel, SiglipTokenizer  # noqa: E402

from edge_agent import imaging  # noqa: E402
from edge_agent.bundle import ZeroShotHead, load_bundle  # noqa: E402
from edge_agent.errors import BundleError  # noqa: E402
from edge_agent.profiles import resolve_profile  # noqa: E402
from edge_agent.runners import open_runner  # noqa: E402
from edge_agent.simulate import simulate  # noqa: E402
from edge_agent.triage import Head  # noqa: E402
from export.cli import main  # noqa: E402

pytestmark = pytest.mark.export


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("siglip")


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    return make_checkpoint(work / "tiny-siglip")


@pytest.fixture(scope="module")
def findings(work: Path) -> Path:
    path = work / "findings.toml"
    path.write_text(FINDINGS_TOML)
    return path


@pytest.fixture(scope="module")
def calibration(work: Path) -> Path:
    folder = work / "calibration"
    for _ in simulate(folder, studies=6, modality="CR", abnormal=0.5, seed=3, rows=256, cols=208):
        pass
    return folder


@pytest.fixture(scope="module")
def fp32_bundle(work: Path, checkpoint: Path, findings: Path, calibration: Path) -> Path:
    out = work / "bundle-fp32"
    code = main(
        [
            "siglip",
            "--checkpoint",
            str(checkpoint),
            "--findings",
            str(findings),
            "--calibration",
            str(calibration),
            "--out",
            str(out),
            "--model-version",
            "test.1",
        ]
    )
    assert code == 0
    return out


def frontal_images(folder: Path, size: int) -> tuple[list[pydicom.Dataset], np.ndarray]:
    from edge_agent.bundle import Preprocessing

    spec = Preprocessing(input_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    datasets = []
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if str(ds.get("ViewPosition", "")) in ("PA", "AP"):
            datasets.append(ds)
    return datasets, np.stack([imaging.preprocess(ds, spec) for ds in datasets])


def pytorch_scores(checkpoint: Path, pixels: np.ndarray, prompts: list[str]) -> np.ndarray:
    """SiglipModel's own forward pass: sigmoid(logits_per_image) for each prompt."""
    model = SiglipModel.from_pretrained(str(checkpoint), local_files_only=True).eval()
    tokenizer = SiglipTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    ids = tokenizer(
        [p.lower() for p in prompts], padding="max_length", max_length=64, return_tensors="pt"
    )["input_ids"]
    with torch.inference_mode():
        out = model(input_ids=ids, pixel_values=torch.from_numpy(pixels))
    return out.logits_per_image.numpy()


def test_fp32_bundle_scores_match_siglip_forward(
    fp32_bundle: Path, checkpoint: Path, calibration: Path
) -> None:
    bundle = load_bundle(fp32_bundle)
    m = bundle.manifest
    assert m.precision == "fp32" and not m.model.demo
    assert m.model.name == "tiny-siglip" and m.model.version == "test.1"
    assert "weights sha256" in m.model.source
    assert m.encoder.preprocessing.input_size == IMAGE_SIZE
    assert isinstance(m.head, ZeroShotHead) and m.head.absent_embeddings is not None
    assert m.parity is not None and m.parity["reference"] == "pytorch fp32"
    assert m.parity["cosine_min"] > 0.9999 and m.parity["triage_agreement"] == 1.0
    assert "calibration DICOM" in str(m.parity["image_source"])

    _, pixels = frontal_images(calibration, IMAGE_SIZE)
    runner = open_runner(bundle, resolve_profile("x86-cpu")[0])
    got = Head(bundle).scores(runner.embed(pixels))

    # pneumothorax: one prompt each way -> softmax(present, absent) of SigLIP's logits.
    logits = pytorch_scores(checkpoint, pixels, ["Apical Pneumothorax", "no pneumothorax"])
    expected = 1.0 / (1.0 + np.exp(-(logits[:, 0] - logits[:, 1])))
    np.testing.assert_allclose(got[:, 0], expected, atol=1e-4)
    assert np.ptp(got[:, 0]) > 1e-3  # the images are told apart: not a constant score


def test_present_only_findings_use_siglip_pairwise_sigmoid(
    work: Path, checkpoint: Path, calibration: Path
) -> None:
    findings = work / "present-only.toml"
    findings.write_text(
        '[[finding]]\ncode = "pneumothorax"\nlabel = "Pneumothorax"\n'
        'present = ["apical pneumothorax"]\nreview_threshold = 0.3\n'
    )
    out = work / "bundle-present-only"
    args = ["siglip", "--checkpoint", str(checkpoint), "--findings", str(findings)]
    assert main([*args, "--calibration", str(calibration), "--out", str(out)]) == 0
    bundle = load_bundle(out)
    assert isinstance(bundle.manifest.head, ZeroShotHead)
    assert bundle.manifest.head.absent_embeddings is None
    _, pixels = frontal_images(calibration, IMAGE_SIZE)
    got = Head(bundle).scores(open_runner(bundle, resolve_profile("x86-cpu")[0]).embed(pixels))
    logits = pytorch_scores(checkpoint, pixels, ["apical pneumothorax"])
    np.testing.assert_allclose(got[:, 0], 1.0 / (1.0 + np.exp(-logits[:, 0])), atol=1e-4)


def test_text_prompts_are_lower_cased_and_padded_to_64(checkpoint: Path) -> None:
    from export.siglip import embed_texts, load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    assert ckpt.text_positions == 64
    a, b = embed_texts(ckpt, ["Apical PNEUMOTHORAX", "apical pneumothorax"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    # padding=True (shortest) would give a different embedding: SigLIP pools the last token.
    ids = ckpt.tokenizer(["apical pneumothorax"], padding=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        short = ckpt.model.text_model(input_ids=ids).pooler_output.numpy()[0]
    short /= np.linalg.norm(short)
    assert float(short @ b) < 0.9999


@pytest.mark.slow
def test_int8_bundle_passes_the_gate_and_runs_in_the_daemon(
    work: Path, checkpoint: Path, findings: Path, calibration: Path, fp32_bundle: Path
) -> None:
    out = work / "bundle-int8"
    code = main(
        [
            "siglip",
            "--checkpoint",
            str(checkpoint),
            "--findings",
            str(findings),
            "--precision",
            "int8",
            "--calibration",
            str(calibration),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    bundle = load_bundle(out)
    parity = bundle.manifest.parity
    assert bundle.manifest.precision == "int8" and parity is not None
    assert parity["cosine_mean"] >= 0.99 and parity["triage_agreement"] >= 0.98
    assert str(parity["int8_mode"]).startswith("dynamic")
    assert "held-out" in str(parity["image_source"])
    import onnx

    ops = {n.op_type for n in onnx.load(str(bundle.encoder_path)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, ops
    # Same text side as the fp32 bundle; a different encoder, so a different identity.
    fp32 = load_bundle(fp32_bundle)
    assert bundle.manifest.head == fp32.manifest.head
    assert bundle.sha256 != fp32.sha256
    _, pixels = frontal_images(calibration, IMAGE_SIZE)
    runner = open_runner(bundle, resolve_profile("x86-cpu")[0])
    int8_scores = Head(bundle).scores(runner.embed(pixels))
    fp32_scores = Head(fp32).scores(open_runner(fp32, resolve_profile("x86-cpu")[0]).embed(pixels))
    assert np.abs(int8_scores - fp32_scores).max() < 0.05

    # verify: hashes, then parity re-run against PyTorch and against the fp32 bundle.
    assert main(["verify", str(out)]) == 0
    for reference in (["--checkpoint", str(checkpoint)], ["--reference", str(fp32_bundle)]):
        assert main(["verify", str(out), "--images", str(calibration), *reference]) == 0


@pytest.mark.slow
def test_int8_qdq_for_tensorrt_has_explicit_quantize_nodes(
    work: Path, checkpoint: Path, findings: Path, calibration: Path
) -> None:
    out = work / "bundle-qdq"
    args = ["siglip", "--checkpoint", str(checkpoint), "--findings", str(findings)]
    args += ["--precision", "int8", "--int8-mode", "qdq", "--calibration", str(calibration)]
    assert main([*args, "--out", str(out)]) == 0
    bundle = load_bundle(out)
    import onnx

    ops = [n.op_type for n in onnx.load(str(bundle.encoder_path)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    assert str(bundle.manifest.parity["int8_mode"]).startswith("qdq")  # type: ignore[index]


def test_fp16_bundle(work: Path, checkpoint: Path, findings: Path) -> None:
    out = work / "bundle-fp16"
    args = ["siglip", "--checkpoint", str(checkpoint), "--findings", str(findings)]
    assert main([*args, "--precision", "fp16", "--out", str(out)]) == 0
    bundle = load_bundle(out)
    assert bundle.manifest.precision == "fp16"
    assert "simulated" in str(bundle.manifest.parity["image_source"])  # type: ignore[index]
    import onnx

    model = onnx.load(str(bundle.encoder_path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_parity_gate_refuses_a_model_that_breaks_in_fp16(
    work: Path, findings: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Patch embeddings scaled so that activations leave fp16's range (65504): fine in fp32,
    # inf/NaN in fp16. The gate must catch it and write nothing.
    broken = make_checkpoint(work / "overflows-fp16", seed=1, patch_scale=3e5)
    out = work / "bundle-broken"
    args = ["siglip", "--checkpoint", str(broken), "--findings", str(findings)]
    assert main([*args, "--out", str(out)]) == 0  # fp32 is fine
    shutil.rmtree(out)
    assert main([*args, "--precision", "fp16", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "parity gate" in err and "no bundle written" in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_parity_bar_is_configurable(
    work: Path, checkpoint: Path, findings: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "bundle-impossible-bar"
    args = ["siglip", "--checkpoint", str(checkpoint), "--findings", str(findings)]
    # fp16's cosine is 0.99999x, never exactly 1: a bar of 1.0 refuses it.
    args += ["--precision", "fp16", "--min-cosine-mean", "1.0", "--out", str(out)]
    assert main(args) == 1
    assert "mean cosine" in capsys.readouterr().err
    assert not out.exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "code", "message"),
    [
        ("missing-folder", 3, "does not exist"),
        ("no-config", 2, "config.json is missing"),
        ("not-siglip", 2, "not 'siglip'"),
        ("remote-code", 2, "remote code"),
        ("no-weights", 2, "no weights"),
        ("no-tokenizer", 2, "no tokenizer"),
        ("corrupt-weights", 2, "does not load"),
    ],
)
def test_bad_checkpoints_give_a_clear_error(
    damage: str,
    code: int,
    message: str,
    work: Path,
    checkpoint: Path,
    findings: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = tmp_path / "ckpt"
    if damage != "missing-folder":
        _copy(checkpoint, ckpt)
    if damage == "no-config":
        (ckpt / "config.json").unlink()
    elif damage in ("not-siglip", "remote-code"):
        config = json.loads((ckpt / "config.json").read_text())
        if damage == "not-siglip":
            config["model_type"] = "clip"
        else:
            config["auto_map"] = {"AutoModel": "modeling_custom.Model"}
        (ckpt / "config.json").write_text(json.dumps(config))
    elif damage == "no-weights":
        (ckpt / "model.safetensors").unlink()
    elif damage == "no-tokenizer":
        (ckpt / "spiece.model").unlink()
    elif damage == "corrupt-weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "bundle"
    args = ["siglip", "--checkpoint", str(ckpt), "--findings", str(findings), "--out", str(out)]
    assert main(args) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("edge-export: ") and message in last
    assert not out.exists()


def test_int8_without_calibration_names_the_option(
    checkpoint: Path, findings: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["siglip", "--checkpoint", str(checkpoint), "--findings", str(findings)]
    assert main([*args, "--precision", "int8", "--out", str(tmp_path / "b")]) == 2
    assert "--calibration" in capsys.readouterr().err


def test_existing_bundle_is_not_replaced_without_overwrite(
    fp32_bundle: Path, checkpoint: Path, findings: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (fp32_bundle / "manifest.json").read_bytes()
    args = ["siglip", "--checkpoint", str(checkpoint), "--findings", str(findings)]
    assert main([*args, "--out", str(fp32_bundle)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (fp32_bundle / "manifest.json").read_bytes() == before


def test_tampered_bundle_is_refused_by_verify_and_the_daemon(
    fp32_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _copy(fp32_bundle, tmp_path / "tampered")
    encoder = bundle / "encoder.onnx"
    data = bytearray(encoder.read_bytes())
    data[-100] ^= 0xFF
    encoder.write_bytes(bytes(data))
    assert main(["verify", str(bundle)]) == 3
    assert "encoder.onnx" in capsys.readouterr().err
    with pytest.raises(BundleError, match=r"encoder\.onnx"):
        load_bundle(bundle)


def test_verify_needs_a_reference_for_parity(
    fp32_bundle: Path, calibration: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(fp32_bundle), "--images", str(calibration)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_default_findings_are_the_shipped_chest_findings(
    work: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = work / "bundle-default-findings"
    assert main(["siglip", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    manifest = load_bundle(out).manifest
    codes = {f.code for f in manifest.findings}
    assert {"pneumothorax", "pleural_effusion", "pneumoperitoneum", "lung_nodule"} <= codes
    assert {"consolidation"} <= codes
    assert isinstance(manifest.head, ZeroShotHead) and manifest.head.absent_embeddings
    summary = capsys.readouterr().out
    assert "parity" in summary and "% of fp32" in summary and "total" in summary


def test_ct_findings_export_a_bundle_that_scores_ct_through_slabs(
    work: Path, checkpoint: Path, tmp_path: Path
) -> None:
    from helpers.ct import ingest, score, scorer_for

    from edge_agent.store import Store
    from export.findings import default_findings_path

    out = work / "bundle-ct"
    findings = default_findings_path("ct-chest")
    assert (
        main(
            [
                "siglip",
                "--checkpoint",
                str(checkpoint),
                "--findings",
                str(findings),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    manifest = load_bundle(out).manifest
    assert manifest.ct is not None and manifest.ct.convention == "three_windows"
    assert [f.modalities for f in manifest.findings] == [("CT",)]

    watch = tmp_path / "in"
    list(simulate(watch, studies=1, modality="CT", abnormal=1.0, seed=4, rows=48, cols=48))
    store = Store(tmp_path / "state.sqlite3")
    try:
        uid = ingest(store, watch)
        result, _ = score(scorer_for(out, watch), store, uid)
    finally:
        store.close()
    assert result.modality == "CT" and result.reason is None
    (finding,) = result.findings
    assert finding.code == "lung_nodule" and finding.slab is not None
    assert 0.0 <= finding.score <= 1.0


def test_ct_findings_without_a_ct_table_name_the_key(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    findings = tmp_path / "ct.toml"
    findings.write_text(
        '[[finding]]\ncode = "x"\nlabel = "X"\nmodalities = ["CT"]\npresent = ["x"]\n'
        "review_threshold = 0.5\n"
    )
    args = ["siglip", "--checkpoint", str(checkpoint), "--findings", str(findings)]
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert "findings(ct.toml).ct" in capsys.readouterr().err
