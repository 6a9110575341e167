"""`edge-export add-report`: a MedGemma export into an engine bundle, as a new bundle.

Real pieces throughout: the tiny Gemma 3 checkpoint (tests/helpers/tiny_gemma3.py, Gemma 3's
own chat template) exported by the real `edge-export medgemma` at fp32 (every graph with a
.data file beside it, as MedGemma 4B's will be), and the tiny hand-built bundle
(tests/helpers/tiny_bundle.py) with a device engine recorded, so that engines are seen to
come along.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from helpers.tiny_bundle import make_bundle
from helpers.tiny_gemma3 import CHAT_TEMPLATE, TOKENS_PER_IMAGE, make_checkpoint
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_agent.bundle import MANIFEST, Engine, load_bundle
from export import cli, medgemma, report_bundle
from export.tensorrt import install_engine

pytestmark = pytest.mark.export


def run(argv: list[str]) -> int:
    return cli.main(argv)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("edge-export: ")
    return last


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("add-report")


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    """The tiny checkpoint with its chat template in tokenizer_config.json, as older
    checkpoints keep it (the export must still write chat_template.jinja)."""
    folder = make_checkpoint(work / "tiny-gemma3")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (folder / "chat_template.jinja").read_text()
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink()
    return folder


@pytest.fixture(scope="module")
def export(work: Path, checkpoint: Path) -> Path:
    out = work / "medgemma-fp32"
    args = ["medgemma", "--checkpoint", str(checkpoint), "--out", str(out), "--weights", "fp32"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(medgemma, "EXTERNAL_DATA_THRESHOLD", 0)  # every graph with a .data file
        assert run([*args, "--threads", "1", "--parity-tokens", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def bundle(work: Path) -> Path:
    root = make_bundle(work / "bundle")
    engine = Engine(
        file="unused",
        device="NVIDIA Test GPU",
        compute_capability="8.7",
        tensorrt_version="10.3.0",
        precision="fp16",
        profile="test",
        min_batch=1,
        opt_batch=1,
        max_batch=4,
        workspace_mib=256,
        built_at="2026-11-29T00:00:00Z",
        build_seconds=1.0,
    )
    install_engine(root, b"not a real plan", engine)
    return root


@pytest.fixture(scope="module")
def with_report(work: Path, bundle: Path, export: Path) -> Path:
    out = work / "bundle-with-report"
    assert add_report(bundle, export, out) == 0
    return out


def add_report(bundle: Path, report: Path, out: Path, *extra: str) -> int:
    argv = ["add-report", "--bundle", str(bundle), "--report", str(report), "--out", str(out)]
    return run([*argv, *extra])


# --- the chat template ------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def jinja() -> ImmutableSandboxedEnvironment:
    """The environment transformers' apply_chat_template (and the daemon) renders with."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env


def render_image_turn(template: str, bos: str, question: str) -> str:
    """One user turn with an image and a question, as the daemon renders it."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    return (
        jinja()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True, bos_token=bos)
    )


def test_image_prompt_is_the_chat_template_with_the_image_expanded(export: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    description = json.loads((export / medgemma.DESCRIPTION).read_text())
    assert description["chat_template"] == "chat_template.jinja"
    assert description["tokens"] == {
        "bos": "<bos>",
        "boi": "<start_of_image>",
        "image": "<image_soft_token>",
        "eoi": "<end_of_image>",
    }
    # Written from tokenizer_config.json (the checkpoint had no chat_template.jinja), hashed.
    template = (export / "chat_template.jinja").read_text()
    assert template == CHAT_TEMPLATE
    assert "chat_template.jinja" in description["files"]
    assert "tokenizer.json" in description["files"]

    tokens = description["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    image = tokens["boi"] + tokens["image"] * TOKENS_PER_IMAGE + tokens["eoi"]
    for question in ("Any fracture?", "  Describe the findings.\n"):
        rendered = render_image_turn(template, tokens["bos"], question)
        expanded = rendered.replace(tokens["boi"], f"\n\n{image}\n\n")
        assert expanded == medgemma.image_prompt(tokenizer, question.strip(), TOKENS_PER_IMAGE)
        # transformers' own rendering agrees, and so do the two tokenizers' ids.
        assert rendered == tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        fast = Tokenizer.from_file(str(export / "tokenizer.json"))
        ids = fast.encode(expanded, add_special_tokens=False).ids
        assert ids == tokenizer(expanded, add_special_tokens=False)["input_ids"]
        assert ids.count(tokenizer.convert_tokens_to_ids(tokens["image"])) == TOKENS_PER_IMAGE

    # Gemma 3's template: a system prompt goes into the first user turn; roles alternate.
    env = jinja()
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert env.from_string(template).render(messages=chat, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
    )
    with pytest.raises(TemplateError, match="alternate"):
        env.from_string(template).render(messages=chat[1:2] * 2, bos_token="<bos>")


def test_a_checkpoint_without_a_chat_template_is_refused(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "no-template"
    shutil.copytree(checkpoint, ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert run(["medgemma", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert str(ckpt) in line and "no chat template" in line
    assert not out.exists()


def test_chat_template_is_found_where_transformers_keeps_it(tmp_path: Path) -> None:
    assert medgemma.read_chat_template(tmp_path) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "processor"}))
    assert medgemma.read_chat_template(tmp_path) == "processor"
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert medgemma.read_chat_template(tmp_path) == "dflt"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert medgemma.read_chat_template(tmp_path) == "jinja"


# --- add-report -------------------------------------------------------------------------------


def test_the_new_bundle_has_the_report_and_the_same_identity(
    with_report: Path, bundle: Path, export: Path
) -> None:
    source = load_bundle(bundle)
    new = load_bundle(with_report)
    assert source.manifest.report is None  # the source bundle is left as it was
    report = new.manifest.report
    assert report is not None
    # The narrative does not change what decides the scores: same model sha256, same alert ids.
    assert new.sha256 == source.sha256
    assert new.manifest.model_dump(exclude={"report", "files"}) == source.manifest.model_dump(
        exclude={"report", "files"}
    )
    # Every file of the bundle (the engine included), the export's under report/.
    description = json.loads((export / medgemma.DESCRIPTION).read_text())
    expected = set(source.manifest.files) | {f"report/{n}" for n in description["files"]}
    assert set(new.manifest.files) == expected | {"report/medgemma.json"}
    assert any(n.startswith("engines/") for n in new.manifest.files)
    assert {"report/decoder.onnx.data", "report/vision.onnx.data"} <= set(new.manifest.files)
    for name, digest in description["files"].items():
        assert new.manifest.files[f"report/{name}"].sha256 == digest
    # Hard links on the same filesystem: nothing is duplicated.
    assert os.path.samefile(with_report / "encoder.onnx", bundle / "encoder.onnx")
    assert os.path.samefile(with_report / "report/decoder.onnx", export / "decoder.onnx")

    assert report.format == "edge-triage-medgemma/1"
    assert report.source == "tiny-gemma3" and report.name == "medgemma-tiny-gemma3"
    assert report.graphs.decoder.file == "report/decoder.onnx"
    assert report.graphs.decoder.precision == "fp32"
    assert report.tokenizer == "report/tokenizer.json"
    assert report.chat_template == "report/chat_template.jinja"
    assert report.tokens.boi == "<start_of_image>" and report.tokens.bos == "<bos>"
    assert report.image.size == 64 and report.image.tokens_per_image == TOKENS_PER_IMAGE
    assert report.text.model_dump() == description["text"]
    assert report.weights_sha256 == description["weights_sha256"]
    assert report.parity is not None and report.parity["fp32_greedy_equal"] is True
    assert report.prompts.radiograph == report_bundle.DEFAULT_RADIOGRAPH_PROMPT
    assert report.prompts.ct == report_bundle.DEFAULT_CT_PROMPT
    assert report.max_new_tokens == 96
    leftovers = [p.name for p in with_report.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_options_and_an_existing_report_is_replaced(
    with_report: Path, export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "again"
    options = ["--name", "student-1", "--prompt-radiograph", "Findings?", "--max-new-tokens", "32"]
    assert add_report(with_report, export, out, *options) == 0
    printed = capsys.readouterr().out
    assert "replaced   the report medgemma-tiny-gemma3" in printed
    assert "(unchanged" in printed and "hard-linked" in printed
    new = load_bundle(out)
    old = load_bundle(with_report)
    assert new.manifest.files == old.manifest.files  # the old report's files, replaced
    assert new.manifest.report is not None
    assert new.manifest.report.name == "student-1"
    assert new.manifest.report.prompts.radiograph == "Findings?"
    assert new.manifest.report.prompts.ct == report_bundle.DEFAULT_CT_PROMPT
    assert new.manifest.report.max_new_tokens == 32
    assert new.sha256 == old.sha256

    # In place: the bundle itself, only with --overwrite.
    before = (out / MANIFEST).read_bytes()
    assert add_report(out, export, out) == 2
    assert "already exists" in one_line_error(capsys)
    assert (out / MANIFEST).read_bytes() == before
    assert add_report(out, export, out, "--overwrite", "--name", "in-place") == 0
    report = load_bundle(out).manifest.report
    assert report is not None and report.name == "in-place"


def test_overwrite_only_replaces_a_bundle(
    bundle: Path, export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert add_report(bundle, export, out) == 0
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert add_report(bundle, export, out) == 2
    assert "already exists (pass --overwrite" in one_line_error(capsys)
    assert (out / MANIFEST).stat().st_mtime_ns == stamp
    assert add_report(bundle, export, out, "--overwrite") == 0
    assert load_bundle(out).manifest.report is not None

    not_a_bundle = tmp_path / "notes"
    not_a_bundle.mkdir()
    (not_a_bundle / "keep.txt").write_text("mine")
    assert add_report(bundle, export, not_a_bundle, "--overwrite") == 2
    assert "is not a bundle" in one_line_error(capsys)
    assert (not_a_bundle / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tamper", "sha256 of decoder.onnx.data does not match medgemma.json"),
        ("missing-file", "tokenizer.json is listed in medgemma.json but missing"),
        ("no-description", "medgemma.json is missing"),
        ("missing-folder", "does not exist"),
        ("old-export", "has no tokens"),
    ],
)
def test_a_damaged_report_export_is_refused_naming_the_file(
    damage: str,
    message: str,
    bundle: Path,
    export: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = tmp_path / "report"
    if damage != "missing-folder":
        shutil.copytree(export, report)
    if damage == "tamper":
        data = bytearray((report / "decoder.onnx.data").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (report / "decoder.onnx.data").write_bytes(bytes(data))
    elif damage == "missing-file":
        (report / "tokenizer.json").unlink()
    elif damage == "no-description":
        (report / medgemma.DESCRIPTION).unlink()
    elif damage == "old-export":
        description = json.loads((report / medgemma.DESCRIPTION).read_text())
        del description["tokens"]
        (report / medgemma.DESCRIPTION).write_text(json.dumps(description))
    out = tmp_path / "out"
    assert add_report(bundle, report, out) == 3
    line = one_line_error(capsys)
    assert message in line and str(report) in line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_usage_errors_and_a_bad_bundle(
    bundle: Path, export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert add_report(bundle, export, out, "--prompt-ct", "  ") == 2
    assert "--prompt-ct" in one_line_error(capsys)
    with pytest.raises(SystemExit) as exc:
        add_report(bundle, export, out, "--max-new-tokens", "0")
    assert exc.value.code == 2
    capsys.readouterr()
    assert add_report(bundle, export, export / "inside") == 2
    assert "overlap" in one_line_error(capsys)
    assert add_report(tmp_path / "nowhere", export, out) == 3
    assert "does not exist" in one_line_error(capsys)

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "encoder.onnx").write_bytes(b"changed")
    assert add_report(broken, export, out) == 3
    assert "encoder.onnx" in one_line_error(capsys)
    assert not out.exists()
