"""`edge-export medgemma` on a tiny random Gemma 3 multimodal checkpoint.

The checkpoint is transformers' own Gemma3ForConditionalGeneration (a small config of the real
architecture: SigLIP tower, pooling projector, GQA, local and global layers, bidirectional
image-token mask) with a GemmaTokenizer built by the tests, saved with save_pretrained. The
exported graphs are driven by the export's plain numpy + ONNX Runtime loop and held to
PyTorch's own ``generate`` token for token, on a prompt and an image the export's parity gate
did not see.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from helpers.tiny_gemma3 import SLIDING_WINDOW, TOKENS_PER_IMAGE, make_checkpoint  # noqa: E402
from transformers import AutoTokenizer, Gemma3ForConditionalGeneration  # noqa: E402

from edge_agent.gemma import OnnxGemma3, TextConfig, attention_masks  # noqa: E402
from export import cli, medgemma  # noqa: E402

pytestmark = pytest.mark.export


def export_cli(argv: list[str]) -> int:
    """``edge-export medgemma …`` as a user runs it (exit codes, one-line errors)."""
    return cli.main(argv)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("medgemma")


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    return make_checkpoint(work / "tiny-gemma3")


def _export(work: Path, checkpoint: Path, weights: str) -> Path:
    out = work / f"export-{weights}"
    args = ["medgemma", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert export_cli([*args, "--weights", weights, "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def fp32_export(work: Path, checkpoint: Path) -> Path:
    return _export(work, checkpoint, "fp32")


@pytest.fixture(scope="module")
def int4_export(work: Path, checkpoint: Path) -> Path:
    # Every graph with its weights in a .data file beside it, as MedGemma 4B's will be.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(medgemma, "EXTERNAL_DATA_THRESHOLD", 0)
        return _export(work, checkpoint, "int4")


def _pipeline(out: Path) -> OnnxGemma3:
    description = json.loads((out / medgemma.DESCRIPTION).read_text())
    graphs = description["graphs"]
    text = description["text"]
    config = TextConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in text.items()})
    return OnnxGemma3(
        out / graphs["vision"]["file"],
        out / graphs["embed"]["file"],
        out / graphs["decoder"]["file"],
        config,
        threads=1,
    )


def _prompt(out: Path, question: str) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    text = medgemma.image_prompt(tokenizer, question, TOKENS_PER_IMAGE)
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _torch_greedy(
    checkpoint: Path, ids: np.ndarray, pixels: np.ndarray, tokens: int
) -> tuple[list[int], np.ndarray]:
    model = Gemma3ForConditionalGeneration.from_pretrained(str(checkpoint)).eval()
    input_ids = torch.from_numpy(ids[None])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=torch.from_numpy(pixels),
            token_type_ids=(input_ids == model.config.image_token_id).long(),
            do_sample=False,
            max_new_tokens=tokens,
            return_dict_in_generate=True,
            output_logits=True,
        )
    first = out.logits[0][0].numpy()
    return [int(t) for t in out.sequences[0, ids.shape[0] :]], first


def test_fp32_onnx_greedy_equals_pytorch_token_for_token(
    fp32_export: Path, checkpoint: Path
) -> None:
    description = json.loads((fp32_export / medgemma.DESCRIPTION).read_text())
    assert description["format"] == medgemma.FORMAT
    assert description["parity"]["fp32_greedy_equal"] is True
    assert description["graphs"]["decoder"]["precision"] == "fp32"
    for name, digest in description["files"].items():
        assert medgemma.sha256_file(fp32_export / name) == digest

    # A prompt and an image the export's gate did not use; longer than the sliding window
    # and past the image block, so local layers, the KV cache and positions all count.
    ids = _prompt(fp32_export, "Any fracture?")
    pixels = medgemma.stand_in_images(1, 64, seed=1)
    tokens = 24
    assert len(ids) > SLIDING_WINDOW + TOKENS_PER_IMAGE
    expected, first_logits = _torch_greedy(checkpoint, ids, pixels, tokens)
    pipeline = _pipeline(fp32_export)
    got = pipeline.generate(ids, pixels, tokens)
    assert got == expected
    assert len(set(expected)) > 3  # not a degenerate repetition

    # Prefill logits match PyTorch closely, and the image is really read: another image
    # changes them.
    onnx_first = pipeline.continuation_logits(ids, pixels, expected)[0]
    assert np.abs(onnx_first - first_logits).max() < 1e-4
    other = pipeline.continuation_logits(ids, -pixels, expected)[0]
    assert np.abs(other - first_logits).max() > 1e-2

    # Generating, the decoder computes the LM head at the last position only.
    assert pipeline.selects_logits
    embeds = pipeline.prompt_embeds(ids, pixels, ids == pipeline.config.image_token_id)
    token_type = (ids == pipeline.config.image_token_id).astype(np.int64)
    last, _ = pipeline._step(embeds, token_type, pipeline._empty_past(), last_only=True)
    assert last.shape == (1, pipeline.config.vocab_size)
    assert np.abs(last[0] - first_logits).max() < 1e-4


def test_int4_decoder_runs_and_stays_close(int4_export: Path, fp32_export: Path) -> None:
    import onnx

    description = json.loads((int4_export / medgemma.DESCRIPTION).read_text())
    decoder = int4_export / description["graphs"]["decoder"]["file"]
    nodes = onnx.load(str(decoder)).graph.node
    assert {n.op_type for n in nodes} >= {"MatMulNBits"}
    levels = {
        a.i
        for n in nodes
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}, "int8 compute (accuracy_level 4) by default"
    embed = int4_export / description["graphs"]["embed"]["file"]
    assert "GatherBlockQuantized" in {n.op_type for n in onnx.load(str(embed)).graph.node}
    assert description["graphs"]["embed"]["precision"].startswith("int4 weights")
    files = description["files"]
    assert {"vision.onnx.data", "embed.onnx.data", "decoder.onnx.data"} <= set(files)
    assert not list(int4_export.glob("decoder.fp32*"))
    for name, digest in files.items():
        assert medgemma.sha256_file(int4_export / name) == digest
    size = sum((int4_export / n).stat().st_size for n in files if n.startswith("decoder"))
    assert size < 0.5 * (fp32_export / "decoder.onnx").stat().st_size
    parity = description["parity"]
    assert parity["fp32_greedy_equal"] is True
    # The tiny random model's next-token distributions are nearly flat (mean log-likelihood
    # about -4.6 over 340 tokens), the hardest case for argmax agreement.
    assert abs(parity["quantized_log_likelihood_delta_mean"]) < 0.25
    assert parity["quantized_token_agreement"] >= 0.5

    ids = _prompt(int4_export, "Is the heart enlarged?")
    pixels = medgemma.stand_in_images(1, 64, seed=3)
    tokens = _pipeline(int4_export).generate(ids, pixels, 8)
    assert len(tokens) == 8 or tokens[-1] in _pipeline(int4_export).config.eos_token_ids


def test_parity_gate_refuses_a_decoder_that_generates_otherwise(
    fp32_export: Path, checkpoint: Path, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    from export.parity import ParityFailed

    # The same graphs with the LM head's weights shuffled: runs, but says other things.
    broken = tmp_path / "broken"
    shutil.copytree(fp32_export, broken)
    model = onnx.load(str(broken / "decoder.onnx"))
    head = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(head)
    shuffled = np.random.default_rng(0).permutation(weights.reshape(-1)).reshape(weights.shape)
    head.CopyFrom(numpy_helper.from_array(shuffled, head.name))
    onnx.save_model(model, str(broken / "decoder.onnx"))

    ckpt = medgemma.load_checkpoint(checkpoint)
    good = medgemma.check_parity(ckpt, _pipeline(fp32_export), None, max_new_tokens=4)
    medgemma.parity_gate(good)
    bad = medgemma.check_parity(ckpt, _pipeline(broken), None, max_new_tokens=4)
    with pytest.raises(ParityFailed, match="parity gate"):
        medgemma.parity_gate(bad)


def test_attention_masks_follow_gemma3() -> None:
    # tokens: text, image, image, image, text, text; window 2
    token_type = np.array([0, 1, 1, 1, 0, 0])
    full, sliding = attention_masks(token_type, 0, 2)
    allowed_full = full[0, 0] == 0
    allowed_sliding = sliding[0, 0] == 0
    assert allowed_full[1, 3] and allowed_full[3, 1]  # image tokens see each other both ways
    assert not allowed_full[0, 1] and not allowed_full[4, 5]  # text stays causal
    assert allowed_full[5, 0] and not allowed_sliding[5, 0]  # the window is local only
    assert allowed_sliding[5, 4] and allowed_sliding[5, 5]
    # decode: one new token after five, no image block for it
    full, sliding = attention_masks(token_type, 5, 2)
    assert full.shape == (1, 1, 1, 6) and (full == 0).all()
    assert ((sliding[0, 0, 0] == 0) == np.array([0, 0, 0, 0, 1, 1], bool)).all()


def test_fp16_is_refused_with_the_reason(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["medgemma", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert export_cli([*args, "--weights", "fp16"]) == 2
    assert "empty output" in capsys.readouterr().err
    assert not out.exists()


def test_existing_out_is_not_replaced_without_overwrite(
    fp32_export: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (fp32_export / medgemma.DESCRIPTION).read_bytes()
    args = ["medgemma", "--checkpoint", str(checkpoint), "--out", str(fp32_export)]
    assert export_cli([*args, "--weights", "fp32"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (fp32_export / medgemma.DESCRIPTION).read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "code", "message"),
    [
        ("missing-folder", 3, "does not exist"),
        ("no-config", 2, "config.json is missing"),
        ("text-only", 2, "text-only"),
        ("not-gemma3", 2, "not 'gemma3'"),
        ("remote-code", 2, "remote code"),
        ("no-weights", 2, "no weights"),
        ("no-tokenizer", 2, "no tokenizer"),
        ("no-image-tokens", 2, "tokenizer_config.json does not define boi_token"),
        ("corrupt-weights", 2, "does not load"),
    ],
)
def test_bad_checkpoints_give_a_clear_error(
    damage: str,
    code: int,
    message: str,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = tmp_path / "ckpt"
    if damage != "missing-folder":
        shutil.copytree(checkpoint, ckpt)
    config_path = ckpt / "config.json"
    if damage == "no-config":
        config_path.unlink()
    elif damage in ("text-only", "not-gemma3", "remote-code"):
        config = json.loads(config_path.read_text())
        if damage == "text-only":
            config["model_type"] = "gemma3_text"
        elif damage == "not-gemma3":
            config["model_type"] = "siglip"
        else:
            config["auto_map"] = {"AutoModel": "modeling_custom.Model"}
        config_path.write_text(json.dumps(config))
    elif damage == "no-weights":
        (ckpt / "model.safetensors").unlink()
    elif damage == "no-tokenizer":
        (ckpt / "tokenizer.json").unlink()
    elif damage == "no-image-tokens":
        tokenizer_config = json.loads((ckpt / "tokenizer_config.json").read_text())
        tokenizer_config.pop("extra_special_tokens", None)
        for key in medgemma.IMAGE_TOKENS:
            tokenizer_config.pop(key, None)
        (ckpt / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    elif damage == "corrupt-weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert export_cli(["medgemma", "--checkpoint", str(ckpt), "--out", str(out)]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("edge-export: ") and message in last
    assert not out.exists()
