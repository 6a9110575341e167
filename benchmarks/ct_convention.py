"""CT slabs: lung-window grey against MedGemma's three HU windows as RGB, measured.

    .venv/bin/python benchmarks/ct_convention.py [--studies 80] [--matrix 256] [--seed 0]

Simulates axial chest CT studies (``edge_agent.simulate.ct_series``: 48 slices of 5 mm, half
of the studies with 1-2 solid nodules of 6-25 mm), takes each through the daemon's CT road
(``edge_agent.ct``: headers, series selection, geometry, HU, slab MIPs of ``--slab-mm`` every
``--stride-mm``) and embeds every slab with a bundle's encoder (default: the demo bundle)
under both conventions:

  lung_window    centre -600 / width 1500 as grey
  three_windows  2250/-100, 350/40, 80/40 as R, G, B (MedGemma)

A slab is labelled positive when a nodule is in it: every abnormal study is rendered a
second time from the same seed without its nodules (the simulator draws the same anatomy
and noise either way) and the slices that differ hold a nodule. A logistic probe
(``export.demo.fit_probe``, class-balanced) is fitted on slab embeddings and evaluated by
stratified k-fold cross-validation grouped by study, so that no study's slabs are in both
the training and the test fold. Reported per convention:

  slab AUROC         the probe's held-out slab scores against the slab labels
  study AUROC max    the study score = the highest slab score (the daemon's "max")
  study AUROC top-3  the study score = the mean of the three highest slab scores
  CXR head           the bundle's own CXR ``lung_nodule`` head applied to slabs, no refit
                     (study AUROC, max over slabs): what scoring CT with a CXR model gives

Needs the ``export`` extra (scikit-learn). Exits 0; the figures are the output.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent import ct
from edge_agent.bundle import load_bundle
from edge_agent.config import SelectionSettings
from edge_agent.service import demo_bundle_path
from edge_agent.simulate import ct_series
from edge_agent.triage import Head
from export.demo import evaluate, fit_probe
from export.quantize import embed_onnx

CONVENTIONS: tuple[ct.Convention, ...] = ("lung_window", "three_windows")
NODULE_HU = 200  # a voxel that the nodule changed by more than this
NODULE_VOXELS = 3  # ... in at least this many voxels of a slice


@dataclass
class Study:
    abnormal: bool
    labels: np.ndarray  # (slabs,) bool
    embeddings: dict[str, np.ndarray]  # convention -> (slabs, D)


def _volume_and_slabs(
    seed: int, index: int, abnormal: bool, args: argparse.Namespace
) -> tuple[list[tuple[ct.Slab, np.ndarray]], np.ndarray]:
    """(slab MIPs in HU through the daemon's CT road, per-slab nodule label)."""
    truth = {"pneumothorax": False, "lung_nodule": abnormal}
    datasets = ct_series(
        np.random.default_rng([seed, index]),
        findings=truth,
        rows=args.matrix,
        cols=args.matrix,
        slices=args.slices,
    )
    headers = [ct.slice_from_dataset(ds, str(i)) for i, ds in enumerate(datasets)]
    (choice, *_), refused = ct.select_series(headers, SelectionSettings())
    assert not refused, refused
    by_sop = {ds.SOPInstanceUID: ds for ds in datasets}
    ordered = [by_sop[s.sop_instance_uid] for s in choice.geometry.slices]
    hu = [ct.slice_hu(ds) for ds in ordered]
    slabs = ct.plan_slabs(choice.geometry.positions_mm, args.slab_mm, args.stride_mm)
    images = list(ct.iter_slab_images(slabs, lambda i: hu[i]))
    has_nodule = np.zeros(len(ordered), dtype=bool)
    if abnormal:
        clean = ct_series(
            np.random.default_rng([seed, index]),
            findings={"pneumothorax": False, "lung_nodule": False},
            rows=args.matrix,
            cols=args.matrix,
            slices=args.slices,
        )
        clean_by_sop = {ds.SOPInstanceUID: ds for ds in clean}
        assert set(clean_by_sop) == set(by_sop), "the simulator must give the same UIDs"
        for k, ds in enumerate(ordered):
            diff = np.abs(hu[k].astype(np.int32) - ct.slice_hu(clean_by_sop[ds.SOPInstanceUID]))
            has_nodule[k] = int((diff > NODULE_HU).sum()) >= NODULE_VOXELS
    labels = np.asarray([has_nodule[s.first : s.last + 1].any() for s in slabs], dtype=bool)
    return images, labels


def _cv_scores(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int, c: float
) -> np.ndarray:
    """Held-out probe scores for every slab (stratified k-fold, grouped by study)."""
    from sklearn.model_selection import StratifiedGroupKFold

    out = np.zeros(len(y), dtype=np.float64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, groups):
        head = fit_probe(
            x[train],
            y[train, None].astype(int),
            ["lung_nodule"],
            seed,
            C=c,
            class_weight="balanced",
        )
        w = np.asarray(head.weights["lung_nodule"], dtype=np.float64)
        out[test] = 1.0 / (
            1.0 + np.exp(-(x[test].astype(np.float64) @ w + head.biases["lung_nodule"]))
        )
    return out


def _study_auroc(scores: np.ndarray, groups: np.ndarray, truth: np.ndarray, k: int) -> float:
    from sklearn.metrics import roc_auc_score

    study_scores = [np.sort(scores[groups == g])[::-1][:k].mean() for g in range(len(truth))]
    return float(roc_auc_score(truth, study_scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=80)
    parser.add_argument("--matrix", type=int, default=256, help="CT matrix (rows = columns)")
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--slab-mm", type=float, default=10.0)
    parser.add_argument("--stride-mm", type=float, default=5.0)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--C", type=float, default=1.0, dest="c")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", type=Path, default=None, help="default: the demo bundle")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle or demo_bundle_path())
    spec = bundle.manifest.encoder.preprocessing
    head = Head(bundle)
    codes = [f.code for f in head.findings]
    cxr_nodule = codes.index("lung_nodule") if "lung_nodule" in codes else None

    studies: list[Study] = []
    seconds = {"simulate+road": 0.0, **{c: 0.0 for c in CONVENTIONS}, "encoder": 0.0}
    slab_count = 0
    for i in range(args.studies):
        abnormal = i % 2 == 1
        start = time.perf_counter()
        images, labels = _volume_and_slabs(args.seed, i, abnormal, args)
        seconds["simulate+road"] += time.perf_counter() - start
        embeddings = {}
        for convention in CONVENTIONS:
            start = time.perf_counter()
            pixels = np.stack([ct.slab_tensor(mip, convention, spec) for _, mip in images])
            seconds[convention] += time.perf_counter() - start
            start = time.perf_counter()
            embeddings[convention] = embed_onnx(bundle.encoder_path, pixels, threads=2, batch=64)
            seconds["encoder"] += time.perf_counter() - start
        slab_count += len(images)
        studies.append(Study(abnormal, labels, embeddings))
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{args.studies} studies", file=sys.stderr)

    groups = np.concatenate([np.full(len(s.labels), g) for g, s in enumerate(studies)])
    y = np.concatenate([s.labels for s in studies])
    truth = np.asarray([s.abnormal for s in studies])
    print(
        f"{args.studies} studies ({int(truth.sum())} with nodules), {args.slices} slices of "
        f"{args.matrix}x{args.matrix}, {slab_count} slabs of {args.slab_mm:g} mm every "
        f"{args.stride_mm:g} mm ({int(y.sum())} with a nodule); encoder "
        f"{bundle.manifest.model.name} {bundle.manifest.model.version} "
        f"({spec.input_size} px); {args.folds}-fold CV grouped by study, seed {args.seed}\n"
    )
    print(
        "| convention | slab AUROC | study AUROC, max | study AUROC, top-3 mean "
        "| CXR head on slabs, study AUROC | preprocessing per slab |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for convention in CONVENTIONS:
        x = np.concatenate([s.embeddings[convention] for s in studies])
        held_out = _cv_scores(x, y, groups, args.folds, args.seed, args.c)
        slab_auroc = evaluate(held_out[:, None], y[:, None], ["lung_nodule"])["auroc_lung_nodule"]
        cxr = (
            f"{_study_auroc(head.scores(x)[:, cxr_nodule], groups, truth, 1):.3f}"
            if cxr_nodule is not None
            else "n/a"
        )
        print(
            f"| {convention} | {slab_auroc:.3f} "
            f"| {_study_auroc(held_out, groups, truth, 1):.3f} "
            f"| {_study_auroc(held_out, groups, truth, 3):.3f} "
            f"| {cxr} "
            f"| {1000 * seconds[convention] / slab_count:.2f} ms |"
        )
    print(
        f"\nsimulation + CT road {seconds['simulate+road']:.1f} s, encoder "
        f"{seconds['encoder']:.1f} s for {2 * slab_count} slabs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
