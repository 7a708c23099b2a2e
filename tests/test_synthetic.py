"""The built-in synthetic paired knees: determinism, geometry, contrast, pairing of the two
modalities, mirroring of left knees, and the written dataset (files, manifests, resuming)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kneetf.data import synthetic as S
from kneetf.errors import ConfigError, InputError

CFG = S.SynthConfig()
PX = CFG.xray_pixel_mm
W = CFG.xray_size
N = CFG.mri_size


def _still(p: S.KneeParams, **changes) -> S.KneeParams:
    """`p` without rotations or MRI jitter (so positions follow from the parameters alone)."""
    base = dict(flexion=0.0, axial=0.0, varus=0.0, mri_jitter_rot=(0.0, 0.0, 0.0), mri_jitter_shift=(0.0, 0.0, 0.0))
    base.update(changes)
    return dataclasses.replace(p, **base)


def _params(index: int, seed: int = 0) -> S.KneeParams:
    return S.sample_params(np.random.default_rng([seed, index]), CFG)


def _knee_centre(p: S.KneeParams) -> tuple[float, float]:
    """Detector pixel (column, row) of the joint centre, from the parameters."""
    return (W - 1) / 2 + p.detector_x / PX, (W - 1) / 2 + p.detector_y / PX


def _valley_width(profile: np.ndarray, i0: int) -> float:
    """Full width at half depth (pixels) of the dark valley of `profile` around index i0."""
    lm, rm = profile[max(i0 - 15, 0):i0 + 1].max(), profile[i0:i0 + 16].max()
    level = profile[i0] + 0.5 * (min(lm, rm) - profile[i0])
    a = b = i0
    while a > 0 and profile[a - 1] < level:
        a -= 1
    while b < len(profile) - 1 and profile[b + 1] < level:
        b += 1
    fa = (level - profile[a]) / (profile[a - 1] - profile[a])
    fb = (level - profile[b]) / (profile[b + 1] - profile[b])
    return b - a + fa + fb


def _xray_gap_mm(xray: np.ndarray, p: S.KneeParams, medial: bool = True) -> float:
    """Radiographic joint-space width (mm) of one compartment: the dark band between femur and
    tibia in a 7-pixel column band through the compartment."""
    cx, cy = _knee_centre(p)
    # medial is towards the patient's left for a right knee = larger column
    towards = (1 if medial else -1) * (-1 if p.left else 1)
    c0 = int(round(cx + towards * 20.0 * p.width * p.scale / PX))
    profile = xray[:, c0 - 3:c0 + 4].astype(float).mean(1)
    r0, r1 = int(cy - 8 / PX), int(cy + 4 / PX)
    i0 = r0 + int(np.argmin(profile[r0:r1]))
    return _valley_width(profile, i0) * PX


@pytest.fixture(scope="module")
def knee3() -> S.SyntheticKnee:
    return S.generate_knee(0, 3)


# === Determinism, shapes, dtypes ===

def test_same_seed_and_index_give_identical_knees(knee3):
    again = S.generate_knee(0, 3)
    np.testing.assert_array_equal(again.mri, knee3.mri)
    np.testing.assert_array_equal(again.xray, knee3.xray)
    assert again.box == knee3.box and again.params == knee3.params and again.side == knee3.side


def test_other_index_or_seed_gives_another_knee(knee3):
    for other in (S.generate_knee(0, 4), S.generate_knee(1, 3)):
        assert other.params != knee3.params
        assert np.abs(other.mri - knee3.mri).mean() > 10.0
        assert not np.array_equal(other.xray, knee3.xray)


def test_shapes_dtypes_and_ranges(knee3):
    k = knee3
    assert k.id == "knee00003" and k.side in ("left", "right") and k.photometric == "MONOCHROME2"
    assert k.mri.shape == (64, 160, 160) and k.mri.dtype == np.float32
    assert k.mri.min() >= 0 and 1000 < k.mri.max() < 3000
    np.testing.assert_array_equal(k.mri, np.rint(k.mri))  # integer-valued, as a scanner stores
    assert k.xray.shape == (320, 320) and k.xray.dtype == np.uint16 and k.xray.max() <= 4095
    assert k.mri_spacing == (CFG.mri_slice_mm, CFG.mri_pixel_mm, CFG.mri_pixel_mm)
    assert k.xray_spacing == (PX, PX)
    assert all(isinstance(v, float) for v in k.params.values())
    assert k.params["left"] == float(k.side == "left")


def test_config_is_frozen_json_able_and_validated():
    d = dataclasses.asdict(CFG)
    assert S.SynthConfig.from_dict(json.loads(json.dumps(d))) == CFG
    with pytest.raises(dataclasses.FrozenInstanceError):
        CFG.mri_noise = 0.0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="monochrome1_fraction"):
        S.SynthConfig(monochrome1_fraction=1.5)
    with pytest.raises(ConfigError, match="roi_mm"):
        S.SynthConfig(roi_mm=300.0)


# === Geometry: the box, the slice window ===

@pytest.mark.parametrize("index", [0, 1, 2, 5])
def test_box_is_a_square_inside_the_image_around_the_joint_space(index):
    p = _params(index)
    xray, box = S.render_xray(p, CFG, np.random.default_rng(index))
    x0, y0, x1, y1 = box
    assert x1 - x0 == y1 - y0 == round(CFG.roi_mm / PX)
    assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= W
    # the darkest row between the two bones, found in the image: the mean of two column bands
    # through the compartments, searched in the middle half of the box
    cx, cy = _knee_centre(p)
    bands = [xray[y0:y1, int(cx + d / PX) - 6:int(cx + d / PX) + 7].astype(float).mean(1) for d in (-20, 20)]
    profile = (bands[0] + bands[1]) / 2
    q = (y1 - y0) // 4
    gap_row = y0 + q + int(np.argmin(profile[q:-q]))
    joint_space_row = cy - 0.25 * (p.jsw_medial + p.jsw_lateral) / PX
    assert abs(gap_row - joint_space_row) <= 3.0 / PX, (gap_row, joint_space_row)
    # the box is centred on the joint space moved by the shared placement offset
    assert abs((y0 + y1) / 2 - (joint_space_row + 0.5 + p.place_y / PX)) <= 1.0
    assert abs((x0 + x1) / 2 - (cx + 0.5 + p.place_x / PX)) <= 1.0


def test_window_slices_hold_the_joint_and_differ():
    p = _still(_params(3), mri_place_z=0.0)
    mri = S.render_mri(p, CFG, None)
    cartilage = np.isclose(mri, S.TISSUES["cartilage"][0] * p.mri_gain, atol=1.0).sum(axis=(1, 2))
    meniscus = np.isclose(mri, S.TISSUES["meniscus"][0] * p.mri_gain, atol=1.0).sum(axis=(1, 2))
    assert cartilage[16:44].sum() >= 0.97 * cartilage.sum()
    assert meniscus[16:44].sum() >= 0.97 * meniscus.sum()
    # both compartments (cartilage on either side of the notch) lie inside [20, 40)
    c = int(round(CFG.mri_center_slice - p.place_x / CFG.mri_slice_mm))
    assert cartilage[20:c - 3].max() > 200 and cartilage[c + 4:40].max() > 200
    window = mri[20:40]
    neighbour_diff = np.abs(np.diff(window, axis=0)).mean(axis=(1, 2))
    assert neighbour_diff.min() > 5.0


# === Contrast ===

def test_mri_contrast_along_a_line_through_the_medial_compartment():
    p = _still(_params(3), left=False, mri_gain=1.0)
    mri = S.render_mri(p, CFG, None)
    xm = 21.0 * p.width * p.scale  # medial condyle centre, anatomy x (right knee: patient left)
    k = int(round(CFG.mri_center_slice + (p.place_x - xm) / CFG.mri_slice_mm))
    col = int(round((N - 1) / 2 + (5.0 * p.scale - p.mri_place_z) / CFG.mri_pixel_mm))
    line = mri[k, :, col]
    joint = int(round((N - 1) / 2 - p.place_y / CFG.mri_pixel_mm))
    femur_marrow = line[joint - 25:joint - 12].mean()
    tibia_marrow = line[joint + 12:joint + 25].mean()
    near = line[joint - 10:joint + 10]
    assert abs(femur_marrow - S.TISSUES["marrow"][0]) < 30 and abs(tibia_marrow - S.TISSUES["marrow"][0]) < 30
    assert near.max() > 1.4 * femur_marrow          # cartilage / fluid: bright
    assert near.min() < 0.3 * femur_marrow          # subchondral cortical plate: dark
    # the order of DESS-like tissue intensities
    t = {name: v[0] for name, v in S.TISSUES.items()}
    assert t["fluid"] > t["cartilage"] > t["fat"] > t["marrow"] > t["muscle"] > t["meniscus"] > t["cortical"]


def test_xray_bone_brighter_than_soft_tissue_brighter_than_air(knee3):
    p = _params(3)
    cx, cy = _knee_centre(p)
    x = knee3.xray.astype(float)
    row = int(cy - 60 / PX)                                # femoral shaft level
    shaft = x[row, int(cx) - 3:int(cx) + 4].mean()
    soft = x[row, int(cx + 35 / PX)]                       # thigh, beside the shaft
    outside = np.concatenate([x[row, :max(int(cx - 110 / PX), 1)], x[row, min(int(cx + 110 / PX), W - 1):]])
    assert shaft > soft + 300 and soft > outside.mean() + 1000


# === The X-ray sees what changes the MRI ===

def test_xray_joint_space_follows_the_jsw_parameter():
    base = _params(3)
    widths = [1.8, 3.0, 4.2, 5.4]
    med, lat, mris = [], [], []
    for w in widths:
        p = dataclasses.replace(base, jsw_medial=w)
        xray, _ = S.render_xray(p, CFG, None)
        med.append(_xray_gap_mm(xray, p, medial=True))
        lat.append(_xray_gap_mm(xray, p, medial=False))
        mris.append(S.render_mri(p, CFG, None)[20:40])
    assert np.all(np.diff(med) > 0.2), med
    assert np.corrcoef(widths, med)[0, 1] > 0.98
    assert np.ptp(lat) < 0.3, lat                              # the other compartment stays
    assert np.abs(mris[0] - mris[-1]).mean() > 1.0             # and the MRI changes with it


def test_xray_gap_correlates_with_jsw_across_random_knees():
    gaps, jsw = [], []
    for index in range(12):
        p = _params(index)
        xray, _ = S.render_xray(p, CFG, np.random.default_rng(index))
        gaps.append(_xray_gap_mm(xray, p))
        jsw.append(p.jsw_medial)
    assert np.corrcoef(gaps, jsw)[0, 1] > 0.6


def test_shared_placement_moves_the_knee_in_the_roi_and_among_the_slices():
    p = _still(_params(3), place_x=0.0)
    q = dataclasses.replace(p, place_x=2 * CFG.mri_slice_mm)
    mp, mq = S.render_mri(p, CFG, None), S.render_mri(q, CFG, None)
    np.testing.assert_allclose(mq[22:42], mp[20:40], atol=1.0)   # two slices further along
    xp, bp = S.render_xray(p, CFG, None)
    xq, bq = S.render_xray(q, CFG, None)
    np.testing.assert_array_equal(xp, xq)                        # same X-ray ...
    assert bq[0] - bp[0] == round(2 * CFG.mri_slice_mm / PX)     # ... cropped elsewhere


# === Left and right ===

def test_left_knee_is_the_exact_mirror_in_both_modalities():
    p = dataclasses.replace(_params(3), left=False)
    right, left = S.render_knee(p, CFG, None), S.render_knee(p.mirrored(), CFG, None)
    assert (right.side, left.side) == ("right", "left")
    np.testing.assert_array_equal(left.mri[20:40], right.mri[20:40][::-1])
    np.testing.assert_array_equal(left.xray, right.xray[:, ::-1])
    assert abs(left.box[0] - (W - right.box[2])) <= 1 and left.box[1] == right.box[1]


@pytest.mark.parametrize("left", [False, True])
def test_lateral_side_convention(left):
    """The fibula (lateral, posterior, below the joint) shows where the docstring says: a right
    knee's lateral side is on the image's left and at high slice numbers."""
    p = _still(_params(3), left=left, place_x=0.0, detector_x=0.0)
    k = S.render_knee(p, CFG, None)
    cx, cy = _knee_centre(p)
    band = k.xray[int(cy + 35 / PX):int(cy + 45 / PX)].astype(float).mean(0)
    soft = np.percentile(band[band > 300], 20)
    cols = np.nonzero(band > soft + 0.5 * (band.max() - soft))[0]
    r0, r1 = int((N - 1) / 2 + 35 / CFG.mri_pixel_mm), int((N - 1) / 2 + 45 / CFG.mri_pixel_mm)
    marrow = (np.abs(k.mri[:, r0:r1, N // 2:] - S.TISSUES["marrow"][0] * p.mri_gain) < 60).sum(axis=(1, 2))
    slice_centroid = (marrow * np.arange(len(marrow))).sum() / marrow.sum()
    lateral = -1 if not left else 1   # image columns: patient's right -> left
    assert lateral * (cols.mean() - cx) > 0.5
    assert -lateral * (slice_centroid - CFG.mri_center_slice) > 0.5


def test_monochrome1_stores_the_inverted_image():
    mono2 = S.generate_knee(0, 3, CFG)
    mono1 = S.generate_knee(0, 3, dataclasses.replace(CFG, monochrome1_fraction=1.0))
    assert mono1.photometric == "MONOCHROME1" and mono2.photometric == "MONOCHROME2"
    np.testing.assert_array_equal(mono1.xray, 4095 - mono2.xray)
    np.testing.assert_array_equal(mono1.mri, mono2.mri)


def test_left_fraction_is_respected():
    sides = [S.sample_params(np.random.default_rng([0, i]), CFG).left for i in range(200)]
    assert 70 < sum(sides) < 130
    all_right = dataclasses.replace(CFG, left_fraction=0.0)
    assert not any(S.sample_params(np.random.default_rng([0, i]), all_right).left for i in range(50))


# === Splits ===

def test_assign_split_is_deterministic_with_exact_counts():
    splits = [S.assign_split(0, i, 256) for i in range(256)]
    assert splits == [S.assign_split(0, i, 256) for i in range(256)]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (204, 26, 26)
    assert splits != [S.assign_split(1, i, 256) for i in range(256)]
    with pytest.raises(ConfigError, match="fractions"):
        S.assign_split(0, 0, 10, (0.5, -0.1, 0.6))
    with pytest.raises(ConfigError, match="index"):
        S.assign_split(0, 10, 10)


# === The written dataset ===

@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, S.SynthConfig]:
    out = tmp_path_factory.mktemp("synth")
    config = dataclasses.replace(CFG, monochrome1_fraction=0.5)
    S.write_synthetic_dataset(out, n=3, seed=0, config=config, workers=1, progress=False)
    return out, config


def test_written_files_manifests_and_rois(written):
    from kneetf.io.manifest import read_manifest
    from kneetf.preprocess.roi import load_boxes

    out, config = written
    ids = [f"knee{i:05d}" for i in range(3)]
    for i in ids:
        assert len(list((out / "mri" / i).glob("*.dcm"))) == 64
        for f in (f"mri/{i}.nii.gz", f"xray/{i}.dcm", f"xray/{i}.png"):
            assert (out / f).is_file(), f
    dicom = read_manifest(out / "manifest.csv")
    assert dicom.ok and [c.id for c in dicom.cases] == ids
    assert [c.xray for c in dicom.cases] == [out / "xray" / f"{i}.dcm" for i in ids]
    assert [c.mri for c in dicom.cases] == [out / "mri" / i for i in ids]
    other = read_manifest(out / "manifest_nifti_png.csv")
    assert other.ok and [c.mri for c in other.cases] == [out / "mri" / f"{i}.nii.gz" for i in ids]
    boxes = load_boxes(out / "rois.csv")
    info = json.loads((out / "synth.json").read_text())
    assert info["n"] == 3 and info["seed"] == 0 and info["config"]["monochrome1_fraction"] == 0.5
    assert "kneetf_version" in info
    for index, case in enumerate(dicom.cases):
        knee = S.generate_knee(0, index, config)
        assert case.side == knee.side and case.split == S.assign_split(0, index, 3)
        assert boxes[case.id].as_tuple() == tuple(float(v) for v in knee.box)


def test_written_files_read_back_as_the_generated_arrays(written):
    import pydicom

    from kneetf.io.readers import read_mri, read_xray

    out, config = written
    photometrics = set()
    for index in range(3):
        knee = S.generate_knee(0, index, config)
        kid = knee.id
        shown = knee.xray.astype(np.float32)
        if knee.photometric == "MONOCHROME1":
            shown = 4095 - shown
        for path in (out / "mri" / kid, out / "mri" / f"{kid}.nii.gz"):
            volume, _ = read_mri(path)
            np.testing.assert_array_equal(volume, knee.mri)        # sorted by position, not name
        for path in (out / "xray" / f"{kid}.dcm", out / "xray" / f"{kid}.png"):
            image, _ = read_xray(path)
            np.testing.assert_array_equal(image, shown)
        ds = pydicom.dcmread(out / "xray" / f"{kid}.dcm", stop_before_pixels=True)
        assert ds.PhotometricInterpretation == knee.photometric
        assert ds.ImageLaterality == knee.side[0].upper()
        photometrics.add(knee.photometric)
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}  # both kinds exercised


def test_second_run_reuses_complete_subjects_and_refills_missing_files(written):
    out, config = written
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.parent != out)
    before = {p: p.stat().st_mtime_ns for p in files}
    png = out / "xray" / "knee00001.png"
    content = png.read_bytes()
    png.unlink()
    summary = S.synthesize(out, n=3, seed=0, config=config, workers=1, progress=False)
    assert (summary.generated, summary.reused) == (1, 2)
    assert png.read_bytes() == content                       # regenerated identically
    after = {p: p.stat().st_mtime_ns for p in files if p != png}
    assert after == {p: t for p, t in before.items() if p != png}  # nothing else rewritten
    assert not list(out.rglob(".tmp-*"))


def test_other_seed_into_the_same_folder_is_refused(written):
    out, config = written
    with pytest.raises(InputError, match="another seed or config"):
        S.write_synthetic_dataset(out, n=3, seed=1, config=config, workers=1, progress=False)


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")  # was "[Errno 17] File exists"
    with pytest.raises(ConfigError, match=r"notes.txt exists and is not a folder"):
        S.write_synthetic_dataset(tmp_path / "notes.txt", n=1, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_formats_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown formats"):
        S.write_synthetic_dataset(tmp_path, n=1, formats=("dicom", "jpeg"), progress=False)
    with pytest.raises(ConfigError, match="an X-ray and an MRI"):
        S.write_synthetic_dataset(tmp_path, n=1, formats=("nifti",), progress=False)


def test_worker_processes_write_the_same_data_and_no_tensorflow(tmp_path):
    """workers=2 (spawned processes) writes what generate_knee gives; the module and its
    writers never import TensorFlow."""
    code = ("import sys; from kneetf.data.synthetic import write_synthetic_dataset as w; "
            f"w({str(tmp_path)!r}, n=2, seed=5, workers=2, formats=('nifti', 'png'), progress=False); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    from kneetf.io.readers import read_mri

    for index in range(2):
        knee = S.generate_knee(5, index)
        volume, _ = read_mri(tmp_path / "mri" / f"{knee.id}.nii.gz")
        np.testing.assert_array_equal(volume, knee.mri)
    rows = (tmp_path / "manifest.csv").read_text().splitlines()
    assert rows[0] == "id,xray,mri,side,split"
    assert rows[1].startswith("knee00000,xray/knee00000.png,mri/knee00000.nii.gz,")


# === CLI ===

def test_cli_writes_a_dataset_and_reports(tmp_path, capsys):
    from kneetf.cli.main import main

    out = tmp_path / "s"
    rc = main(["synth", "--n", "2", "--out", str(out), "--workers", "1", "--formats", "nifti,png",
               "--monochrome1-fraction", "1", "--set", "mri_noise=0.05", "--set", "placement_mm=[2, 3]",
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "2 knees" in text and "2 generated" in text and str(out / "manifest.csv") in text
    info = json.loads((out / "synth.json").read_text())
    assert info["config"]["monochrome1_fraction"] == 1.0 and info["formats"] == ["nifti", "png"]
    assert info["config"]["mri_noise"] == 0.05 and info["config"]["placement_mm"] == [2, 3]
    assert main(["synth", "--n", "2", "--out", str(tmp_path / "u"), "--set", "mri_nosie=1", "--no-progress"]) == 1
    assert "mri_nosie" in capsys.readouterr().err
    assert main(["synth", "--n", "2", "--out", str(tmp_path / "u"), "--set", "bias_field", "--no-progress"]) == 1
    assert "FIELD=VALUE" in capsys.readouterr().err
    assert main(["synth", "--n", "2", "--out", str(tmp_path / "t"), "--formats", "gif", "--no-progress"]) == 1
    assert "unknown formats" in capsys.readouterr().err
