"""Which images of a study are scored: CR/DX views and the CT series for lung nodules."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import SelectionSettings, load_settings
from edge_agent.ct import CTSlice, is_lung_kernel, select_series
from edge_agent.errors import ConfigError
from edge_agent.scoring import select_images
from edge_agent.store import InstanceRow

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def row(sop: str, view: str, modality: str = "CR") -> InstanceRow:
    return InstanceRow(sop, "1.2.3.4", f"{sop}.dcm", modality, view, "pending", None)


def series(
    uid: str,
    n: int,
    *,
    spacing: float = 1.25,
    thickness: float | None = 1.25,
    kernel: str = "STANDARD",
    orientation: tuple[float, ...] = AXIAL,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    number: int | None = None,
) -> list[CTSlice]:
    normal = (0.0, 0.0, 1.0) if orientation == AXIAL else (1.0, 0.0, 0.0)
    return [
        CTSlice(
            sop_instance_uid=f"{uid}.{i}",
            series_instance_uid=uid,
            path=f"{uid}/{i}.dcm",
            position=tuple(-i * spacing * c for c in normal),  # type: ignore[arg-type]
            orientation=orientation,  # type: ignore[arg-type]
            thickness_mm=thickness,
            kernel=kernel,
            image_type=image_type,
            rows=512,
            columns=512,
            pixel_spacing=(0.7, 0.7),
            series_number=number if number is not None else int(uid.rsplit(".", 1)[-1]),
        )
        for i in range(n)
    ]


# -- radiographs --------------------------------------------------------------------------


def test_frontal_images_first_laterals_never() -> None:
    pa, lat, unmarked = row("1", "frontal"), row("2", "lateral"), row("3", "unknown")
    assert select_images([lat, pa, unmarked]) == ([pa], None)
    assert select_images([lat, unmarked]) == ([unmarked], None)
    assert select_images([lat]) == ([], "no frontal chest image")
    assert select_images([row("4", "other")]) == ([], "no frontal chest image")


def test_unmarked_views_can_be_refused() -> None:
    rules = SelectionSettings(radiograph_unmarked_views=False)
    assert select_images([row("3", "unknown")], rules) == ([], "no frontal chest image")
    assert select_images([row("1", "frontal")], rules)[0] == [row("1", "frontal")]


def test_no_radiograph_names_what_the_study_has() -> None:
    assert select_images([row("1", "unknown", "CT")]) == ([], "no CR/DX image (study has CT)")


# -- CT series ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel", "lung"),
    [
        ("LUNG", True),
        ("B70f", True),
        ("B60s", True),
        ("Br64", True),
        ("Bl57", True),
        ("FC51", True),
        ("YB", True),
        ("L", True),
        ("I70f\\3", True),
        ("STANDARD", False),
        ("B30f", False),
        ("FC13", False),
        ("SOFT", False),
        ("", False),
    ],
)
def test_lung_kernels(kernel: str, lung: bool) -> None:
    assert is_lung_kernel(kernel, SelectionSettings().ct_lung_kernels) is lung


def test_lung_kernel_first_then_original_then_thinnest() -> None:
    rules = SelectionSettings()
    thin_soft = series("1.2.2", 300, spacing=0.625, thickness=0.625)
    lung = series("1.2.3", 150, kernel="B70f")
    derived_lung = series(
        "1.2.4", 300, spacing=0.625, thickness=0.625, kernel="LUNG", image_type=("DERIVED",)
    )
    usable, refused = select_series(thin_soft + derived_lung + lung, rules)
    assert [c.series_instance_uid for c in usable] == ["1.2.3", "1.2.4", "1.2.2"]
    assert refused == []
    assert usable[0].lung_kernel and usable[0].original
    assert usable[0].geometry.spacing_mm == pytest.approx(1.25)


def test_unsuitable_series_are_refused_each_with_its_reason() -> None:
    rules = SelectionSettings()
    candidates = (
        series("1.2.1", 2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
        + series("1.2.2", 200, orientation=SAGITTAL)
        + series("1.2.3", 25)
        + series("1.2.4", 40, spacing=8.0, thickness=8.0)
        + series("1.2.5", 40, spacing=0.3, thickness=0.3)
        + series("1.2.6", 60)
    )
    usable, refused = select_series(candidates, rules)
    assert [c.series_instance_uid for c in usable] == ["1.2.6"]
    assert refused == [
        "series 1: localizer (scout) images",
        "series 2: not axial (slice normal 90 degrees from head-foot)",
        "series 3: 25 slices, at least 30 needed",
        "series 4: slice thickness 8 mm outside 0.5-5 mm",
        "series 5: slice thickness 0.3 mm outside 0.5-5 mm",
    ]


def test_missing_slice_thickness_falls_back_to_the_spacing() -> None:
    (choice,), _ = select_series(
        series("1.2.7", 40, spacing=2.0, thickness=None), SelectionSettings()
    )
    assert choice.thickness_mm == pytest.approx(2.0)
    _, refused = select_series(
        series("1.2.8", 40, spacing=7.0, thickness=None), SelectionSettings()
    )
    assert refused == ["series 8: slice thickness 7 mm outside 0.5-5 mm"]


def test_rules_come_from_the_config_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        "[selection]\nradiograph_unmarked_views = false\nct_max_slice_thickness_mm = 3.0\n"
        'ct_lung_kernels = ["B70f"]\n'
    )
    s = load_settings(cfg)
    assert s.selection.radiograph_unmarked_views is False
    assert s.selection.ct_max_slice_thickness_mm == 3.0
    assert s.selection.ct_lung_kernels == ["B70f"]
    monkeypatch.setenv("EDGE_AGENT_SELECTION__CT_MIN_SLICES", "80")
    assert load_settings(cfg).selection.ct_min_slices == 80

    monkeypatch.setenv("EDGE_AGENT_SELECTION__CT_MIN_SLICE", "80")
    with pytest.raises(ConfigError, match="EDGE_AGENT_SELECTION__CT_MIN_SLICE"):
        load_settings(cfg)
    monkeypatch.delenv("EDGE_AGENT_SELECTION__CT_MIN_SLICE")
    cfg.write_text("[selection]\nct_min_slice_thickness_mm = 2.0\nct_max_slice_thickness_mm = 1\n")
    with pytest.raises(ConfigError, match=r"selection\.ct_max_slice_thickness_mm"):
        load_settings(cfg)
    cfg.write_text("[selection]\nct_kernel = 'LUNG'\n")
    with pytest.raises(ConfigError, match=r"selection\.ct_kernel: unknown setting"):
        load_settings(cfg)
