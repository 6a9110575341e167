"""edge_agent.imaging: decoding, LUTs, windowing, MONOCHROME1, pad-to-square, resize."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from edge_agent.bundle import Preprocessing
from edge_agent.errors import ImageRejected
from edge_agent.imaging import _area_downscale, decode_pixels, preprocess, to_unit_range

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def make_ds(
    pixels: np.ndarray | list[list[int]],
    *,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    **elements: object,
) -> pydicom.Dataset:
    """A CR dataset holding ``pixels`` as native little-endian 16-bit stored values."""
    stored = np.asarray(pixels, dtype=np.int16 if signed else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    return ds


def spec(size: int, mean: float = 0.0, std: float = 1.0, **kwargs: object) -> Preprocessing:
    return Preprocessing(input_size=size, mean=(mean,) * 3, std=(std,) * 3, **kwargs)


def reference(ds: pydicom.Dataset, preprocessing: Preprocessing) -> np.ndarray:
    """The plain pipeline: pydicom LUTs over the full image, np.pad, cv2.resize."""
    image = apply_modality_lut(ds.pixel_array, ds)
    with np.errstate(over="ignore"):
        image = apply_voi_lut(image, ds).astype(np.float64)
    image = (image - image.min()) / (image.max() - image.min())
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = 1.0 - image
    if preprocessing.pad_to_square:
        rows, columns = image.shape
        side = max(rows, columns)
        top, left = (side - rows) // 2, (side - columns) // 2
        image = np.pad(image, ((top, side - rows - top), (left, side - columns - left)))
    n = preprocessing.input_size
    image = cv2.resize(image.astype(np.float32), (n, n), interpolation=cv2.INTER_AREA)
    return np.stack(
        [(image - m) / s for m, s in zip(preprocessing.mean, preprocessing.std, strict=True)]
    )


# 4x6 stored values, 12-bit unsigned, chosen around the window used below.
VALUES = np.array(
    [
        [45, 50, 55, 60, 65, 70],
        [75, 80, 85, 90, 95, 100],
        [0, 4095, 62, 71, 88, 49],
        [51, 52, 53, 54, 56, 57],
    ]
)


# --- decoding ---------------------------------------------------------------------------------


def test_decode_returns_stored_values_without_copying() -> None:
    ds = make_ds(VALUES)
    pixels = decode_pixels(ds)
    assert pixels.shape == (4, 6)
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels, VALUES)
    np.testing.assert_array_equal(pixels, ds.pixel_array)
    assert not pixels.flags.writeable  # a view of ds.PixelData


def test_decode_signed_values() -> None:
    values = [[-2048, -1, 0, 1, 2047, 5], [-300, 300, -7, 7, 12, -12]]
    pixels = decode_pixels(make_ds(values, signed=True))
    assert pixels.dtype == np.int16
    np.testing.assert_array_equal(pixels, values)


def test_decode_masks_unused_high_bits_like_pydicom() -> None:
    # Bits 12-15 carry junk (e.g. an old-style overlay): only the 12 stored bits count.
    values = np.array([[0xF123, 0x0456], [0x1FFF, 0x0000]], dtype=np.uint16)
    ds = make_ds(values)
    pixels = decode_pixels(ds)
    np.testing.assert_array_equal(pixels, [[0x123, 0x456], [0xFFF, 0x000]])
    np.testing.assert_array_equal(pixels, make_ds(values).pixel_array)


def test_decode_sign_extends_unused_high_bits_like_pydicom() -> None:
    # 12-bit signed -5 written without sign extension: 0x0FFB.
    raw = np.array([[0x0FFB, 0x0005], [0x0800, 0x07FF]], dtype=np.uint16)
    ds = make_ds(raw.view(np.int16), signed=True)
    pixels = decode_pixels(ds)
    np.testing.assert_array_equal(pixels, [[-5, 5], [-2048, 2047]])


def test_decode_8_bit_values_with_odd_length_padding() -> None:
    values = np.array([[0, 17, 255], [3, 128, 64], [9, 8, 7]], dtype=np.uint8)
    ds = make_ds(np.zeros((3, 3)))
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = values.tobytes() + b"\0"  # 9 bytes, padded to even length
    pixels = decode_pixels(ds)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, values)


@pytest.mark.parametrize(
    ("name", "transfer_syntax"),
    [
        ("CT_small.dcm", "Explicit VR Little Endian"),
        ("MR_small_implicit.dcm", "Implicit VR Little Endian"),
        ("MR_small_bigendian.dcm", "Explicit VR Big Endian"),
        ("MR_small_RLE.dcm", "RLE Lossless"),
        ("MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)"),
        ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression"),
    ],
)
def test_bundled_files_decode_and_preprocess_like_the_reference(
    name: str, transfer_syntax: str
) -> None:
    ds = pydicom.dcmread(TEST_FILES / name)
    assert ds.file_meta.TransferSyntaxUID.name == transfer_syntax
    pixels = decode_pixels(ds)
    np.testing.assert_array_equal(pixels, pydicom.dcmread(TEST_FILES / name).pixel_array)
    preprocessing = spec(48, 0.5, 0.5)
    out = preprocess(ds, preprocessing)
    assert out.shape == (3, 48, 48)
    expected = reference(pydicom.dcmread(TEST_FILES / name), preprocessing)
    np.testing.assert_allclose(out, expected, atol=1e-5)


# --- rejections -------------------------------------------------------------------------------


def rejected(ds: pydicom.Dataset) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        preprocess(ds, spec(8))
    return info.value


def test_rejects_no_pixel_data() -> None:
    ds = make_ds(VALUES)
    del ds.PixelData
    assert rejected(ds).reason == "no pixel data"


def test_rejects_constant_image() -> None:
    assert "same stored value" in rejected(make_ds(np.zeros((4, 6)))).reason
    assert "same stored value" in rejected(make_ds(np.full((4, 6), 1234))).reason


def test_rejects_multi_frame() -> None:
    ds = make_ds(np.vstack([VALUES, VALUES[::-1]]))  # two different frames
    ds.Rows = 4
    ds.NumberOfFrames = 2
    reason = rejected(ds).reason
    assert "multi-frame" in reason
    assert "2 frames" in reason


def test_rejects_truncated_pixel_data() -> None:
    ds = make_ds(VALUES)
    ds.PixelData = ds.PixelData[:-6]
    reason = rejected(ds).reason
    assert "42 bytes" in reason
    assert "48" in reason


def test_rejects_colour_with_unknown_photometric_interpretation() -> None:
    ds = make_ds(VALUES)
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PixelData = np.repeat(VALUES[:, :, None], 3, axis=2).astype("<u2").tobytes()
    assert "3 samples per pixel" in rejected(ds).reason


def test_rejects_palette_colour() -> None:
    assert "PALETTE COLOR" in rejected(make_ds(VALUES, photometric="PALETTE COLOR")).reason


def test_decoder_failure_names_the_transfer_syntax() -> None:
    ds = pydicom.dcmread(TEST_FILES / "JPEG-lossy.dcm")
    with pytest.raises(ImageRejected) as info:
        decode_pixels(ds)
    assert "JPEG Extended" in info.value.reason
    assert info.value.__cause__ is not None


def test_decoder_failure_on_garbage_codestream() -> None:
    ds = make_ds(VALUES)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 40])
    ds["PixelData"].VR = "OB"
    with pytest.raises(ImageRejected) as info:
        decode_pixels(ds)
    assert "JPEG 2000" in info.value.reason


@pytest.mark.parametrize(
    ("transfer_syntax", "words"),
    [("1.2.3.4.5", "(1.2.3.4.5)"), (None, "no transfer syntax")],
)
def test_unknown_or_missing_transfer_syntax(transfer_syntax: str | None, words: str) -> None:
    ds = make_ds(VALUES)
    if transfer_syntax is None:
        del ds.file_meta.TransferSyntaxUID
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    with pytest.raises(ImageRejected) as info:
        decode_pixels(ds)
    assert words in info.value.reason


@pytest.mark.parametrize(
    ("elements", "words"),
    [
        ({"WindowCenter": "100", "WindowWidth": "0.5"}, "Window Width"),
        ({"WindowCenter": "100", "WindowWidth": "50", "VOILUTFunction": "CUBIC"}, "CUBIC"),
        ({"WindowCenter": "90000", "WindowWidth": "10"}, "no contrast"),
    ],
)
def test_rejects_unusable_windows(elements: dict[str, str], words: str) -> None:
    assert words in rejected(make_ds(VALUES, **elements)).reason


# --- the value chain, by hand -----------------------------------------------------------------


def test_no_window_is_a_min_max_stretch() -> None:
    unit = to_unit_range(make_ds(VALUES), VALUES.astype(np.uint16))
    assert unit.dtype == np.float32
    assert unit[2, 0] == 0.0  # stored 0, the minimum
    assert unit[2, 1] == 1.0  # stored 4095, the maximum
    assert unit[0, 0] == pytest.approx(45 / 4095)
    np.testing.assert_allclose(unit, VALUES / 4095, rtol=1e-6)


def test_rescale_slope_and_intercept_then_linear_window() -> None:
    # modality value m = 2 v - 100; LINEAR window centre 40.5, width 81 (PS3.3 C.11.2.1.2.1):
    #   m <= c - 0.5 - (w - 1) / 2 = 0   -> bottom
    #   m >  c - 0.5 + (w - 1) / 2 = 80  -> top
    #   else ((m - (c - 0.5)) / (w - 1) + 0.5), i.e. m / 80 here.
    # The image reaches both ends, so the stretch maps bottom..top to 0..1.
    ds = make_ds(
        VALUES,
        RescaleSlope="2",
        RescaleIntercept="-100",
        WindowCenter="40.5",
        WindowWidth="81",
    )
    unit = to_unit_range(ds, decode_pixels(ds))
    assert unit[0, 0] == 0.0  # v 45: m -10, below the window
    assert unit[0, 1] == 0.0  # v 50: m 0, the lower edge belongs to "below"
    assert unit[0, 3] == pytest.approx(0.25)  # v 60: m 20
    assert unit[0, 5] == pytest.approx(0.5)  # v 70: m 40, the centre
    assert unit[1, 3] == pytest.approx(1.0)  # v 90: m 80, still inside
    assert unit[1, 4] == 1.0  # v 95: m 90, above
    np.testing.assert_allclose(unit, np.clip((2 * VALUES - 100) / 80, 0, 1), atol=1e-6)


def test_signed_values_with_intercept_and_window() -> None:
    values = np.array([[-2000, -100, -50, 0], [50, 100, 2000, 25]])
    # m = v + 1024; window centre 1024.5, width 201 -> unit = clip(v / 200 + 0.5, 0, 1)
    ds = make_ds(
        values,
        signed=True,
        RescaleSlope="1",
        RescaleIntercept="1024",
        WindowCenter="1024.5",
        WindowWidth="201",
    )
    unit = to_unit_range(ds, decode_pixels(ds))
    assert unit[0, 2] == pytest.approx(0.25)  # v -50
    assert unit[0, 3] == pytest.approx(0.5)  # v 0
    np.testing.assert_allclose(unit, np.clip(values / 200 + 0.5, 0, 1), atol=1e-6)


def test_negative_slope_flips_the_image() -> None:
    ds = make_ds(VALUES, RescaleSlope="-1", RescaleIntercept="0")
    unit = to_unit_range(ds, decode_pixels(ds))
    np.testing.assert_allclose(unit, 1 - VALUES / 4095, atol=1e-6)


def test_first_of_several_windows_is_used() -> None:
    ds = make_ds(VALUES, WindowCenter=["40.5", "2000"], WindowWidth=["81", "4000"])
    unit = to_unit_range(ds, decode_pixels(ds))
    np.testing.assert_allclose(unit, np.clip(VALUES / 80, 0, 1), atol=1e-6)


def test_sigmoid_window() -> None:
    ds = make_ds(VALUES, WindowCenter="70", WindowWidth="40", VOILUTFunction="SIGMOID")
    unit = to_unit_range(ds, decode_pixels(ds))
    sigmoid = 1 / (1 + np.exp(-4 * (VALUES - 70) / 40))
    expected = (sigmoid - sigmoid.min()) / (sigmoid.max() - sigmoid.min())
    np.testing.assert_allclose(unit, expected, atol=1e-6)
    assert unit[0, 5] == pytest.approx((0.5 - sigmoid.min()) / (sigmoid.max() - sigmoid.min()))


def test_monochrome1_is_inverted() -> None:
    ds = make_ds(VALUES, photometric="MONOCHROME1")
    unit = to_unit_range(ds, decode_pixels(ds))
    assert unit[2, 0] == 1.0  # stored 0: the brightest in MONOCHROME1
    assert unit[2, 1] == 0.0
    np.testing.assert_allclose(unit, 1 - VALUES / 4095, atol=1e-6)


def test_non_monotonic_voi_lut_stretches_over_the_values_present() -> None:
    item = pydicom.Dataset()
    item.LUTDescriptor = [8, 0, 16]
    item.add_new(0x00283006, "US", [0, 100, 1000, 50, 20, 60, 40, 65535])
    values = np.array([[1, 3, 4], [5, 1, 4]])
    ds = make_ds(values, VOILUTSequence=pydicom.Sequence([item]))
    # Present values map to 100, 50, 20, 60; 1000 (stored 2) is not in the image.
    unit = to_unit_range(ds, decode_pixels(ds))
    np.testing.assert_allclose(unit, [[1.0, 30 / 80, 0.0], [40 / 80, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(preprocess(ds, spec(5)), reference(ds, spec(5)), atol=1e-6)


def test_non_monotonic_modality_lut_sequence() -> None:
    item = pydicom.Dataset()
    item.LUTDescriptor = [6, 10, 16]
    item.add_new(0x00283006, "US", [4000, 10, 3000, 7, 2000, 4095])
    item.ModalityLUTType = "US"
    values = np.array([[10, 12, 13], [14, 12, 13]])  # -> 4000, 3000, 7, 2000
    ds = make_ds(values, ModalityLUTSequence=pydicom.Sequence([item]))
    unit = to_unit_range(ds, decode_pixels(ds))
    expected = (np.array([[4000, 3000, 7], [2000, 3000, 7]]) - 7) / (4000 - 7)
    np.testing.assert_allclose(unit, expected, atol=1e-6)


def test_32_bit_values_over_a_wide_range() -> None:
    # Too wide to tabulate value by value: the table covers the values present instead.
    values = np.array([[0, 1_000_000_000, 5], [500_000_000, 7, 4_000_000_000]], dtype=np.uint32)
    ds = make_ds(np.zeros((2, 3)))
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelData = values.astype("<u4").tobytes()
    pixels = decode_pixels(ds)
    np.testing.assert_array_equal(pixels, values)
    np.testing.assert_allclose(to_unit_range(ds, pixels), values / 4e9, rtol=1e-6)
    np.testing.assert_allclose(preprocess(ds, spec(4)), reference(ds, spec(4)), atol=1e-6)


# --- geometry and normalisation ---------------------------------------------------------------


def test_pad_to_square_is_centred_vertically() -> None:
    # 4x6 -> 6x6: one zero row above, one below. input_size 6 leaves the resize a copy.
    ds = make_ds(VALUES)
    out = preprocess(ds, spec(6))
    unit = VALUES / 4095
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_array_equal(out[0, 5], 0.0)
    np.testing.assert_allclose(out[0, 1:5], unit, atol=1e-6)


def test_pad_to_square_puts_the_odd_row_at_the_end() -> None:
    values = VALUES[:3]  # 3x6 -> 6x6: one row above, two below
    out = preprocess(make_ds(values), spec(6))
    unit = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_allclose(out[0, 1:4], unit, atol=1e-6)
    np.testing.assert_array_equal(out[0, 4:], 0.0)


def test_pad_to_square_is_centred_horizontally_odd_column_at_the_end() -> None:
    values = VALUES.T[:, :3]  # 6x3 -> 6x6: one column left, two right
    out = preprocess(make_ds(values), spec(6))
    unit = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_array_equal(out[0, :, 0], 0.0)
    np.testing.assert_allclose(out[0, :, 1:4], unit, atol=1e-6)
    np.testing.assert_array_equal(out[0, :, 4:], 0.0)


def test_no_padding_when_the_bundle_says_so() -> None:
    out = preprocess(make_ds(VALUES), spec(2, pad_to_square=False))
    expected = cv2.resize((VALUES / 4095).astype(np.float32), (2, 2), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)


def test_resize_is_area_averaging() -> None:
    # 6x6 padded -> 3x3: each output pixel is the mean of a 2x2 block.
    out = preprocess(make_ds(VALUES), spec(3))
    padded = np.zeros((6, 6))
    padded[1:5] = VALUES / 4095
    assert out.shape == (3, 3, 3)
    assert out[0, 0, 0] == pytest.approx(padded[0:2, 0:2].mean(), abs=1e-6)
    assert out[0, 1, 2] == pytest.approx(padded[2:4, 4:6].mean(), abs=1e-6)
    np.testing.assert_allclose(out[0], padded.reshape(3, 2, 3, 2).mean(axis=(1, 3)), atol=1e-6)


def test_normalisation_to_minus_one_one_in_three_identical_channels() -> None:
    out = preprocess(make_ds(VALUES), spec(6, 0.5, 0.5))
    assert out.dtype == np.float32
    assert out.shape == (3, 6, 6)
    assert out.flags.c_contiguous
    assert out.min() == -1.0  # the padding and stored 0
    assert out.max() == 1.0  # stored 4095
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_per_channel_mean_and_std() -> None:
    preprocessing = Preprocessing(input_size=6, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    out = preprocess(make_ds(VALUES), preprocessing)
    unit = preprocess(make_ds(VALUES), spec(6))[0]
    for channel, (m, s) in enumerate([(0.1, 0.5), (0.2, 0.25), (0.3, 2.0)]):
        np.testing.assert_allclose(out[channel], (unit - m) / s, atol=1e-6)


def test_pixels_argument_skips_decoding() -> None:
    ds = make_ds(VALUES)
    pixels = decode_pixels(ds)
    del ds.PixelData
    np.testing.assert_array_equal(
        preprocess(ds, spec(5), pixels=pixels), preprocess(make_ds(VALUES), spec(5))
    )


def test_tall_image_padded_left_and_right_and_calls_independent() -> None:
    # Same padded size (6x6), padding on different sides, one after the other.
    wide = preprocess(make_ds(VALUES), spec(6))
    tall = preprocess(make_ds(VALUES.T), spec(6))
    again = preprocess(make_ds(VALUES), spec(6))
    np.testing.assert_array_equal(wide, again)
    np.testing.assert_array_equal(tall[0, :, 0], 0.0)
    np.testing.assert_array_equal(tall[0, :, 5], 0.0)
    np.testing.assert_allclose(tall[0, :, 1:5], VALUES.T / 4095, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((700, 517), 448), ((517, 700), 448), ((1000, 801), 448), ((449, 448), 448), ((96, 64), 32)],
)
def test_large_images_match_cv2_resize_of_the_padded_image(
    shape: tuple[int, int], size: int
) -> None:
    # Smooth content with sharp edges, 12-bit, windowed: the fused vertical pass must agree
    # with cv2.resize(INTER_AREA) on the materialised padded image at non-integer scales.
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    values = 2000 + 1500 * np.sin(x / 37.0) * np.cos(y / 23.0) + 400 * ((x // 50 + y // 70) % 2)
    ds = make_ds(values.astype(np.uint16), WindowCenter="2100", WindowWidth="2500")
    preprocessing = spec(size, 0.5, 0.5)
    np.testing.assert_allclose(
        preprocess(ds, preprocessing), reference(ds, preprocessing), atol=1e-5
    )


def test_fused_area_resize_equals_cv2_for_every_small_size() -> None:
    # preprocess does INTER_AREA's vertical pass itself (fused with the table lookup) and
    # leaves the horizontal one to cv2: check it against cv2 for every shrink 1..40 -> 1..40,
    # with padding above/below, left/right and none.
    rng = np.random.default_rng(7)
    table = rng.random(1000).astype(np.float32)
    for side in range(1, 41):
        for rows, columns in {(side, side), (max(1, side - 3), side), (side, max(1, side // 2))}:
            index = rng.integers(0, 1000, (rows, columns))
            top, left = (side - rows) // 2, (side - columns) // 2
            padded = np.zeros((side, side), dtype=np.float32)
            padded[top : top + rows, left : left + columns] = table[index]
            for n in range(1, side + 1):
                expected = cv2.resize(padded, (n, n), interpolation=cv2.INTER_AREA)
                out = _area_downscale(table, index, 0, (side, side), (top, left), n)
                np.testing.assert_allclose(out, expected, atol=1e-6, err_msg=f"{side} -> {n}")


# --- property: equal to the plain full-image pipeline ----------------------------------------


@st.composite
def radiographs(draw: st.DrawFn) -> tuple[pydicom.Dataset, Preprocessing]:
    rows = draw(st.integers(1, 40))
    columns = draw(st.integers(1, 40))
    assume(rows * columns >= 2)
    bits = draw(st.sampled_from([8, 10, 12, 16]))
    signed = draw(st.booleans())
    lowest = -(2 ** (bits - 1)) if signed else 0
    values = draw(
        arrays(
            np.int16 if signed else np.uint16,
            (rows, columns),
            elements=st.integers(lowest, lowest + 2**bits - 1),
        )
    )
    assume(values.min() != values.max())
    elements: dict[str, object] = {}
    if draw(st.booleans()):
        elements["RescaleSlope"] = draw(st.sampled_from(["1", "2", "0.5", "-1", "1.5", "0.25"]))
        elements["RescaleIntercept"] = str(draw(st.integers(-2048, 2048)))
    function = draw(st.sampled_from([None, "LINEAR", "LINEAR_EXACT", "SIGMOID"]))
    if function is not None or draw(st.booleans()):
        centre = draw(st.integers(-(2**bits), 2**bits)) + draw(st.sampled_from([0, 0.5]))
        width = draw(st.integers(1, 2**bits)) + draw(st.sampled_from([0, 0.5]))
        elements["WindowCenter"] = f"{centre:g}"
        elements["WindowWidth"] = f"{width:g}"
        if function is not None:
            elements["VOILUTFunction"] = function
    photometric = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"]))
    ds = make_ds(values, bits_stored=bits, signed=signed, photometric=photometric, **elements)
    mean = tuple(draw(st.sampled_from([0.0, 0.5, 0.485, 0.2])) for _ in range(3))
    std = tuple(draw(st.sampled_from([1.0, 0.5, 0.229, 2.0])) for _ in range(3))
    preprocessing = Preprocessing(
        input_size=draw(st.integers(1, 24)),
        mean=mean,
        std=std,
        pad_to_square=draw(st.booleans()),
    )
    return ds, preprocessing


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(radiographs())
def test_matches_the_plain_pipeline(case: tuple[pydicom.Dataset, Preprocessing]) -> None:
    ds, preprocessing = case
    n = preprocessing.input_size
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = reference(ds, preprocessing)
    if not np.all(np.isfinite(expected)):  # the window leaves a uniform image
        event("no contrast left: rejected")
        with pytest.raises(ImageRejected, match="no contrast"):
            preprocess(ds, preprocessing)
        return
    out = preprocess(ds, preprocessing)
    assert out.shape == (3, n, n)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    for channel, (m, s) in enumerate(zip(preprocessing.mean, preprocessing.std, strict=True)):
        assert out[channel].min() >= (0 - m) / s - 1e-6
        assert out[channel].max() <= (1 - m) / s + 1e-6
    # 1e-5 on the [0, 1] image scale (float32 sums in another order); 1/std amplifies it.
    std = np.asarray(preprocessing.std)[:, None, None]
    np.testing.assert_allclose(out * std, expected * std, atol=1e-5, rtol=0)
